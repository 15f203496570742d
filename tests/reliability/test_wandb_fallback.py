"""Item 9: W&B must never stop a run.
- Online without a network: the run starts online (an API key, --wandb-mode online), the W&B
  server cannot be reached (a closed local port), and training goes on: logging falls back to an
  offline run with the same id and ONE warning line says so.
- W&B's service process (`wandb-core`) killed mid-run: training finishes, with one warning line;
  metrics.jsonl holds every step and the offline run holds what the service had written.
"""

from __future__ import annotations

import json
import signal

import psutil
import pytest

from tests.helpers.shards import write_tiny_shards
from tests.helpers.wandb_reader import read_history
from tests.reliability._common import (
    TINY,
    complete_checkpoints,
    env,
    free_port,
    metric_rows,
    metric_steps,
    run,
    start,
    state,
    stop,
    train_cmd,
    wait_for,
)


@pytest.mark.slow
def test_online_without_network_falls_back_to_offline(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=32, size=16)
    out = tmp_path / "run"
    closed = free_port()  # nothing listens there
    environ = env(
        WANDB_API_KEY="x" * 40,
        WANDB_BASE_URL=f"http://127.0.0.1:{closed}",
        WANDB_INIT_TIMEOUT="3",  # seconds wandb.init waits for the server (90 by default)
        HOME=str(tmp_path),  # no ~/.netrc or ~/.config/wandb of the machine
    )
    args = ["--data", str(shards), "--out", str(out), *TINY, "--ckpt-every", "100",
            "--max-steps", "6", "--wandb-mode", "online"]  # fmt: skip
    proc = run(train_cmd(*args), environ, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, proc.stderr[-3000:]
    run_id = state(complete_checkpoints(out)[-1])["wandb_run_id"]
    assert "W&B" in warnings[0] and "offline" in warnings[0] and run_id in warnings[0]
    assert metric_steps(out) == list(range(1, 7))
    [offline] = (out / "wandb").glob("offline-run-*")
    assert offline.name.endswith("-" + run_id)
    assert list(offline.glob("run-*.wandb"))


@pytest.mark.slow
def test_wandb_service_killed_mid_run_training_finishes(tmp_path):
    """kill -9 of the real `wandb-core` process while the run logs to it (SLURM, the OOM killer):
    the next W&B call fails, the logger warns once and goes on without W&B."""
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    out = tmp_path / "run"
    steps = 100
    args = ["--data", str(shards), "--out", str(out), *TINY, "--ckpt-every", "100000",
            "--max-steps", str(steps), "--wandb-mode", "offline"]  # fmt: skip
    proc = start(train_cmd(*args))

    def service_wrote_history() -> bool:
        # wandb-core writes the .wandb file in 32 KiB blocks: wait for the first one (~35 rows),
        # so the offline run has rows to read back; before that it holds only its header
        files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
        return bool(files) and files[0].stat().st_size > 7

    try:
        wait_for(service_wrote_history, proc)
        kids = psutil.Process(proc.pid).children(recursive=True)
        [core] = [k for k in kids if k.name() == "wandb-core"]
        helpers = [k for k in kids if k.name().startswith("wandb")]
        core.send_signal(signal.SIGKILL)
        killed_at = metric_rows(out)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "W&B stopped working" in warnings[0], stderr[-3000:]
    assert killed_at < steps  # the kill came mid-run
    assert (out / "export" / "generator.safetensors").is_file()  # the run finished
    # metrics.jsonl: every step, every line valid JSON
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # the offline run: readable, the same rows as metrics.jsonl up to where the service died
    [wandb_file] = out.glob("wandb/offline-run-*/run-*.wandb")
    history = [h for h in read_history(wandb_file) if "loss_d" in h]
    assert history and [h["step"] for h in history] == list(range(1, len(history) + 1))
    assert len(history) <= killed_at
    for h in history:
        assert h["loss_d"] == rows[h["step"] - 1]["loss_d"]
    # and nothing of W&B outlives the run: its system monitor notices its dead parent at its next
    # poll (seen alive just after the run on a loaded machine), so allow it a few seconds
    _, alive = psutil.wait_procs(helpers, timeout=15)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
