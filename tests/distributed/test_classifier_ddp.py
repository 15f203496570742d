"""`get_classifier` in 2 CPU processes (gloo): when rank 0 fails to load or train the classifier,
every rank raises the error at once instead of rank 1 waiting in the weights' broadcast until the
launcher's timeout (NCCL's default is 30 minutes).

Each rank is its own `python -c` process, so a hang is a subprocess timeout, not a stuck pytest.
The workers start their group as the CLI does (`dist.process_state`), and each checks at exit that
the group was destroyed first: a gloo group left alive can abort the interpreter's exit
("terminate called without an active exception", exit -6), which is how this test once failed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]
REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent(
    """
    import atexit, json, os, sys
    import torch.distributed as tdist
    from facegan_dist import classifier, dist
    from facegan_dist.errors import DataError

    rank = int(os.environ["RANK"])

    def group_at_exit():  # registered first, so it runs after dist's own exit hook
        with open(f"{sys.argv[3]}/rank{rank}-exit.json", "w") as f:
            json.dump({"group_alive_at_exit": tdist.is_initialized()}, f)

    atexit.register(group_at_exit)
    state = dist.process_state()

    def fail(*args, **kwargs):
        if sys.argv[2] == "facegan":
            raise DataError("shards/train-000000.tar: a shard failed after its retries")
        raise RuntimeError("disk on fire")

    classifier._cached_or_trained = fail  # only rank 0 ever calls it
    try:
        classifier.get_classifier(sys.argv[1], state=state)
        out = {"raised": None}
    except Exception as exc:
        out = {"raised": type(exc).__name__, "message": str(exc)}
    with open(f"{sys.argv[3]}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(tmp_path: Path, kind: str) -> list[dict]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}  # fmt: skip
        cmd = [sys.executable, "-c", WORKER, str(tmp_path / "shards"), kind, str(tmp_path)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    try:
        for p in procs:
            _, err = p.communicate(timeout=120)  # a hang in the broadcast fails here
            assert p.returncode == 0, err[-2000:]
    finally:
        for p in procs:
            p.kill()
    for r in range(2):
        exit_state = json.loads((tmp_path / f"rank{r}-exit.json").read_text())
        assert exit_state == {"group_alive_at_exit": False}, f"rank {r}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_rank0_error_is_raised_on_every_rank(tmp_path):
    r0, r1 = run_two(tmp_path, "facegan")
    want = {
        "raised": "DataError",
        "message": "shards/train-000000.tar: a shard failed after its retries",
    }
    assert r0 == want and r1 == want


def test_a_rank0_crash_reaches_the_other_rank_as_one_line(tmp_path):
    r0, r1 = run_two(tmp_path, "other")
    assert r0 == {"raised": "RuntimeError", "message": "disk on fire"}  # rank 0 keeps its own
    assert r1["raised"] == "DataError"
    assert r1["message"] == (
        "the attribute classifier failed on rank 0 (RuntimeError: disk on fire)"
    )
