"""--data-cache device: the same samples as the stream, equal shares that wrap around like the
stream (an epoch covers every sample), replayable epochs."""

from __future__ import annotations

import pytest
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
    assert [c.share for c in caches] == [24, 24]  # 6 batches of 4: 48 positions, 45 wrapped
    assert caches[0].batches_per_epoch == caches[1].batches_per_epoch == 6
    assert set(caches[0].keys) | set(caches[1].keys) == set(keys)  # every sample
    assert caches[1].keys[-3:] == caches[0].keys[:3]  # rank 1 wraps around to the first three
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


@pytest.mark.parametrize(
    ("n", "world_size", "batch"),
    [(45, 2, 4), (24, 1, 4), (31, 3, 4), (10, 4, 1), (5, 4, 2), (3, 2, 4), (40, 2, 4)],
)
def test_an_epoch_of_every_rank_covers_every_sample(tmp_path, n, world_size, batch):
    shards = write_tiny_shards(tmp_path / "s", n=n, size=8, per_shard=7, n_attrs=2)
    caches = [
        DeviceCache(shards, batch_per_device=batch, rank=r, world_size=world_size, seed=1)
        for r in range(world_size)
    ]
    b = caches[0].batches_per_epoch
    assert all(c.batches_per_epoch == b for c in caches)  # no rank runs out first
    drawn: list[bytes] = []
    for c in caches:
        it = c.batches()
        for _ in range(b):
            images, attrs = next(it)
            assert images.shape == (batch, 3, 8, 8) and attrs.shape == (batch, 2)
            drawn.extend(map(bytes, images.flatten(1).numpy()))
    every = {bytes(im) for c in caches for im in c.images.flatten(1).numpy()}
    assert len(every) == n and set(drawn) == every  # the union covers all N
    duplicates = len(drawn) - n
    assert 0 <= duplicates < world_size * batch  # fewer than one batch per rank
    assert sum(c.images_per_epoch for c in caches) == world_size * len(drawn)


def test_a_wrapped_share_resumes_bit_exactly(tmp_path):
    shards = write_tiny_shards(tmp_path / "s", n=3, size=8, per_shard=2, n_attrs=2)
    cache = DeviceCache(shards, batch_per_device=4, rank=1, world_size=2, seed=2)
    assert cache.share == 4 and cache.images.shape[0] == 3  # the tiny split stored once
    it = cache.batches()
    full = [next(it) for _ in range(3)]  # 3 epochs of 1 batch
    for k in range(3):
        got = next(cache.batches(start_batch=k))
        assert torch.equal(got[0], full[k][0]) and torch.equal(got[1], full[k][1])
