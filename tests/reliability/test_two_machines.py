"""Item 4: two "machines" on one host: two launchers with --num_machines 2 and --machine_rank 0/1
(one process each) rendezvous over loopback and train together to the end, sharing one --out
folder (a shared filesystem). Machine 0 launches through launch/accelerate_launch.py (what
launch/slurm.sbatch runs on every node), machine 1 with plain `accelerate launch`: they mix."""

from __future__ import annotations

import json

import pytest

from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import (
    TINY,
    complete_checkpoints,
    free_port,
    launch_cmd,
    metric_steps,
    start,
    state,
    stop,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_launchers_train_together_over_loopback(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    out = tmp_path / "run"
    port = str(free_port())
    args = ["--data", str(shards), "--out", str(out), *TINY, "--ckpt-every", "5",
            "--wandb-mode", "disabled", "--max-steps", "10"]  # fmt: skip
    procs = []
    try:
        for machine_rank in (0, 1):
            launcher = ["--num_machines", "2", "--num_processes", "2", "--machine_rank",
                        str(machine_rank), "--main_process_ip", "127.0.0.1",
                        "--main_process_port", port]  # fmt: skip
            cmd = launch_cmd(*args, launcher_args=launcher, wrapper=machine_rank == 0)
            procs.append(start(cmd))
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                stop(p)
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["num_machines"] == 2 and run["batch_per_device"] == 8
    end = state(complete_checkpoints(out)[-1])
    assert end["step"] == 10 and end["world_size"] == 2
    digests = end["rank_param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # the two machines stayed in sync
    assert (out / "checkpoints" / "step-000000010" / "random_states_1.pkl").is_file()
    assert metric_steps(out) == list(range(1, 11))  # only global rank 0 writes
