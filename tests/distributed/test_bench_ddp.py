"""`facegan bench train` under `accelerate launch` with 2 CPU processes: the DDP step, --batch per
process, images/s summed over processes, and one report (rank 0) instead of one per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_ddp import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_bench_train_two_processes_reports_once_with_global_numbers():
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "launch/cpu-2proc.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "facegan_dist", "bench", "train", "--preset", "demo", "--g-width", "8", "--d-width",
           "8", "--batch", "8", "--resolution", "16", "--steps", "3", "--rounds", "1",
           "--warmup", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # the main process alone reports
    r = json.loads(lines[0])
    assert r["world_size"] == 2 and r["batch_per_device"] == 8 and r["batch"] == 16
    assert r["check_ok"] is None and "2 processes" in r["check_skipped"]
    assert r["ours_images_per_s"] > 0 and r["plain_images_per_s"] > 0
    assert "batch 8 x 2 processes (DDP)" in proc.stdout
