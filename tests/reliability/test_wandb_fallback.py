"""Item 9: W&B online without a network. The run starts online (an API key, --wandb-mode online),
the W&B server cannot be reached (a closed local port), and training goes on: logging falls back
to an offline run with the same id and ONE warning line says so."""

from __future__ import annotations

import pytest

from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import (
    TINY,
    complete_checkpoints,
    env,
    free_port,
    metric_steps,
    run,
    state,
    train_cmd,
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


def test_wandb_dying_mid_run_is_one_warning_and_logging_goes_on(tmp_path, capsys):
    """W&B's service killed during the run (SLURM signals every process of a job at preemption):
    the next W&B call raises; the logger warns once, drops W&B and keeps metrics.jsonl."""
    from facegan_dist.tracking import RunLogger

    class Tracker:
        name = "wandb"

    class Acc:
        is_main_process = True
        trackers = [Tracker()]
        calls = 0

        def log(self, values, step=None):
            Acc.calls += 1
            raise ConnectionResetError("Connection lost")

    acc = Acc()
    logger = RunLogger(acc, tmp_path, mode="disabled", project="p", run_name="r", run_id="abc",
                       config={})  # fmt: skip
    logger.mode = "offline"  # as if W&B had started
    for step in (1, 2, 3):
        logger.log({"step": step, "loss_d": 1.0}, step)
    logger.summary({"final_step": 3})
    assert metric_steps(tmp_path) == [1, 2, 3]
    assert Acc.calls == 1 and acc.trackers == []  # no finish() on the broken run at the end
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "ConnectionResetError" in warnings[0], warnings
