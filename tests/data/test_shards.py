"""Shard writing: round trips per source shape, exact pixels, shuffling, bad input, resume, verify.

Tiny on purpose (16-32 px, --shard-size 7 so every split has several shards or a partial one).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegan_dist.config import ShardConfig
from facegan_dist.data.attributes import ATTRIBUTE_NAMES
from facegan_dist.data.celeba import open_source
from facegan_dist.data.shards import (
    BadImageError,
    crop_box,
    draft_scale,
    process_image,
    verify_shards,
    write_shards,
)
from facegan_dist.errors import ConfigError, DataError
from tests.data.test_celeba import kaggle_tables, make_official_zip, official_tables

REPO = Path(__file__).resolve().parents[2]


def shard(src: Path, out: Path, **kw) -> object:
    cfg = ShardConfig(src=src, out=out, **{"size": 16, "shard_size": 7, "workers": 1, **kw})
    return write_shards(cfg)


def read_tar(path: Path) -> list[dict[str, bytes]]:
    """Samples of one shard, in order, grouped by key with tarfile (independent of the writer)."""
    samples: list[dict[str, bytes]] = []
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tf.extractfile(m).read()
    return samples


def read_split(out: Path, split: str) -> list[dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for sh in manifest["splits"][split]["shards"]:
        got = read_tar(out / sh["name"])
        assert len(got) == sh["count"]
        samples += got
    assert len(samples) == manifest["splits"][split]["count"]
    return samples


def tree_digest(out: Path) -> dict[str, str]:
    """sha256 of every file under `out` (hidden .state included)."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


# ----------------------------------------------------------------------------- geometry


def test_crop_boxes():
    assert crop_box(178, 218, "celeba") == (25, 57, 153, 185)
    assert crop_box(356, 436, "celeba") == (50, 114, 306, 370)  # scaled proportionally
    assert crop_box(178, 218, "center") == (0, 20, 178, 198)
    assert crop_box(300, 200, "center") == (50, 0, 250, 200)
    assert crop_box(178, 218, "none") == (0, 0, 178, 218)


def test_draft_scale_keeps_2x_oversampling():
    assert draft_scale(128, 128, 16) == 4  # 32 px decoded box for a 16 px output
    assert draft_scale(128, 128, 32) == 2
    assert draft_scale(128, 128, 64) == 1
    assert draft_scale(1024, 1024, 64) == 8
    assert draft_scale(1024, 100, 16) == 2  # the short side decides


