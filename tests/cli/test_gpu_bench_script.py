"""scripts/gpu_bench.sh (the one command a GPU session runs) works end to end on CPU with tiny
settings: every configuration writes its JSON line with a passing agreement check, the training
run reports its images/s, and tests/gpu runs (skipped here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_script_smoke_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "WORK": str(tmp_path / "work"),
           "N": "200", "SIZE": "16", "STEPS": "2", "ROUNDS": "1", "WARMUP": "1", "BATCH": "16",
           "BIG_BATCH": "32", "PRESET": "demo", "TRAIN_STEPS": "12", "WORKERS": "1",
           "COMPILE": "0", "EXTRA": "--g-width 8 --d-width 8", "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(["bash", "scripts/gpu_bench.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["eager-fp32", "fast-fp32", "bf16", "bf16-compile",
                                         "bf16-compile-big", "stream", "device-cache"]  # fmt: skip
    assert all(r["check_ok"] and r["ours_images_per_s"] > 0 for r in rows)
    assert rows[-1]["data_cache"] == "device" and rows[-1]["ours_end_to_end_images_per_s"] > 0
    assert rows[4]["batch"] == 32 and rows[2]["precision"] == "bf16"
    summary = (out / "summary.txt").read_text()
    assert "fp16, cuda-graphs: skipped (no CUDA device)" in summary and "train: median" in summary
    assert "tests/gpu:" in summary and "FAILED" not in summary
    metrics = [json.loads(x) for x in (out / "train-metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 12
