"""Shared plumbing of the fault-tolerance tests (docs/RELIABILITY.md): tiny runs launched the way
users launch them (a subprocess from the repo root), and readers of what the runs wrote."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
WRAPPER = "launch/accelerate_launch.py"  # accelerate launch with facegan's exit codes
# 16 px, widths 8, one loader worker (the production path: errors and signals cross processes)
TINY = ["--preset", "demo", "--g-width", "8", "--d-width", "8", "--batch", "16",
        "--num-workers", "1", "--log-every", "1", "--sample-every", "100000"]  # fmt: skip
STEP_DIR = re.compile(r"^step-(\d{9})$")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PET_"))}
    return {**base, "OMP_NUM_THREADS": "1", "WANDB_ERROR_REPORTING": "false", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(*args: str) -> list[str]:
    """`python -m facegan_dist train ...` (one process)."""
    return [sys.executable, "-m", "facegan_dist", "train", *args]


def launch_cmd(
    *args: str, config: str = "launch/cpu-2proc.yaml", launcher_args=(), wrapper: bool = False
) -> list[str]:
    """`accelerate launch --config_file CONFIG ... facegan_dist train ...` (what users type), or
    with `wrapper` the same through `python launch/accelerate_launch.py` (launch/README.md)."""
    launcher = [sys.executable, WRAPPER] if wrapper else [ACCELERATE, "launch"]
    return [*launcher, "--config_file", config, *launcher_args,
            "facegan_dist", "train", *args]  # fmt: skip


def start(cmd: list[str], environ: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env=environ or env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def run(cmd: list[str], environ=None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=environ or env(), capture_output=True, text=True, timeout=timeout
    )


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `cond` while `proc` runs; fail with its stderr when it exits or time runs out."""
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} too early:\n{err[-3000:]}")
        if time.time() > deadline:
            stop(proc)
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    """Kill a launched job that a failed test leaves behind: the launcher and its workers (each
    torchrun worker runs in a session of its own, so they are found by pid, not by group)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in [psutil.Process(proc.pid), *kids] if proc.poll() is None else kids:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.communicate()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (as --resume auto sees them), oldest first; read independently of
    facegan_dist.train.checkpoint so the tests check its rule, not reuse it."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]  # fmt: skip
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def metric_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tracebacks(stderr: str) -> list[str]:
    """The exception line closing each Python traceback in a (merged) stderr."""
    lines = stderr.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            pattern = r"^(\[rank\d\]: )?\w[\w.]*(Error|Exception|Interrupt)\b"
            tail = [x for x in lines[i + 1 :] if re.match(pattern, x)]
            found.append(tail[0] if tail else line)
    return found


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the training processes started by an `accelerate launch` (torchrun agent):
    its direct children, each with RANK in its environment."""
    import psutil

    ranks = {}
    for child in psutil.Process(launcher.pid).children():
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None:
            ranks[int(rank)] = child.pid
    return ranks
