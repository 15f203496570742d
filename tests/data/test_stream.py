"""The training reader: exact epochs, equal counts per rank, bit-exact resume, clear data errors.

Fixtures are tiny shard folders written here with webdataset.TarWriter, following docs/SHARDS.md
(the real writer lives in data/shards.py); 16x16 PNG so decoded values compare exactly.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from facegan_dist.data.stream import ShardStream, bench_read, make_loader, read_manifest
from facegan_dist.errors import ConfigError, DataError

SIZE = 16
NUM_ATTRS = 40
TRAIN_COUNTS = [7, 7, 7, 7, 5]  # an odd number of shards, the last one short: N = 33


def write_shards(
    root: Path,
    counts: dict[str, list[int]],
    *,
    fmt: str = "png",
    attrs: bool = True,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write `{split}-{index:06d}.tar` shards + manifest.json; return key -> (CHW image, attrs)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    splits, serial = {}, 0
    for part, (split, shard_counts) in enumerate(counts.items()):
        shards = []
        for index, count in enumerate(shard_counts):
            name = f"{split}-{index:06d}.tar"
            with wds.TarWriter(str(root / name), mtime=0) as writer:
                for _ in range(count):
                    key = f"img_{serial:06d}"  # keys hold no dot (SHARDS.md)
                    serial += 1
                    hwc = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                    bits = rng.integers(0, 2, NUM_ATTRS if attrs else 0, dtype=np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(hwc).save(buf, "PNG" if fmt == "png" else "JPEG")
                    sample = {"__key__": key, fmt: buf.getvalue(), "partition.cls": str(part)}
                    if attrs:
                        sample["attrs.txt"] = "".join(map(str, bits))
                    writer.write(sample)
                    expected[key] = (hwc.transpose(2, 0, 1).copy(), bits)
            shards.append({"name": name, "count": count, "bytes": 0, "sha256": ""})
        splits[split] = {"count": sum(shard_counts), "shards": shards}
    manifest = {
        "format_version": 1,
        "package_version": "0.1.0",
        "source": {"path": "synthetic", "kind": "folder"},
        "settings": {
            "size": SIZE,
            "crop": "none",
            "format": fmt,
            "quality": 95,
            "limit": None,
            "split": "all",
            "shard_size": 7,
            "seed": seed,
        },
        "attribute_names": [f"attr_{i}" for i in range(NUM_ATTRS)] if attrs else [],
        "splits": splits,
        "total": len(expected),
        "skipped": [],
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return expected


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shards")
    expected = write_shards(root, {"train": TRAIN_COUNTS, "val": [4]})
    return root, expected


def train_keys(expected: dict) -> set[str]:
    return set(sorted(expected)[: sum(TRAIN_COUNTS)])


def take(stream, n: int) -> list:
    return list(itertools.islice(iter(stream), n))


def keys_of(batches) -> list[str]:
    return [k for batch in batches for k in batch[2]]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]


def test_png_round_trip_is_bit_exact(shards):
    root, expected = shards
    stream = ShardStream(root, batch_per_device=5, shuffle_buffer=8, return_keys=True)
    batches = take(stream, stream.batches_per_epoch)
    seen = set()
    for images, attrs, keys in batches:
        assert images.dtype == torch.uint8 and images.shape == (5, 3, SIZE, SIZE)
        assert attrs.dtype == torch.uint8 and attrs.shape == (5, NUM_ATTRS)
        for image, attr, key in zip(images, attrs, keys, strict=True):
            assert np.array_equal(image.numpy(), expected[key][0])
            assert np.array_equal(attr.numpy(), expected[key][1])
            seen.add(key)
    assert seen == train_keys(expected)

    # without keys the same content comes back (matched by content)
    plain = take(ShardStream(root, batch_per_device=5, shuffle_buffer=8), 1)[0]
    assert len(plain) == 2
    by_content = {img.tobytes(): bits for img, bits in expected.values()}
    for image, attr in zip(*plain, strict=True):
        assert np.array_equal(by_content[image.numpy().tobytes()], attr.numpy())


def test_two_ranks_two_workers_equal_counts_and_full_coverage(shards):
    root, expected = shards
    streams = [
        ShardStream(
            root, batch_per_device=4, rank=r, world_size=2, num_workers=2, seed=3, return_keys=True
        )
        for r in range(2)
    ]
    # slots = 2 ranks x 2 workers = 4; b = ceil(33 / (4 * 4)) = 3 batches per slot
    assert [s.batches_per_epoch for s in streams] == [6, 6]
    for epoch in range(2):
        seen: list[str] = []
        for stream in streams:
            batches = take(stream, 2 * stream.batches_per_epoch)
            epoch_batches = batches[epoch * 6 : (epoch + 1) * 6]
            assert all(b[0].shape == (4, 3, SIZE, SIZE) for b in epoch_batches)
            seen += keys_of(epoch_batches)
        assert len(seen) == 2 * 6 * 4  # 48 = 33 samples + 15 wrapped duplicates
        assert set(seen) == train_keys(expected)
        assert len(seen) - len(set(seen)) <= 4 * 4 - 1


def test_dataloader_workers_match_in_process_emulation(shards):
    root, _ = shards
    stream = ShardStream(
        root,
        batch_per_device=4,
        rank=1,
        world_size=2,
        num_workers=2,
        start_batch=3,
        return_keys=True,
    )
    n = 2 * stream.batches_per_epoch
    in_process = take(stream, n)
    loader = make_loader(stream, prefetch_factor=2)
    assert loader.num_workers == 2 and loader.persistent_workers
    assert_same_batches(take(loader, n), in_process)


def test_epochs_differ_and_seed_replays(shards):
    root, _ = shards

    def stream(seed: int, epoch: int = 0) -> list:
        s = ShardStream(root, batch_per_device=4, seed=seed, start_epoch=epoch, return_keys=True)
        return take(s, s.batches_per_epoch)

    epoch0 = stream(seed=1)
    assert_same_batches(stream(seed=1), epoch0)
    assert keys_of(stream(seed=1, epoch=1)) != keys_of(epoch0)
    assert keys_of(stream(seed=2)) != keys_of(epoch0)
    assert set(keys_of(stream(seed=1, epoch=1))) == set(keys_of(epoch0))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_the_tail_of_the_full_stream(shards, num_workers):
    root, _ = shards
    kw = dict(
        batch_per_device=3,
        rank=1,
        world_size=2,
        num_workers=num_workers,
        seed=5,
        shuffle_buffer=6,
        return_keys=True,
    )
    full_stream = ShardStream(root, start_epoch=1, **kw)
    per_epoch = full_stream.batches_per_epoch
    full = take(full_stream, 3 * per_epoch)
    for start in range(0, 2 * per_epoch + 1):
        resumed = ShardStream(root, start_epoch=1, start_batch=start, **kw)
        assert resumed.position(0) == (1 + start // per_epoch, start % per_epoch)
        n = min(per_epoch + 1, len(full) - start)
        assert_same_batches(take(resumed, n), full[start : start + n])
    # a start_batch past the epoch end is the same as the next epoch
    later = ShardStream(root, start_epoch=2, start_batch=1, **kw)
    assert_same_batches(take(later, 2), full[per_epoch + 1 : per_epoch + 3])


def test_split_all_and_decode_false(shards):
    root, expected = shards
    stream = ShardStream(root, split="all", batch_per_device=8, decode=False, return_keys=True)
    assert stream.num_samples == len(expected) == 37
    batches = take(stream, stream.batches_per_epoch)
    assert set(keys_of(batches)) == set(expected)
    images, attrs, keys = batches[0]
    assert isinstance(images[0], bytes) and images[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert attrs.shape == (8, NUM_ATTRS)


def test_jpeg_without_attributes(tmp_path):
    write_shards(tmp_path, {"train": [5, 4]}, fmt="jpg", attrs=False)
    images, attrs = take(ShardStream(tmp_path, batch_per_device=3), 1)[0]
    assert images.shape == (3, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert attrs.shape == (3, 0)


def test_missing_split_is_a_data_error(shards):
    root, _ = shards
    with pytest.raises(DataError, match=r"split 'test' .*available: train, val"):
        ShardStream(root, split="test", batch_per_device=2)


def test_missing_or_empty_manifest_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="has no manifest.json; run `facegan shard` first"):
        read_manifest(tmp_path)
    with pytest.raises(DataError, match="has no manifest.json"):
        ShardStream(tmp_path, batch_per_device=2)
    (tmp_path / "manifest.json").write_text("")
    with pytest.raises(DataError, match="manifest.json is empty"):
        read_manifest(tmp_path)
    # a JSON value that is not an object is not "empty"; without .state/ the shard command
    # cannot rebuild it, and the advice says so
    (tmp_path / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(DataError) as exc:
        read_manifest(tmp_path)
    assert str(exc.value) == (
        f"{tmp_path / 'manifest.json'}: not a JSON object (it holds a list [1, 2, 3]); shard the "
        "source again into a new folder (no .state/run.json to rebuild it from)"
    )


def test_reader_names_a_malformed_shard_entry(shards, tmp_path):
    root = Path(shutil.copytree(shards[0], tmp_path / "copy"))
    m = json.loads((root / "manifest.json").read_text())
    del m["splits"]["train"]["shards"][1]["count"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"manifest.json: splits.train.shards\[1\] has no 'count'"):
        ShardStream(root, batch_per_device=2)
    assert read_manifest(shards[0])  # the reader needs no bytes/sha256 (verify does)


def test_bad_settings_are_config_errors(shards):
    root, _ = shards
    with pytest.raises(ConfigError, match="batch per device"):
        ShardStream(root, batch_per_device=0)
    with pytest.raises(ConfigError, match="rank 2"):
        ShardStream(root, batch_per_device=2, rank=2, world_size=2)


def read_epoch(root: Path, **kw) -> list:
    stream = ShardStream(root, batch_per_device=4, return_keys=True, **kw)
    return take(stream, stream.batches_per_epoch)


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_shard_names_the_file(shards, tmp_path, cut):
    root, _ = shards
    shutil.copytree(root, tmp_path / "s")
    victim = tmp_path / "s" / "train-000002.tar"
    data = victim.read_bytes()
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    # mid_member: inside an image's data; member_boundary: right before the 4th member's header,
    # which tarfile reads as a clean end of archive (caught by the manifest count)
    size = members[6].offset_data + 100 if cut == "mid_member" else members[3].offset
    victim.write_bytes(data[:size])
    with pytest.raises(DataError, match=r"train-000002\.tar"):
        read_epoch(tmp_path / "s")


def test_worker_data_error_stays_one_line(shards, tmp_path):
    root, _ = shards
    shutil.copytree(root, tmp_path / "s")
    victim = tmp_path / "s" / "train-000004.tar"
    victim.write_bytes(victim.read_bytes()[:1500])
    loader = make_loader(ShardStream(tmp_path / "s", batch_per_device=4, num_workers=1))
    with pytest.raises(DataError) as caught:
        take(loader, 10)
    assert "\n" not in str(caught.value) and "train-000004.tar" in str(caught.value)


def test_undecodable_image_names_the_shard_and_can_be_skipped(tmp_path):
    write_shards(tmp_path, {"train": [4, 4]})
    victim = tmp_path / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    png = data.find(b"\x89PNG")
    data[png : png + 64] = b"\0" * 64  # the first image of the shard is garbage now
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000001\.tar: sample img_000004 cannot be decoded"):
        read_epoch(tmp_path)
    stream = ShardStream(tmp_path, batch_per_device=4, skip_bad_samples=True)
    with pytest.warns(UserWarning, match="img_000004"):
        batches = take(stream, stream.batches_per_epoch)
    assert len(batches) == 2 and stream.bad_samples == 1


def test_bench_read_reports_images_per_second(shards):
    root, _ = shards
    result = bench_read(root, batch=8, seconds=0.2)
    assert result["images_per_s"] > 0 and result["images"] % 8 == 0
