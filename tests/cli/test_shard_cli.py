"""`facegan shard` / `facegan verify` end to end: summaries, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from facegan_dist.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def shard(src: Path, out: Path, *extra: str):
    return run("shard", src, "--out", out, "--size", "16", "--shard-size", "7", "--workers", "2",
               "--no-progress", *extra)  # fmt: skip


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_shard_summary_then_resume(synth_kaggle_zip, tmp_path):
    out = tmp_path / "out"
    r = shard(synth_kaggle_zip, out)
    assert r.exit_code == 0, r.output
    text = r.stdout
    assert "kept 0, wrote 9 shard(s)" in text
    assert "train       48 images     7 shards" in text
    assert "val          6 images     1 shard" in text
    assert "skipped 0 images" in text
    assert "images/s" in text
    assert f"output: {out}" in text
    assert (out / "manifest.json").is_file()

    r = shard(synth_kaggle_zip, out)
    assert r.exit_code == 0, r.output
    assert "kept 9, wrote 0 shard(s)" in r.stdout

    r = run("verify", out)
    assert r.exit_code == 0 and r.stdout.startswith("OK: 9 shards, 60 samples")


def test_verify_names_bad_shards(synth_kaggle_zip, tmp_path):
    out = tmp_path / "out"
    assert shard(synth_kaggle_zip, out).exit_code == 0
    data = bytearray((out / "train-000001.tar").read_bytes())
    data[1234] ^= 0x10
    (out / "train-000001.tar").write_bytes(bytes(data))
    (out / "val-000000.tar").unlink()
    r = run("verify", out)
    assert r.exit_code == 1
    assert "BAD train-000001.tar: sha256" in r.stdout
    assert "BAD val-000000.tar: missing" in r.stdout
    assert "error: 2 problem(s)" in r.stderr


def test_verify_not_a_shard_folder(tmp_path):
    assert_one_line_error(run("verify", tmp_path), "no manifest.json", str(tmp_path))


def test_plain_folder_png(plain_image_folder, tmp_path):
    r = run("shard", plain_image_folder, "--out", tmp_path / "o", "--size", "32", "--format", "png",
            "--workers", "1", "--limit", "5", "--seed", "3")  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["splits"]["train"]["count"] == 5
    assert m["settings"] == {"size": 32, "crop": "center", "format": "png", "quality": 95,
                             "limit": 5, "split": "all", "shard_size": 5000, "seed": 3}  # fmt: skip


def test_missing_source(tmp_path):
    assert_one_line_error(
        shard(tmp_path / "nowhere", tmp_path / "out"), "nowhere", "does not exist"
    )


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(shard(tmp_path / "empty", tmp_path / "out"), "no images", "empty")


def test_mismatched_attribute_ids(synth_kaggle_dir, tmp_path):
    src = shutil.copytree(synth_kaggle_dir, tmp_path / "k")
    for n in (4, 8, 15):
        (src / "img_align_celeba" / "img_align_celeba" / f"{n:06d}.jpg").unlink()
    r = shard(src, tmp_path / "out")
    assert_one_line_error(r, "list_attr_celeba.csv", "3 image(s)", "000004.jpg")
    assert not (tmp_path / "out").exists()


def test_bad_images_skipped_or_strict(synth_kaggle_zip, synth_kaggle_dir, tmp_path):
    src = shutil.copytree(synth_kaggle_dir, tmp_path / "k")
    img = src / "img_align_celeba" / "img_align_celeba" / "000009.jpg"
    img.write_bytes(img.read_bytes()[:900])
    r = shard(src, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "skipped 1 bad image(s)" in r.stdout
    assert "img_align_celeba/img_align_celeba/000009.jpg: truncated" in r.stdout
    r = shard(src, tmp_path / "strict", "--strict")
    assert_one_line_error(r, "000009.jpg", "truncated", "--strict")
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_different_settings_refused(synth_kaggle_zip, tmp_path):
    out = tmp_path / "out"
    assert shard(synth_kaggle_zip, out).exit_code == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    r = run("shard", synth_kaggle_zip, "--out", out, "--size", "32", "--shard-size", "7",
            "--no-progress")  # fmt: skip
    assert_one_line_error(r, str(out), "--size 16", "--size 32", "use a new --out")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_bad_flag_values(synth_kaggle_zip, tmp_path):
    assert_one_line_error(shard(synth_kaggle_zip, tmp_path / "o", "--format", "gif"), "--format")
    assert_one_line_error(shard(synth_kaggle_zip, tmp_path / "o", "--quality", "0"), "--quality")
    assert_one_line_error(shard(synth_kaggle_zip, tmp_path / "o", "--split", "dev"), "--split")
    r = run("shard", synth_kaggle_zip, "--out", tmp_path / "o", "--size", "48")
    assert_one_line_error(r, "--size 48")


def test_unwritable_output(synth_kaggle_zip, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):
            r = shard(synth_kaggle_zip, locked / "out")
            assert_one_line_error(r, "cannot write to --out", str(locked / "out"))
            return
        # Root ignores permission bits: run the real CLI as root *without* the capabilities that
        # override them (uid 0 still owns and can read everything it made).
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("chmod has no effect here and setpriv is unavailable")
        caps = "-dac_override,-dac_read_search"
        args = ["setpriv", "--bounding-set", caps, "--inh-caps", caps,
                sys.executable, "-m", "facegan_dist", "shard", str(synth_kaggle_zip),
                "--out", str(locked / "out"), "--size", "16", "--no-progress"]  # fmt: skip
        p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        if "setpriv:" in p.stderr:
            pytest.skip(f"setpriv cannot drop capabilities here: {p.stderr.strip()}")
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot write to --out"), p.stderr
        assert str(locked / "out") in lines[0]
        assert not (locked / "out").exists()
    finally:
        locked.chmod(0o700)
