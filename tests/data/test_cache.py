"""--data-cache device: the same samples as the stream, equal shares, replayable epochs."""

from __future__ import annotations

import torch

from facegan_dist.data.cache import DeviceCache
from facegan_dist.data.stream import ShardStream
from tests.helpers.shards import write_tiny_shards


def test_cache_holds_the_streams_samples_and_splits_them_evenly(tmp_path):
    shards = write_tiny_shards(tmp_path / "s", n=45, size=16, per_shard=10)
    stream = ShardStream(shards, batch_per_device=45, shuffle_buffer=1, return_keys=True)
    images, attrs, keys = next(iter(stream))
    by_key = {k: (images[i], attrs[i]) for i, k in enumerate(keys)}
    caches = [DeviceCache(shards, batch_per_device=4, rank=r, world_size=2) for r in range(2)]
    assert [c.share for c in caches] == [22, 22]  # 45 // 2, the last sample left out
    assert caches[0].batches_per_epoch == caches[1].batches_per_epoch == 5
    assert not set(caches[0].keys) & set(caches[1].keys)  # disjoint shares
    for c in caches:
        for i, k in enumerate(c.keys):
            assert torch.equal(c.images[i], by_key[k][0])  # bit-exact (png)
            assert torch.equal(c.attrs[i], by_key[k][1])


def test_cache_epochs_are_permutations_and_resume_replays(tmp_path):
    shards = write_tiny_shards(tmp_path / "s", n=24, size=16, per_shard=10)
    cache = DeviceCache(shards, batch_per_device=4, seed=3)
    it = cache.iterate()
    full = [next(it) for _ in range(12)]  # two epochs of 6 batches
    epoch0 = torch.cat([b[0] for b in full[:6]])
    epoch1 = torch.cat([b[0] for b in full[6:]])
    assert sorted(map(bytes, epoch0.flatten(1).numpy())) == sorted(
        map(bytes, cache.images.flatten(1).numpy())
    )  # every sample once per epoch
    assert not torch.equal(epoch0, epoch1)  # a new order each epoch
    tail = cache.iterate(start_batch=5)
    for want in full[5:]:
        got = next(tail)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
