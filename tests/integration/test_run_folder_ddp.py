"""`--restart` and the `--resume auto` fallback under 2 CPU processes (gloo): rank 0 alone moves
and renames, every rank agrees, the warning is printed once."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from facegan_dist.cli import app
from tests.conftest import reset_accelerate
from tests.helpers.shards import write_tiny_shards

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TINY = ["--preset", "demo", "--g-width", "8", "--d-width", "8", "--batch", "16",
        "--num-workers", "0", "--log-every", "1", "--sample-every", "100000",
        "--wandb-mode", "disabled", "--ckpt-every", "1"]  # fmt: skip


def launch2(*args) -> subprocess.CompletedProcess:
    """2 processes through launch/accelerate_launch.py (accelerate launch + facegan's exits)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "launch/accelerate_launch.py", "--config_file",
           "launch/cpu-2proc.yaml", "--num_processes", "2", "--main_process_port", str(port),
           "facegan_dist", "train", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_restart_and_fallback_with_two_processes(tmp_path):
    shards = write_tiny_shards(tmp_path / "s", n=32, size=16)
    run = tmp_path / "run"
    reset_accelerate()
    first = CliRunner().invoke(app, ["train", "--data", str(shards), "--out", str(run), *TINY,
                                     "--max-steps", "1"])  # fmt: skip
    assert first.exit_code == 0, first.output
    old_files = digest(run)

    proc = launch2("--data", shards, "--out", run, *TINY, "--max-steps", 2, "--restart")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [old] = sorted(tmp_path.glob("run.old-*"))
    assert digest(old) == old_files
    assert proc.stderr.count("--restart: moved the previous run") == 1
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000000001", "step-000000002"]  # fmt: skip

    (run / "checkpoints" / "step-000000002" / "optimizer_1.bin").write_bytes(b"")
    proc = launch2("--out", run, "--resume", "auto", "--max-steps", 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "optimizer_1.bin" in warnings[0], proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-000000001)" in proc.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000000001", "step-000000002", "step-000000002.damaged",
                     "step-000000003"]  # fmt: skip
    assert (run / "checkpoints" / "step-000000002.damaged" / "optimizer_1.bin").stat().st_size == 0
