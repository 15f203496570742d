"""Item 2: SIGTERM under `accelerate launch` with 2 processes: both ranks finish the step, write
a checkpoint and exit 0; the resumed run continues the step count and the same W&B run.

Two deliveries, as they happen in practice:
- to EVERY process of the job at once, as SLURM does (`--signal`, `scancel`, the time limit: all
  processes of the step): the launcher, the trainers, their loader workers, W&B's service. The
  agent also forwards SIGTERM to each trainer's process group (`os.killpg`). Loader workers
  ignore it (`data/stream.py`), so the trainers finish the step and checkpoint; the launcher
  itself exits 1 with torchrun's `SignalException` traceback whatever its workers did
  (docs/RELIABILITY.md). Sending SIGTERM to the launcher alone is a subset of this.
- to the training processes only (what launch wrappers that forward signals do): everything,
  the launcher included, exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal

import psutil
import pytest

from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import (
    TINY,
    complete_checkpoints,
    free_port,
    launch_cmd,
    metric_rows,
    metric_steps,
    start,
    state,
    stop,
    wait_for,
    worker_pids,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _tracebacks(stderr: str) -> list[str]:
    """The exception line closing each traceback in the launcher's merged stderr."""
    lines = stderr.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            tail = [
                x
                for x in lines[i + 1 :]
                if re.match(r"^(\[rank\d\]: )?\w[\w.]*(Error|Exception)", x)
            ]
            found.append(tail[0] if tail else line)
    return found


def test_sigterm_two_processes_checkpoint_and_resume(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    out = tmp_path / "run"
    common = ["--out", str(out), "--wandb-mode", "offline"]
    port = ["--main_process_port", str(free_port())]

    # ---- 1. SIGTERM to every process of the job ----
    cmd = launch_cmd("--data", str(shards), *common, *TINY, "--ckpt-every", "100000",
                     "--max-steps", "100000", launcher_args=port)  # fmt: skip
    proc = start(cmd)
    try:
        wait_for(lambda: metric_rows(out) >= 3, proc)
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(job) >= 5, job  # launcher, 2 trainers, their loader workers (+ W&B)
        for p in job:
            p.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert "stopped by SIGTERM" in stderr, stderr[-3000:]
    assert re.search(r"^preempted: step \d+", stdout, re.M), stdout  # rank 0 returned normally
    [ckpt] = complete_checkpoints(out)
    first = state(ckpt)
    s1 = first["step"]
    assert s1 >= 3 and len(first["rank_param_sha256"]) == 2
    assert first["rank_param_sha256"][0] == first["rank_param_sha256"][1]
    # no worker failed: the only traceback allowed is the launcher's own, which torchrun raises
    # after its workers exited (pytorch: elastic/agent/server/api.py re-raises SignalException)
    errors = _tracebacks(stderr)
    if proc.returncode != 0:
        assert errors and all("SignalException" in e and "signal: 15" in e for e in errors), (
            proc.returncode,
            errors,
        )
    else:
        assert not errors, errors

    # ---- 2. resume; SIGTERM to the training processes: all of them exit 0 ----
    port = ["--main_process_port", str(free_port())]
    proc = start(launch_cmd(*common, "--resume", "auto", launcher_args=port))
    try:
        wait_for(lambda: metric_rows(out) >= s1 + 3, proc)
        pids = worker_pids(proc)
        assert sorted(pids) == [0, 1], pids
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"steps {s1} ->" in stderr and "stopped by SIGTERM" in stderr, stderr[-3000:]
    second = state(complete_checkpoints(out)[-1])
    s2 = second["step"]
    assert s2 >= s1 + 3 and second["images_seen"] == s2 * 16
    assert second["wandb_run_id"] == first["wandb_run_id"]
    assert metric_steps(out) == list(range(1, s2 + 1))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + first["wandb_run_id"]) for r in runs)
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
