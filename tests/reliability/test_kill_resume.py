"""Item 1: `kill -9` at a random moment, then `--resume auto` continues from the newest COMPLETE
checkpoint; half-written folders (a `.tmp-step-*`, a `step-*` without trainer_state.json) are
never picked, and metrics.jsonl ends with every step exactly once."""

from __future__ import annotations

import json
import random
import re
import signal
import time

import pytest

from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import (
    TINY,
    complete_checkpoints,
    metric_steps,
    run,
    start,
    state,
    train_cmd,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_sigkill_then_resume_auto_picks_newest_complete_checkpoint(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    out = tmp_path / "run"
    args = ["--data", str(shards), "--out", str(out), *TINY, "--ckpt-every", "2", "--keep", "3",
            "--wandb-mode", "disabled"]  # fmt: skip
    proc = start(train_cmd(*args, "--max-steps", "100000"))
    wait_for(lambda: bool(complete_checkpoints(out)), proc)
    # a random moment after the first checkpoint (seeded: reproducible enough, still anywhere in
    # a step, a log write or a checkpoint write)
    time.sleep(random.Random(20240607).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    newest = complete_checkpoints(out)[-1]
    k = state(newest)["step"]
    assert k >= 2 and k % 2 == 0
    # what a kill in the middle of a checkpoint leaves behind, made certain:
    ckpts = out / "checkpoints"
    half = ckpts / f".tmp-step-{k + 4:09d}"  # a temp folder, even with every file in it
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    (half / "trainer_state.json").write_text(json.dumps({"step": k + 4}))
    for fake in (k + 2, 999_999_999):  # named like checkpoints, no trainer_state.json
        (ckpts / f"step-{fake:09d}").mkdir(exist_ok=True)
        (ckpts / f"step-{fake:09d}" / "model.safetensors").write_bytes(b"\0" * 10)

    final = k + 6
    resumed = run(train_cmd("--out", str(out), "--resume", "auto", "--max-steps", str(final)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    picked = re.search(r"resumed from (\S+?)\)", resumed.stderr)
    assert picked and picked.group(1) == str(newest), resumed.stderr[-2000:]

    # the run went on to the end; the fake step-(k+2) was replaced by a complete checkpoint
    end = state(ckpts / f"step-{final:09d}")
    assert end["step"] == final and end["images_seen"] == final * 16
    assert state(ckpts / f"step-{k + 2:09d}")["step"] == k + 2
    assert not list(ckpts.glob(".tmp-*"))  # debris of the kill removed by the next save
    assert metric_steps(out) == list(range(1, final + 1))  # no duplicate, no missing step
