"""Item 3: elastic restart. `accelerate launch --max_restarts 2 ... --resume auto`: when one
training process dies (SIGKILL of rank 1), torchrun restarts both and the run continues from its
newest checkpoint to the end, on the FIRST restart. Launched through launch/accelerate_launch.py
(the launcher launch/slurm.sbatch uses), which keeps torchrun's one line naming the killed rank.

Restarts need the c10d rendezvous with a fresh store per attempt (docs/RELIABILITY.md):
`--rdzv_backend c10d` on the command line (accelerate 1.15 ignores `rdzv_backend` in a config
file: its CLI default "static" is not None, so the file's value is never applied) and
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch#135712). With the static rendezvous, or c10d
sharing its store, the restarted workers read their dead predecessors' addresses from the store
all attempts share: the restart fails ("Gloo connectFullMesh failed ... Connection refused") or
hangs in init_process_group, 2 runs in 5 here.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import (
    TINY,
    complete_checkpoints,
    env,
    free_port,
    launch_cmd,
    metric_steps,
    start,
    state,
    stop,
    wait_for,
    worker_pids,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_killed_rank_restarts_and_resumes(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    out = tmp_path / "run"
    total = 40
    launcher = ["--main_process_port", str(free_port()), "--rdzv_backend", "c10d",
                "--max_restarts", "2", "--monitor_interval", "0.5"]  # fmt: skip
    cmd = launch_cmd("--data", str(shards), "--out", str(out), *TINY, "--ckpt-every", "3",
                     "--wandb-mode", "disabled", "--max-steps", str(total), "--resume", "auto",
                     launcher_args=launcher, wrapper=True)  # fmt: skip
    environ = env(
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PET_RDZV_ENDPOINT=f"127.0.0.1:{free_port()}"
    )
    proc = start(cmd, environ)
    try:
        wait_for(lambda: bool(complete_checkpoints(out)), proc)
        pids = worker_pids(proc)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == 0, stderr[-4000:]
    assert f"failed (exitcode: -9) local_rank: 1 (pid: {pids[1]})" in stderr, stderr[-4000:]
    banners = [line for line in stderr.splitlines() if line.startswith("facegan train:")]
    assert len(banners) == 2, banners  # the first run, then ONE restart that resumed
    assert "resumed from" in banners[1] and f"-> {total}" in banners[1], banners
    end = state(complete_checkpoints(out)[-1])
    assert end["step"] == total and end["images_seen"] == total * 16
    assert end["rank_param_sha256"][0] == end["rank_param_sha256"][1]
    assert metric_steps(out) == list(range(1, total + 1))
    assert (out / "export" / "generator.safetensors").is_file()
    assert "done: step 40" in stdout
