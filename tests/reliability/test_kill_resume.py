"""Item 1: `kill -9` in the middle of a real checkpoint write, then `--resume auto` continues from
the newest COMPLETE checkpoint: the half-written `.tmp-step-*` folder is never picked, the next
save removes it, and metrics.jsonl ends with every step exactly once.

The kill lands inside the write: FACEGAN_TEST_SAVE_DELAY_S makes each save sleep after the tensor
files are written and before trainer_state.json and the rename (train/checkpoint.py)."""

from __future__ import annotations

import re
import signal

import pytest

from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import (
    TINY,
    complete_checkpoints,
    env,
    metric_steps,
    run,
    start,
    state,
    stop,
    train_cmd,
    wait_for,
)

pytestmark = pytest.mark.slow
DELAY_S = 3  # each save holds its half-written folder this long: the window for the kill


def test_sigkill_during_checkpoint_write_then_resume_auto(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = ["--data", str(shards), "--out", str(out), *TINY, "--ckpt-every", "2", "--keep", "3",
            "--wandb-mode", "disabled"]  # fmt: skip
    half = ckpts / ".tmp-step-000000004"

    def mid_write() -> bool:  # the save of step 4 has written its tensor files and sleeps
        names = {p.name for p in half.iterdir()} if half.is_dir() else set()
        return {"model.safetensors", "ema.safetensors", "fixed_noise.safetensors"} <= names

    proc = start(
        train_cmd(*args, "--max-steps", "100000"), env(FACEGAN_TEST_SAVE_DELAY_S=str(DELAY_S))
    )
    try:
        wait_for(lambda: bool(complete_checkpoints(out)), proc)  # step 2, written in full
        wait_for(mid_write, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == -signal.SIGKILL
    # what the kill left: a temp folder with tensors but no trainer_state.json, beside step 2
    assert half.is_dir() and not (half / "trainer_state.json").exists()
    assert (half / "model.safetensors").stat().st_size > 0
    [newest] = complete_checkpoints(out)
    assert newest.name == "step-000000002" and state(newest)["step"] == 2
    # a folder named like the next checkpoint but not one (no trainer_state.json), e.g. copied
    # in by hand: never picked either, and replaced by the real one
    (ckpts / "step-000000003").mkdir()
    (ckpts / "step-000000003" / "model.safetensors").write_bytes(b"\0" * 10)

    resumed = run(train_cmd("--out", str(out), "--resume", "auto", "--max-steps", "3"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    picked = re.search(r"resumed from (\S+?)\)", resumed.stderr)
    assert picked and picked.group(1) == str(newest), resumed.stderr[-2000:]
    # the next save (step 3) removed the half-written step-4 folder and replaced the fake step 3
    assert not list(ckpts.glob(".tmp-*"))
    assert [state(c)["step"] for c in complete_checkpoints(out)] == [2, 3]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000000002", "step-000000003"]
    assert state(ckpts / "step-000000003")["images_seen"] == 3 * 16
    assert metric_steps(out) == [1, 2, 3]  # rows logged after step 2 by the killed run dropped
