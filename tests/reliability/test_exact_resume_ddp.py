"""Exact resume across a preemption: an `--exact` run with 2 processes and 2 loader workers each,
stopped by SIGTERM and resumed with `--resume auto`, ends bit-identical to the same run left
alone: G, D, the EMA, both Adam states and every metrics row (timing aside).

What must survive the stop for that: every rank's RNG states, the data stream's position (each
loader worker's slot and offset, docs/SHARDS.md), the EMA, the optimizers' step counts.

The preempted run goes through plain `accelerate launch` and its launcher gets the SIGTERM: the
ranks checkpoint and exit 0, the launcher exits 1 with torchrun's `SignalException` traceback,
the only one in its stderr (launch/README.md; launch/accelerate_launch.py exits 0 instead,
test_sigterm_ddp.py)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import (
    TINY,
    complete_checkpoints,
    free_port,
    launch_cmd,
    metric_rows,
    run,
    start,
    state,
    stop,
    tracebacks,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 16  # 4 epochs of 64 images: the stop and the resume cross epoch boundaries


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def _assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_exact_resume_two_processes_two_workers_is_bit_identical(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    args = ["--data", str(shards), *TINY, "--num-workers", "2", "--exact", "--hflip",
            "--ckpt-every", "100000", "--max-steps", str(STEPS),
            "--wandb-mode", "disabled"]  # fmt: skip

    def cmd(out: Path, *extra: str, wrapper: bool = True) -> list[str]:
        port = ["--main_process_port", str(free_port())]
        return launch_cmd("--out", str(out), *extra, launcher_args=port, wrapper=wrapper)

    straight, split = tmp_path / "straight", tmp_path / "split"
    done = run(cmd(straight, *args), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = start(cmd(split, *args, wrapper=False))
    try:
        wait_for(lambda: metric_rows(split) >= 3, proc)
        proc.send_signal(signal.SIGTERM)  # torchrun's agent forwards it to both ranks
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert "stopped by SIGTERM" in stderr and stdout.startswith("preempted: step "), stderr[-3000:]
    assert proc.returncode == 1, (proc.returncode, stderr[-3000:])
    errors = tracebacks(stderr)  # no rank failed: the launcher's own traceback only
    assert errors and all("SignalException" in e and "signal: 15" in e for e in errors), errors
    [stopped] = complete_checkpoints(split)
    k = state(stopped)["step"]
    assert 3 <= k < STEPS, k  # stopped mid-run, not at the end
    resumed = run(cmd(split, "--resume", "auto"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"steps {k} -> {STEPS}" in resumed.stderr, resumed.stderr[-3000:]

    final = f"step-{STEPS:09d}"
    a, b = straight / "checkpoints" / final, split / "checkpoints" / final
    assert state(a)["world_size"] == state(b)["world_size"] == 2
    assert state(a)["rank_param_sha256"] == state(b)["rank_param_sha256"]
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):  # G, D, EMA
        _assert_same_tensors(load_file(a / name), load_file(b / name), name)
    for name in ("optimizer.bin", "optimizer_1.bin"):  # Adam of G and of D
        _assert_same_tensors(
            torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True), name
        )
    assert _rows(straight) == _rows(split)
    assert [r["step"] for r in _rows(split)] == list(range(1, STEPS + 1))
