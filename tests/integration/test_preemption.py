"""SIGTERM (preemption) finishes the step, checkpoints, exits 0; the run resumes from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.shards import write_tiny_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_sigterm_checkpoints_and_resumes(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    out = tmp_path / "run"
    args = ["--data", str(shards), "--out", str(out), "--preset", "demo", "--g-width", "8",
            "--d-width", "8", "--batch", "16", "--num-workers", "1", "--log-every", "1",
            "--ckpt-every", "100000", "--sample-every", "100000",
            "--wandb-mode", "offline"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "facegan_dist", "train", *args, "--max-steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "stopped by SIGTERM" in stderr.decode()
    [ckpt] = list((out / "checkpoints").iterdir())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    stopped_at = state["step"]
    assert 3 <= stopped_at < 100000 and ckpt.name == f"step-{stopped_at:09d}"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert rows[-1]["step"] == stopped_at  # the interrupted step was finished and logged
    assert not (out / "export").exists()  # a preempted run is not "done"

    # resume: the same W&B run id, the step counter continues
    cmd = [sys.executable, "-m", "facegan_dist", "train", "--out", str(out), "--resume", "auto",
           "--max-steps", str(stopped_at + 3)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads(
        (out / "checkpoints" / f"step-{stopped_at + 3:09d}" / "trainer_state.json").read_text()
    )
    assert final["wandb_run_id"] == state["wandb_run_id"]
    assert final["images_seen"] == (stopped_at + 3) * 16
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped_at + 4))  # no duplicated or missing rows
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(state["wandb_run_id"]) for r in runs)
