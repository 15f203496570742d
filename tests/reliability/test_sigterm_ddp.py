"""Item 2: SIGTERM/SIGINT under a 2-process launch: both ranks finish the step, write one
checkpoint and exit 0; the resumed run continues the step count and the same W&B run. The
launcher's exit code is the one launch/README.md documents:

- `python launch/accelerate_launch.py` (the documented launcher) exits 0 with no traceback, for
  SIGTERM sent to every process of the job at once, as SLURM does (`--signal`, `scancel`: the
  launcher, the trainers, their loader workers, W&B's service), and for SIGINT sent to the
  launcher alone, as a Ctrl-C does (each torchrun worker runs in a session of its own, so the
  terminal's SIGINT reaches only the launcher);
- plain `accelerate launch` forwards the signal to its workers, which checkpoint and exit 0, and
  then exits 1 with torchrun's `SignalException` traceback (torch
  `elastic/agent/server/api.py` re-raises it): checked in test_exact_resume_ddp.py, whose
  preemption goes through it.
"""

from __future__ import annotations

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
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _stop_after(cmd: list[str], out, rows: int, targets) -> tuple[int, str, str]:
    """Start `cmd`, wait for `rows` metrics rows, signal `targets(proc)` ([(process, signal)]),
    return (exit code, stdout, stderr)."""
    proc = start(cmd)
    try:
        wait_for(lambda: metric_rows(out) >= rows, proc)
        for p, sig in targets(proc):
            p.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            stop(proc)
    return proc.returncode, stdout, stderr


def _every_process(sig):
    def targets(proc):
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(job) >= 5, job  # launcher, 2 trainers, their loader workers (+ W&B)
        return [(p, sig) for p in job]

    return targets


def _launcher_only(sig):
    return lambda proc: [(proc, sig)]


def test_stop_signals_two_processes_exit_codes_checkpoint_and_resume(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    out = tmp_path / "run"
    common = ["--out", str(out), "--wandb-mode", "offline"]

    def port():
        return ["--main_process_port", str(free_port())]

    # ---- 1. the documented launcher, SIGTERM to every process of the job (SLURM) ----
    cmd = launch_cmd("--data", str(shards), *common, *TINY, "--ckpt-every", "100000",
                     "--max-steps", "100000", launcher_args=port(), wrapper=True)  # fmt: skip
    rc, stdout, stderr = _stop_after(cmd, out, 3, _every_process(signal.SIGTERM))
    assert rc == 0 and "Traceback" not in stderr, (rc, stderr[-3000:])
    assert "stopped by SIGTERM" in stderr, stderr[-3000:]
    assert stdout.startswith("preempted: step "), stdout  # rank 0 returned normally
    [ckpt] = complete_checkpoints(out)
    first = state(ckpt)
    s1 = first["step"]
    assert s1 >= 3 and first["world_size"] == 2 and len(first["rank_param_sha256"]) == 2
    assert first["rank_param_sha256"][0] == first["rank_param_sha256"][1]

    # ---- 2. the documented launcher, resumed, SIGINT to the launcher alone (Ctrl-C) ----
    cmd = launch_cmd(*common, "--resume", "auto", launcher_args=port(), wrapper=True)
    rc, stdout, stderr = _stop_after(cmd, out, s1 + 3, _launcher_only(signal.SIGINT))
    assert rc == 0 and "Traceback" not in stderr, (rc, stderr[-3000:])
    assert f"steps {s1} ->" in stderr and "stopped by SIGINT" in stderr, stderr[-3000:]
    second = state(complete_checkpoints(out)[-1])
    s2 = second["step"]
    assert s2 >= s1 + 3 and second["images_seen"] == s2 * 16
    assert second["wandb_run_id"] == first["wandb_run_id"]

    assert metric_steps(out) == list(range(1, s2 + 1))  # no duplicated or missing rows
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + first["wandb_run_id"]) for r in runs)
