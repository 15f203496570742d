"""`facegan bench train|data` run in seconds on CPU with tiny settings and print a JSON line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from facegan_dist.cli import app
from tests.helpers.shards import write_tiny_shards

runner = CliRunner()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_bench_train_prints_valid_json(tmp_path):
    shards = write_tiny_shards(tmp_path / "s", n=32, size=16)
    args = ["bench", "train", "--preset", "demo", "--g-width", "8", "--d-width", "8",
            "--batch", "8", "--steps", "2", "--rounds", "1", "--warmup", "1",
            "--data", str(shards), "--data-cache", "device"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    r = last_json(res.stdout)
    assert r["bench"] == "train" and r["resolution"] == 16 and r["batch"] == 8
    for k in ("ours_images_per_s", "plain_images_per_s", "ours_end_to_end_images_per_s"):
        assert r[k] > 0
    assert r["ratio_ours_over_plain"] == r["ours_images_per_s"] / r["plain_images_per_s"]
    assert r["projected_hours"] > 0 and r["peak_memory_mb"] > 0
    # the configured step was checked against the eager fp32 step on the same inputs
    assert r["check_steps"] == 2 and r["check_ok"] is True
    assert 0 <= r["check_max_loss_diff"] <= r["check_tolerance"]
    assert "agreement with the eager fp32 step over 2 steps" in res.stdout


def test_bench_data_prints_valid_json():
    res = runner.invoke(app, ["bench", "data", "--count", "20", "--size", "16",
                              "--read-seconds", "0.3", "--workers", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = last_json(res.stdout)
    assert r["bench"] == "data" and r["images"] == 20
    assert r["shard_images_per_s"] > 0 and r["read_images_per_s_per_process"] > 0


def test_bench_bad_flag_is_one_line():
    res = runner.invoke(app, ["bench", "train", "--steps", "0"])
    assert res.exit_code == 1
    assert res.stderr.strip() == "error: --steps 0 must be at least 1"


def test_bench_bad_values_are_one_line_before_any_work():
    """Checked before the accelerator, the models or the synthetic dataset exist."""
    cases = {
        ("bench", "train", "--precision", "fp8"): "error: --precision 'fp8' must be one of no, ",
        ("bench", "train", "--preset", "cgan"): "(conditional presets are not benchmarked)",
        ("bench", "train", "--preset", "nope"): "error: --preset 'nope' must be one of paper-",
        ("bench", "data", "--format", "gif"): "error: --format 'gif' must be one of jpg, png",
        ("bench", "data", "--size", "20"): "error: --size 20 must be one of 16, 32",
        ("bench", "data", "--workers", "0"): "error: --workers 0 must be at least 1",
    }
    for args, needle in cases.items():
        res = runner.invoke(app, list(args))
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 1 and len(lines) == 1 and needle in lines[0], (args, res.output)
