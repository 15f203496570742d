"""`facegan shard` -> the training reader: every image and attribute comes back (bit-exact for
png, within JPEG tolerance for jpg), each exactly once per epoch over 2 ranks x 2 workers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from facegan_dist.config import ShardConfig
from facegan_dist.data.celeba import ImageReader, open_source
from facegan_dist.data.shards import load_face, write_shards
from facegan_dist.data.stream import ShardStream, make_loader


@pytest.fixture(scope="module", params=["png", "jpg"])
def sharded(request, synth_kaggle_zip, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"rt_{request.param}")
    write_shards(ShardConfig(src=synth_kaggle_zip, out=out, size=32, format=request.param,
                             shard_size=7, split="train", workers=1))  # fmt: skip
    return request.param, out


def expected(synth_kaggle_zip) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (the crop+resize of the source image as uint8 HWC, the 0/1 attributes)."""
    source = open_source(synth_kaggle_zip)
    out = {}
    with ImageReader(source.reader) as reader:
        for s in source.split_samples("train"):
            img = np.asarray(load_face(reader.read(s.member), 32, "celeba"))
            out[s.key] = (img, np.frombuffer(s.attrs.encode(), np.uint8) - ord("0"))
    return out


def test_every_sample_comes_back_once_per_epoch(sharded, synth_kaggle_zip):
    fmt, out = sharded
    want = expected(synth_kaggle_zip)
    seen: dict[str, int] = {}
    n_batches = 0
    for rank in range(2):
        stream = ShardStream(out, batch_per_device=4, rank=rank, world_size=2, num_workers=2,
                             return_keys=True)  # fmt: skip
        loader = make_loader(stream)
        it = iter(loader)
        for _ in range(stream.batches_per_epoch):
            n_batches += 1
            images, attrs, keys = next(it)
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            for img, att, key in zip(images, attrs, keys, strict=True):
                seen[key] = seen.get(key, 0) + 1
                ref_img, ref_attrs = want[key]
                got = img.permute(1, 2, 0).numpy()
                if fmt == "png":
                    np.testing.assert_array_equal(got, ref_img)
                else:  # JPEG q95 with 4:4:4 chroma: a few grey levels on average
                    assert np.abs(got.astype(int) - ref_img.astype(int)).mean() < 3.0
                np.testing.assert_array_equal(att.numpy(), ref_attrs)
        del it
    assert set(seen) == set(want)  # the two ranks together see every sample
    # Exactly the epoch's batches, and duplicates only to fill the last batch of each of the
    # 2 ranks x 2 workers: fewer than one batch per slot, none seen more than twice.
    slots, batch = 2 * 2, 4
    assert sum(seen.values()) == n_batches * batch
    assert sum(seen.values()) - len(want) <= slots * batch - 1
    assert max(seen.values()) <= 2


def test_decoder_agrees_with_pil(sharded):
    fmt, out = sharded
    stream = ShardStream(out, batch_per_device=3, shuffle_buffer=1, decode=False)
    encoded, _ = next(iter(stream))
    decoded = ShardStream(out, batch_per_device=3, shuffle_buffer=1)
    images, _ = next(iter(decoded))
    for data, img in zip(encoded, images, strict=True):
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), pil)