def test_process_image_bench_api(synth_kaggle_dir):
    data = (synth_kaggle_dir / "img_align_celeba" / "img_align_celeba" / "000001.jpg").read_bytes()
    for fmt, pil in (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")):
        im = Image.open(io.BytesIO(process_image(data, 32, "celeba", fmt, 90, True)))
        assert im.format == pil and im.size == (32, 32) and im.mode == "RGB"
    with pytest.raises(BadImageError, match="not an image"):
        process_image(b"hello", 32, "auto", "jpg", 90, True)
    with pytest.raises(BadImageError, match="truncated"):
        process_image(data[: len(data) // 2], 32, "auto", "jpg", 90, True)


# ----------------------------------------------------------------------------- round trips


def _check_roundtrip(out: Path, attrs: dict[str, str] | None, parts: dict[str, int] | None,
                     ids: set[str], size: int, fmt: str = "jpg") -> None:  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    seen = set()
    for split, entry in manifest["splits"].items():
        assert [s["name"] for s in entry["shards"]] == [
            f"{split}-{i:06d}.tar" for i in range(len(entry["shards"]))
        ]
        for sample in read_split(out, split):
            key = sample["__key__"]
            seen.add(key)
            im = Image.open(io.BytesIO(sample[fmt]))
            assert im.size == (size, size) and im.mode == "RGB"
            partition = int(sample["partition.cls"])
            assert ("train", "val", "test")[partition] == split
            if attrs is None:
                assert "attrs.txt" not in sample and partition == 0
            else:
                assert sample["attrs.txt"].decode() == attrs[key + ".jpg"]
                assert partition == parts[key + ".jpg"]
    assert seen == ids
    assert manifest["total"] == len(ids)
    assert verify_shards(out).ok


def test_roundtrip_kaggle_zip(synth_kaggle_zip, synth_kaggle_dir, tmp_path):
    r = shard(synth_kaggle_zip, tmp_path / "out", workers=2)
    m = r.manifest
    assert m["source"] == {"path": str(synth_kaggle_zip.resolve()), "kind": "kaggle-zip"}
    assert m["attribute_names"] == list(ATTRIBUTE_NAMES)
    assert m["settings"]["crop"] == "celeba"
    assert set(m["splits"]) == {"train", "val", "test"}
    assert len(m["splits"]["train"]["shards"]) > 2
    attrs, parts = kaggle_tables(synth_kaggle_dir)
    ids = {k[:-4] for k in attrs}
    _check_roundtrip(tmp_path / "out", attrs, parts, ids, 16)


def test_roundtrip_kaggle_dir_with_webdataset(synth_kaggle_dir, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    shard(synth_kaggle_dir, out, size=32)
    attrs, parts = kaggle_tables(synth_kaggle_dir)
    _check_roundtrip(out, attrs, parts, {k[:-4] for k in attrs}, 32)
    # and the training library reads the same thing
    names = [
        s["name"]
        for s in json.loads((out / "manifest.json").read_text())["splits"]["val"]["shards"]
    ]
    ds = wds.WebDataset([str(out / n) for n in names], shardshuffle=False).decode("rgb8")
    got = list(ds)
    assert len(got) == sum(1 for p in parts.values() if p == 1)
    for s in got:
        assert s["jpg"].shape == (32, 32, 3)
        assert s["attrs.txt"] == attrs[s["__key__"] + ".jpg"]
        assert s["partition.cls"] == 1


def test_roundtrip_official_dir(synth_official_dir, tmp_path):
    shard(synth_official_dir, tmp_path / "out", size=32, format="webp")
    attrs, parts = official_tables(synth_official_dir)
    _check_roundtrip(tmp_path / "out", attrs, parts, {k[:-4] for k in attrs}, 32, "webp")


def test_roundtrip_official_zip(synth_official_dir, tmp_path):
    root = make_official_zip(synth_official_dir, tmp_path / "celeba")
    r = shard(root, tmp_path / "out", workers=2)
    assert r.manifest["source"]["kind"] == "official-zip"
    attrs, parts = official_tables(synth_official_dir)
    _check_roundtrip(tmp_path / "out", attrs, parts, {k[:-4] for k in attrs}, 16)


def test_roundtrip_plain_folder(plain_image_folder, tmp_path):
    r = shard(plain_image_folder, tmp_path / "out", format="png")
    m = r.manifest
    assert m["source"]["kind"] == "folder"
    assert m["attribute_names"] == []
    assert m["settings"]["crop"] == "center"  # auto on a plain folder
    assert list(m["splits"]) == ["train"]
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [7, 7, 6]
    _check_roundtrip(tmp_path / "out", None, None, {f"face_{i:03d}" for i in range(20)}, 16, "png")


def test_same_bytes_regardless_of_workers(synth_kaggle_zip, tmp_path):
    a = shard(synth_kaggle_zip, tmp_path / "a", workers=1)
    b = shard(synth_kaggle_zip, tmp_path / "b", workers=2)
    assert a.manifest == b.manifest
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (
        tmp_path / "b" / "manifest.json"
    ).read_bytes()


def test_shard_is_what_one_tarwriter_writes(synth_kaggle_zip, tmp_path):
    """Workers build tar members per chunk and the main process concatenates them; the file must
    be byte-identical to one `wds.TarWriter` writing the same samples (fixed owner/mode/mtime)."""
    import webdataset as wds

    out = tmp_path / "out"
    shard(synth_kaggle_zip, out, shard_size=300, workers=2)  # 48 train samples, one shard
    for name in ("train-000000.tar", "val-000000.tar"):
        buf = io.BytesIO()
        with wds.TarWriter(buf, user="facegan", group="facegan", mode=0o444, mtime=0,
                           encoder=False, format="PAX_FORMAT") as tw:  # fmt: skip
            for sample in read_tar(out / name):
                tw.write(sample)
        assert (out / name).read_bytes() == buf.getvalue()
    with tarfile.open(out / "train-000000.tar") as tf:
        m = tf.getmembers()[0]
        assert (m.mtime, m.uname, m.gname, m.uid, m.gid, m.mode) == (
            0,
            "facegan",
            "facegan",
            0,
            0,
            0o444,
        )


# ----------------------------------------------------------------------------- exact pixels


def reference_pixels(path: Path, size: int, crop: str) -> np.ndarray:
    """The pipeline, spelled out with plain PIL: JPEG draft (DCT downscale) while the crop box
    stays >= 2x the target, then one LANCZOS resize of the crop box."""
    im = Image.open(path)
    w, h = im.size
    box = {"celeba": (25, 57, 153, 185), "none": (0, 0, w, h)}[crop]
    scale = 1
    while (
        scale < 8
        and (box[2] - box[0]) / (scale * 2) >= 2 * size
        and (box[3] - box[1]) / (scale * 2) >= 2 * size
    ):
        scale *= 2
    if scale > 1:
        im.draft("RGB", (w // scale, h // scale))
        assert im.size == (-(-w // scale), -(-h // scale))
        box = tuple(v / scale for v in box)
    im = im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS, box=box)
    return np.asarray(im)


@pytest.mark.parametrize(
    ("size", "crop"), [(128, "celeba"), (64, "celeba"), (16, "celeba"), (32, "none")]
)
def test_png_is_bit_exact(synth_kaggle_dir, tmp_path, size, crop):
    out = tmp_path / "out"
    shard(synth_kaggle_dir, out, size=size, crop=crop, format="png", split="val")
    img_dir = synth_kaggle_dir / "img_align_celeba" / "img_align_celeba"
    samples = read_split(out, "val")
    assert samples
    for s in samples:
        got = np.asarray(Image.open(io.BytesIO(s["png"])))
        np.testing.assert_array_equal(
            got, reference_pixels(img_dir / f"{s['__key__']}.jpg", size, crop)
        )


# ----------------------------------------------------------------------------- selection


def _keys(out: Path, split: str) -> list[str]:
    return [s["__key__"] for s in read_split(out, split)]


def test_shuffle_by_seed(synth_kaggle_zip, tmp_path):
    shard(synth_kaggle_zip, tmp_path / "s0", seed=0)
    shard(synth_kaggle_zip, tmp_path / "s1", seed=1)
    k0, k1 = _keys(tmp_path / "s0", "train"), _keys(tmp_path / "s1", "train")
    assert sorted(k0) == sorted(k1)
    assert k0 != k1
    first = read_tar(tmp_path / "s0" / "train-000000.tar")
    assert [s["__key__"] for s in first] != [f"{i:06d}" for i in range(1, 8)]
    assert [s["__key__"] for s in first] != sorted(s["__key__"] for s in first)


def test_limit_is_a_random_subset_per_split(synth_kaggle_zip, tmp_path):
    r0 = shard(synth_kaggle_zip, tmp_path / "l0", limit=10, seed=0)
    shard(synth_kaggle_zip, tmp_path / "l1", limit=10, seed=1)
    counts = {s: e["count"] for s, e in r0.manifest["splits"].items()}
    assert counts == {"train": 10, "val": 6, "test": 6}  # val/test have only 6 each
    t0, t1 = set(_keys(tmp_path / "l0", "train")), set(_keys(tmp_path / "l1", "train"))
    assert t0 != t1
    assert t0 != {f"{i:06d}" for i in range(1, 11)}


def test_single_split(synth_kaggle_zip, plain_image_folder, tmp_path):
    r = shard(synth_kaggle_zip, tmp_path / "val", split="val")
    assert list(r.manifest["splits"]) == ["val"]
    assert {int(s["partition.cls"]) for s in read_split(tmp_path / "val", "val")} == {1}
    with pytest.raises(ConfigError, match="--split test.*all 'train'"):
        shard(plain_image_folder, tmp_path / "plain", split="test")


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def damaged_kaggle_dir(synth_kaggle_dir, tmp_path) -> Path:
    """Kaggle folder with a truncated JPEG (000003) and a text file named 000005.jpg."""
    root = shutil.copytree(synth_kaggle_dir, tmp_path / "damaged")
    img_dir = root / "img_align_celeba" / "img_align_celeba"
    data = (img_dir / "000003.jpg").read_bytes()
    (img_dir / "000003.jpg").write_bytes(data[: len(data) // 2])
    (img_dir / "000005.jpg").write_text("this is not a JPEG\n")
    return root


def test_bad_images_are_skipped_and_reported(damaged_kaggle_dir, tmp_path):
    r = shard(damaged_kaggle_dir, tmp_path / "out", workers=2)
    skipped = r.manifest["skipped"]
    assert [s["file"] for s in skipped] == [
        "img_align_celeba/img_align_celeba/000003.jpg",
        "img_align_celeba/img_align_celeba/000005.jpg",
    ]
    assert "truncated" in skipped[0]["reason"]
    assert "not an image" in skipped[1]["reason"]
    assert r.manifest["total"] == 58
    keys = {
        s["__key__"] for split in r.manifest["splits"] for s in read_split(tmp_path / "out", split)
    }
    assert "000003" not in keys and "000005" not in keys and len(keys) == 58
    assert verify_shards(tmp_path / "out").ok


def test_bad_image_strict_is_fatal(damaged_kaggle_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(
        DataError, match=r"0000(03|05)\.jpg: (truncated|not an image).*--strict"
    ) as exc:
        shard(damaged_kaggle_dir, out, strict=True)
    assert "\n" not in str(exc.value)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))


def test_mismatched_attributes_touch_nothing(synth_kaggle_dir, tmp_path):
    root = shutil.copytree(synth_kaggle_dir, tmp_path / "k")
    (root / "img_align_celeba" / "img_align_celeba" / "000010.jpg").unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"list_attr_celeba\.csv lists 1 image.*000010\.jpg"):
        shard(root, out)
    assert not out.exists()


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        shard(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        shard(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_settings_name_the_flag(synth_kaggle_zip, tmp_path):
    with pytest.raises(ConfigError, match="--size 48"):
        shard(synth_kaggle_zip, tmp_path / "out", size=48)
    with pytest.raises(ConfigError, match="--crop"):
        shard(synth_kaggle_zip, tmp_path / "out", crop="face")


# Root ignores permission bits: as root the check runs in a child that keeps uid 0 but loses the
# capabilities that override them (setpriv, util-linux), so it runs on CI containers too.
_NO_DAC = "-dac_override,-dac_read_search"
_UNWRITABLE = """
import sys
from facegan_dist.config import ShardConfig
from facegan_dist.data.shards import write_shards
from facegan_dist.errors import ConfigError
for out in sys.argv[2:]:
    try:
        write_shards(ShardConfig(src=sys.argv[1], out=out, size=16, workers=1))
    except ConfigError as exc:
        print(exc)
"""


def test_unwritable_output(synth_kaggle_zip, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    outs = [locked / "out", locked]
    try:
        if not os.access(locked, os.W_OK):
            messages = []
            for out in outs:
                with pytest.raises(ConfigError, match="--out") as exc:
                    shard(synth_kaggle_zip, out)
                messages.append(str(exc.value))
        else:
            if os.geteuid() != 0 or shutil.which("setpriv") is None:
                pytest.fail("chmod 500 has no effect and setpriv cannot drop root's override")
            args = ["setpriv", "--bounding-set", _NO_DAC, "--inh-caps", _NO_DAC, sys.executable,
                    "-c", _UNWRITABLE, str(synth_kaggle_zip), *map(str, outs)]  # fmt: skip
            p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0 and not p.stderr, p.stderr
            messages = p.stdout.splitlines()
        assert len(messages) == 2, messages
        assert messages[0].startswith(f"--out {outs[0]}: cannot create the folder"), messages
        assert messages[1] == f"--out {locked}: the folder is not writable", messages
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_out_that_is_a_file_or_under_one(synth_kaggle_zip, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*/file: is a file, not a folder"):
        shard(synth_kaggle_zip, tmp_path / "file")
    with pytest.raises(ConfigError, match=r"--out .*/file/sub: .*/file is a file, not a folder"):
        shard(synth_kaggle_zip, tmp_path / "file" / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert (tmp_path / "file").read_text() == "x"


def test_different_settings_refused_and_untouched(synth_kaggle_zip, plain_image_folder, tmp_path):
    out = tmp_path / "out"
    shard(synth_kaggle_zip, out, size=16)
    before = tree_digest(out)
    with pytest.raises(ConfigError, match=r"was written with --size 16 \(this run: --size 32"):
        shard(synth_kaggle_zip, out, size=32)
    with pytest.raises(ConfigError, match="--seed 0.*--seed 3"):
        shard(synth_kaggle_zip, out, seed=3)
    with pytest.raises(ConfigError, match="was written from"):
        shard(plain_image_folder, out)
    assert tree_digest(out) == before
    # A half-finished run (no manifest yet) is protected the same way, through .state/run.json.
    (out / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="--format jpg"):
        shard(synth_kaggle_zip, out, format="png")


# ----------------------------------------------------------------------------- resume


def test_resume_after_simulated_kill(synth_kaggle_zip, tmp_path):
    ref = tmp_path / "ref"
    shard(synth_kaggle_zip, ref)
    out = tmp_path / "out"
    first = shard(synth_kaggle_zip, out, workers=2)
    assert (first.kept, first.written) == (0, 9)
    manifest = (out / "manifest.json").read_bytes()
    assert manifest == (ref / "manifest.json").read_bytes()

    # identical re-run: everything kept, nothing rewritten, same manifest
    stats = shard_stats(out)
    again = shard(synth_kaggle_zip, out)
    assert (again.kept, again.written, again.images_processed) == (9, 0, 0)
    assert shard_stats(out) == stats
    assert (out / "manifest.json").read_bytes() == manifest

    # "kill": no manifest, one shard gone, a partial temp file of another
    (out / "manifest.json").unlink()
    (out / "train-000002.tar").unlink()
    (out / "train-000004.tar.tmp").write_bytes((out / "train-000004.tar").read_bytes()[:700])
    (out / "train-000004.tar").unlink()
    stats = shard_stats(out)
    resumed = shard(synth_kaggle_zip, out)
    assert (resumed.kept, resumed.written) == (7, 2)
    after = shard_stats(out)
    assert {k: after[k] for k in stats} == stats  # kept shards are the very same files
    assert (out / "manifest.json").read_bytes() == manifest
    assert not list(out.glob("*.tmp"))
    assert verify_shards(out).ok


def test_resume_redoes_corrupted_or_changed_shards(synth_kaggle_dir, tmp_path):
    src = shutil.copytree(synth_kaggle_dir, tmp_path / "src")
    out = tmp_path / "out"
    shard(src, out)
    manifest = (out / "manifest.json").read_bytes()
    data = bytearray((out / "val-000000.tar").read_bytes())
    data[600] ^= 0xFF
    (out / "val-000000.tar").write_bytes(bytes(data))
    r = shard(src, out)
    assert (r.kept, r.written) == (8, 1)
    assert (out / "manifest.json").read_bytes() == manifest
    # an image changed under the same name -> the shard holding it is redone
    img = src / "img_align_celeba" / "img_align_celeba" / "000001.jpg"
    Image.open(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(img, quality=90)
    r = shard(src, out)
    assert (r.kept, r.written) == (8, 1)
    assert verify_shards(out).ok


def _make_slow_folder(plain_image_folder: Path, root: Path, copies: int) -> Path:
    root.mkdir()
    for p in sorted(plain_image_folder.rglob("*.jpg")):
        for c in range(copies):
            shutil.copy(p, root / f"{p.stem}_{c:02d}.jpg")
    return root


@pytest.mark.slow
def test_resume_after_real_sigkill(plain_image_folder, tmp_path):
    """A real `facegan shard` process killed with SIGKILL mid-run, then re-run: same manifest as an
    uninterrupted run, shards finished before the kill are kept untouched."""
    src = _make_slow_folder(plain_image_folder, tmp_path / "src", copies=15)  # 300 images
    out = tmp_path / "out"
    args = [sys.executable, "-m", "facegan_dist", "shard", str(src), "--out", str(out),
            "--size", "256", "--crop", "none", "--format", "png", "--shard-size", "10",
            "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / ".state").glob("train-*.json"))) >= 3:
                break
            time.sleep(0.005)
        if proc.poll() is not None:
            pytest.fail(f"shard process ended before it could be killed: {proc.stderr.read()!r}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "manifest.json").exists(), "a killed run must not leave a manifest"
    done = {p.name[:-5] for p in (out / ".state").glob("train-*.json")}
    assert len(done) >= 3
    stats = {k: v for k, v in shard_stats(out).items() if k in done}

    r = write_shards(
        ShardConfig(src=src, out=out, size=256, crop="none", format="png", shard_size=10, workers=2)
    )
    assert r.kept >= len(done) and r.kept + r.written == 30
    after = shard_stats(out)
    assert {k: after[k] for k in stats} == stats
    ref = write_shards(
        ShardConfig(src=src, out=tmp_path / "ref", size=256, crop="none", format="png",
                    shard_size=10, workers=2)
    )  # fmt: skip
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()
    assert ref.manifest["total"] == 300


def test_failed_manifest_write_leaves_no_temp_file_and_resumes(synth_kaggle_zip, tmp_path,
                                                              monkeypatch):  # fmt: skip
    """The disk fills up as the manifest is written: one line naming manifest.json, its temp file
    removed, the shards kept; the next run writes the same manifest. (Shard writes under a real
    file size limit, with 1 and 2 workers: tests/cli/test_shard_cli.py.)"""
    import facegan_dist.data.shards as shards_mod

    out = tmp_path / "out"
    shard(synth_kaggle_zip, out)
    reference = (out / "manifest.json").read_bytes()
    (out / "manifest.json").unlink()
    real_dump = json.dump

    def dump(obj, f, **kw):
        if Path(f.name).name.startswith("manifest.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dump(obj, f, **kw)

    monkeypatch.setattr(shards_mod.json, "dump", dump)
    with pytest.raises(DataError) as exc:
        shard(synth_kaggle_zip, out)
    assert str(exc.value) == (
        f"cannot write {out / 'manifest.json'}: No space left on device; finished shards are "
        "kept: free some space and re-run the same command to resume"
    )
    assert not (out / "manifest.json").exists()
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == []
    monkeypatch.undo()
    r = shard(synth_kaggle_zip, out)
    assert (r.kept, r.written) == (9, 0)
    assert (out / "manifest.json").read_bytes() == reference


# ----------------------------------------------------------------------------- verify


def test_verify_catches_flipped_byte_missing_and_stray(synth_kaggle_zip, tmp_path):
    out = tmp_path / "out"
    shard(synth_kaggle_zip, out)
    report = verify_shards(out)
    assert report.ok and report.shards == 9 and report.samples == 60

    data = bytearray((out / "train-000003.tar").read_bytes())
    data[len(data) // 3] ^= 0x01
    (out / "train-000003.tar").write_bytes(bytes(data))
    (out / "test-000000.tar").unlink()
    shutil.copy(out / "val-000000.tar", out / "val-000001.tar")
    problems = dict(verify_shards(out).problems)
    assert "sha256" in problems["train-000003.tar"]
    assert problems["test-000000.tar"] == "missing"
    assert "stray" in problems["val-000001.tar"]
    assert len(problems) == 3


def test_verify_recounts_samples(tmp_path, synth_kaggle_zip):
    out = tmp_path / "out"
    shard(synth_kaggle_zip, out)
    import webdataset as wds  # an independent reader counts the samples

    assert sum(1 for _ in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)) == 7
    # a manifest that lies about a count (hash and size still right) is caught by the recount
    m = json.loads((out / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["count"] = 8
    m["splits"]["train"]["count"] += 1
    m["total"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    assert dict(verify_shards(out).problems) == {"train-000000.tar": "7 samples != manifest 8"}


@pytest.fixture(scope="module")
def sharded(synth_kaggle_zip, tmp_path_factory) -> Path:
    """A finished shard folder of the 60-image zip, shared read-only."""
    out = tmp_path_factory.mktemp("sharded") / "out"
    shard(synth_kaggle_zip, out)
    return out


def _set(path: str, value):
    """A manifest edit: `path` like "splits.train.shards.0.count"; value _DEL deletes it."""

    def edit(m: dict) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in parents:
            m = m[k]
        if value is _DEL:
            del m[last]
        else:
            m[last] = value

    return edit


_DEL = object()
_FIELD = "splits.train.shards[0]"


@pytest.mark.parametrize(
    "edit,problem",
    [
        (_set("splits.train.shards.0.count", _DEL), f"{_FIELD} has no 'count'"),
        (_set("splits.train.shards.0.count", "7"),
         f'{_FIELD}.count is a string "7", expected an integer >= 0'),
        (_set("splits.train.shards.0.bytes", -1), f"{_FIELD}.bytes is an integer -1, expected"),
        (_set("splits.train.shards.0.sha256", None), f"{_FIELD}.sha256 is null, expected a string"),
        (_set("splits.train.shards.0.name", 3), f"{_FIELD}.name is an integer 3, expected a str"),
        (_set("splits.train.shards.0", "train-000000.tar"), f"{_FIELD} is a string"),
        (_set("splits.train.shards", {}), "splits.train.shards is an object {}, expected a list"),
        (_set("splits.train.count", True), "splits.train.count is a boolean true, expected an"),
        (_set("splits.val", []), "splits.val is a list [], expected an object"),
        (_set("splits", None), "splits is null, expected an object"),
        (_set("settings.size", 0), "settings.size is an integer 0, expected an integer >= 1"),
        (_set("settings", _DEL), "the manifest has no 'settings'"),
        (_set("attribute_names", [1]), "attribute_names[0] is an integer 1, expected a string"),
        (_set("total", _DEL), "the manifest has no 'total'"),
        (_set("format_version", _DEL), "the manifest has no 'format_version'"),
    ],
)  # fmt: skip
def test_verify_names_the_malformed_manifest_field(sharded, tmp_path, edit, problem):
    """Every field verify reads is checked in one place (stream.read_manifest): a malformed one
    is one line naming manifest.json and the field (a missing count was a KeyError)."""
    out = tmp_path / "out"
    (out / ".state").mkdir(parents=True)  # the manifest is refused before any shard is read
    shutil.copy(sharded / ".state" / "run.json", out / ".state" / "run.json")
    m = json.loads((sharded / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as exc:
        verify_shards(out)
    message = str(exc.value)
    assert message.startswith(f"{out / 'manifest.json'}: {problem}"), message
    assert "\n" not in message and "re-run the `facegan shard` command" in message


def test_verify_without_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        verify_shards(tmp_path)


def test_open_source_is_what_the_writer_uses(synth_kaggle_zip):
    # sanity for the shared API: the source listing feeds the plan
    assert len(open_source(synth_kaggle_zip).samples) == 60
