"""Item 6 (the reader's half): a truncated, garbage or undecodable shard stops `facegan train` with
ONE `error:` line naming the .tar (exit 1, no traceback), also when the shard is read in a loader
worker process. (`--skip-bad-samples`, the other half, is wired by the training loop.)"""

from __future__ import annotations

import io
import tarfile

import pytest

from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import TINY, error_lines, run, train_cmd

pytestmark = pytest.mark.slow


def _truncate(tar):
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])


def _garbage(tar):
    tar.write_bytes(bytes(range(256)) * 40)


def _undecodable_image(tar):
    """A well-formed tar whose first image is not an image."""
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
    first_png = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(tar, "w") as dst:
        for m, data in members:
            if m.name == first_png:
                data = b"\x89PNG\r\n\x1a\n" + b"\0" * (len(data) - 8)
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize("damage", [_truncate, _garbage, _undecodable_image])
def test_bad_shard_is_one_line_error_naming_it(tmp_path, damage):
    shards = write_tiny_shards(tmp_path / "shards", n=32, size=16, per_shard=32)  # one shard
    [tar] = shards.glob("*.tar")
    damage(tar)
    args = ["--data", str(shards), "--out", str(tmp_path / "run"), *TINY,
            "--max-steps", "4", "--wandb-mode", "disabled"]  # fmt: skip
    proc = run(train_cmd(*args), timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    assert str(tar) in line, line
    if damage is _undecodable_image:
        assert "cannot be decoded" in line, line


def test_skip_bad_samples_counts_and_logs_them(tmp_path):
    import json

    shards = write_tiny_shards(tmp_path / "shards", n=32, size=16, per_shard=32)
    [tar] = shards.glob("*.tar")
    _undecodable_image(tar)
    args = ["--data", str(shards), "--out", str(tmp_path / "run"), *TINY,
            "--max-steps", "4", "--wandb-mode", "disabled", "--skip-bad-samples"]  # fmt: skip
    proc = run(train_cmd(*args), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_samples"] >= 1  # the damaged image was replaced, counted and logged
    assert "cannot be decoded" in proc.stderr and str(tar) in proc.stderr
