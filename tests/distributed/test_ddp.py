"""Two CPU processes (gloo) through `accelerate launch` with the config shipped in launch/.

Beware (STACK-NOTES): `accelerate launch --cpu --num_processes 2` starts ONE process; the tests
assert the world size read back from run.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.shards import write_tiny_shards

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
COMMON = ["--g-width", "8", "--d-width", "8", "--batch", "16", "--num-workers", "1",
          "--log-every", "5", "--sample-every", "100", "--ckpt-every", "100",
          "--wandb-mode", "disabled", "--preset", "demo"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    args: list[str], nproc: int = 2, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/cpu-2proc.yaml facegan_dist train ...` from the
    repo root: the package folder is run as a script (what users type)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "launch/cpu-2proc.yaml",
           "--num_processes", str(nproc), "--main_process_port", str(free_port()),
           "facegan_dist", "train", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def single(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "facegan_dist", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=96, size=16)
    out = tmp_path / "ddp"
    launch(["--data", str(shards), "--out", str(out), "--max-steps", "10", *COMMON])
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["batch_per_device"] == 8 and run["batch"] == 16
    assert run["distributed_type"] == "MULTI_CPU"
    state = json.loads((out / "checkpoints" / "step-000000010" / "trainer_state.json").read_text())
    digests = state["rank_param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # G and D identical on both ranks
    assert state["step"] == 10 and state["images_seen"] == 160
    assert (out / "checkpoints" / "step-000000010" / "random_states_1.pkl").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]  # rank 0 alone writes, once per interval
    assert (out / "export" / "generator.safetensors").is_file()


def test_config_error_prints_one_line_not_one_per_rank(tmp_path):
    """A config error is raised alike on every rank; the user sees it once (rank 0), exit != 0."""
    shards = write_tiny_shards(tmp_path / "shards", n=32, size=16)
    proc = launch(["--data", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "2",
                   *COMMON, "--batch", "15"], check=False)  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--batch 15" in errors[0] and "[rank" not in errors[0], errors


def test_two_process_matches_one_process_same_global_batch(tmp_path):
    """No BatchNorm (mlp), no dropout, identical images: data order is irrelevant and the noise of
    a sample depends on its global index, so 2 x 8 must equal 1 x 16 up to float reduction order.
    The difference must be tiny compared with how far training moved the weights."""
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16, identical=True)
    args = ["--data", str(shards), "--max-steps", "6", "--arch", "mlp", "--dropout", "0",
            *COMMON, "--ckpt-every", "6"]  # fmt: skip
    launch([*args, "--out", str(tmp_path / "two")])
    single([*args, "--out", str(tmp_path / "one")])
    # the initial weights, rebuilt as the loop builds them (same seed, same registry)
    from accelerate.utils import set_seed

    from facegan_dist.models import build_models

    set_seed(0)
    G0, _ = build_models("mlp", resolution=16, z_dim=100, g_width=8, d_width=8, dropout=0.0)
    w0 = {k: v.detach() for k, v in G0.state_dict().items()}
    a = load_file(tmp_path / "one" / "checkpoints" / "step-000000006" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step-000000006" / "model.safetensors")
    moved = torch.sqrt(sum(((a[k] - w0[k]) ** 2).sum() for k in a))
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    assert moved > 1e-3  # training did move G
    assert diff < 1e-2 * moved, (float(diff), float(moved))


def test_two_process_wgan_gp_with_conditioning(tmp_path):
    """The gradient penalty (double backward through DDP) and a conditional projection D."""
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16)
    out = tmp_path / "wgan"
    launch(["--data", str(shards), "--out", str(out), "--max-steps", "4", *COMMON,
            "--preset", "wgan-gp", "--condition", "attr_1,attr_2"])  # fmt: skip
    state = json.loads((out / "checkpoints" / "step-000000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert state["rank_param_sha256"][0] == state["rank_param_sha256"][1]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["penalty"] >= 0 for r in rows)
    assert state["images_seen"] == 4 * 5 * 16  # 5 critic steps per G step
