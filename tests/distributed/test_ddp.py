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
    args: list[str], nproc: int = 2, timeout: int = 300, check: bool = True, wrapper: bool = False
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/cpu-2proc.yaml facegan_dist train ...` from the
    repo root: the package folder is run as a script (what users type). `wrapper`: the same
    through `python launch/accelerate_launch.py` (launch/README.md)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = (
        [sys.executable, "launch/accelerate_launch.py"] if wrapper else [accelerate, "launch"]
    )
    cmd = [*map(str, launcher), "--config_file", "launch/cpu-2proc.yaml",
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
    """A config error is raised alike on every rank; the user sees it once (rank 0), exit 1, and
    through launch/accelerate_launch.py nothing else: no torchrun ChildFailedError report."""
    shards = write_tiny_shards(tmp_path / "shards", n=32, size=16)
    proc = launch(["--data", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "2",
                   *COMMON, "--batch", "15"], check=False, wrapper=True)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: --batch 15 ") and "[rank" not in line, line
    assert proc.stdout == ""


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """G, D and the EMA of G of a checkpoint, keyed by file and tensor."""
    files = ["model.safetensors", "model_1.safetensors", "ema.safetensors"]
    return {f"{f}:{k}": v.double() for f in files for k, v in load_file(ckpt / f).items()}


def _norm(d: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v**2).sum() for v in d.values())))


def test_two_process_matches_one_process_same_global_batch(tmp_path):
    """No BatchNorm (mlp), no dropout, identical images: data order is irrelevant and the noise of
    a sample depends on its global index, so 2 x 8 must equal 1 x 16 up to float reduction order:
    the same losses in every metrics row, and weights (G, D, EMA) that differ by a tiny fraction
    of how far training moved them from their initial values."""
    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16, identical=True)
    args = ["--data", str(shards), "--max-steps", "6", "--arch", "mlp", "--dropout", "0",
            *COMMON, "--log-every", "1", "--ckpt-every", "1", "--keep", "10"]  # fmt: skip
    launch([*args, "--out", str(tmp_path / "two")])
    single([*args, "--out", str(tmp_path / "one")])
    runs = {n: json.loads((tmp_path / n / "run.json").read_text()) for n in ("one", "two")}
    assert runs["two"]["world_size"] == 2 and runs["two"]["batch_per_device"] == 8
    assert runs["one"]["world_size"] == 1 and runs["one"]["batch_per_device"] == 16

    # the same metrics rows: every logged value but the timing, to float reduction noise
    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}  # fmt: skip
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["two"]] == [*range(1, 7)]
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert a.keys() == b.keys() and {"loss_d", "loss_g", "d_real", "d_fake"} <= a.keys()
        for k in a.keys() - {"images_per_s"}:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])

    # the initial weights, rebuilt as the loop builds them (same seed, same registry)
    from accelerate.utils import set_seed

    from facegan_dist.models import build_models

    set_seed(0)
    G0, D0 = build_models("mlp", resolution=16, z_dim=100, g_width=8, d_width=8, dropout=0.0)
    w0 = {f"model.safetensors:{k}": v for k, v in G0.state_dict().items()}
    w0 |= {f"model_1.safetensors:{k}": v for k, v in D0.state_dict().items()}
    w0 |= {f"ema.safetensors:{k}": v for k, v in G0.state_dict().items()}
    w0 = {k: v.detach().double() for k, v in w0.items()}
    # ...checked: Adam's first step moves every parameter by at most lr (2e-4) from them
    ckpts = {n: tmp_path / n / "checkpoints" for n in ("one", "two")}
    first = _weights(ckpts["one"] / "step-000000001")
    model_keys = [k for k in first if not k.startswith("ema")]
    assert max(float((first[k] - w0[k]).abs().max()) for k in model_keys) <= 2e-4 * 1.001

    a = _weights(ckpts["one"] / "step-000000006")
    b = _weights(ckpts["two"] / "step-000000006")
    assert a.keys() == b.keys() == w0.keys()
    for part in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        keys = [k for k in a if k.startswith(part + ":")]
        moved = _norm({k: a[k] - w0[k] for k in keys})
        diff = _norm({k: a[k] - b[k] for k in keys})
        assert moved > 1e-3, (part, moved)  # training did move it
        assert diff < 1e-4 * moved, (part, diff, moved)


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
    assert rows and all(r["penalty"] > 0 for r in rows)  # (||grad|| - 1)^2: 0 means not computed
    assert state["images_seen"] == 4 * 5 * 16  # 5 critic steps per G step
