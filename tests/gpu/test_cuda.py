"""CUDA-only checks (skipped without a GPU): fp16 loss scaling with two optimizers, bf16, the
fast paths, and the device cache on the GPU.

A torch.compile case is skipped only when a trivial compiled function fails on this machine
(no Triton, no C++ toolchain): past that probe, a failure of our compiled step is a failure."""

from __future__ import annotations

import json
import math

import pytest
import torch

from facegan_dist.train.loop import resolve_config, train
from tests.conftest import reset_accelerate
from tests.helpers.shards import write_tiny_shards

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TINY = dict(g_width=16, d_width=16, batch=32, num_workers=0, log_every=5, sample_every=10,
            ckpt_every=10, n_samples=16, wandb_mode="disabled", max_steps=10)  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("s"), n=128, size=32)


@pytest.fixture(autouse=True)
def _backend_switches():
    """A run sets process-wide switches (deterministic kernels after --exact, cuDNN autotuning,
    TF32) that outlive it; each test starts from the same ones."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # fmt: skip
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3:]


@pytest.fixture(scope="session")
def compile_works() -> None:
    """Skip (every compile case) when torch.compile cannot run a trivial function on the GPU."""
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        x = torch.randn(64, device="cuda")
        torch.testing.assert_close(fn(x), torch.sin(x) * 2 + 1)
    except Exception as exc:  # no Triton / C++ toolchain / unsupported GPU
        pytest.skip(f"torch.compile does not work here: {type(exc).__name__}: {exc}"[:200])


@pytest.mark.parametrize(
    "flags",
    [
        dict(precision="fp16"),
        dict(precision="fp16", preset="wgan-gp"),  # penalty from unscaled gradients
        dict(precision="bf16", compile=True),
        dict(precision="bf16", data_cache="device"),
        dict(precision="no", exact=True),
    ],
)
def test_cuda_training_variants(shards, tmp_path, flags, request):
    flags = dict(flags)
    preset = flags.pop("preset", "demo")
    if flags.get("compile"):
        request.getfixturevalue("compile_works")
    cfg, _ = resolve_config(preset, None, {"data": shards, "out": tmp_path / "r", **TINY, **flags})
    res = train(cfg)
    assert res.step == 10
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)
    if cfg.loss == "wgan-gp":  # (||grad D|| - 1)^2 of a random critic: 0 only if not computed
        assert all(r["penalty"] > 0 and math.isfinite(r["penalty"]) for r in rows), rows
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["device"].startswith("cuda") and run["precision"] == cfg.precision
    ckpt = tmp_path / "r" / "checkpoints" / "step-000000010"
    if cfg.precision == "fp16":  # the shared GradScaler is checkpointed
        assert (ckpt / "scaler.pt").is_file()


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_fast_step_agrees_with_eager_fp32(precision, compile, request):
    """The CUDA step (channels_last, TF32, fused Adam, autocast, compile) against the eager
    fp32 step on the same inputs, within `bench.agreement_tolerance`."""
    from tests.unit.test_fast import agreement

    if compile:
        request.getfixturevalue("compile_works")

    r = agreement(precision, compile=compile)
    assert r["check_ok"], r


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_cuda_graph_step_agrees_with_eager_fp32(precision):
    """--cuda-graphs: 3 eager warm-up steps, a capture, then replays (8 steps in all) against
    the eager fp32 step on the same inputs and noise."""
    from facegan_dist.train.steps import GRAPH_WARMUP
    from tests.unit.test_fast import agreement

    r = agreement(precision, steps=GRAPH_WARMUP + 5, cuda_graphs=True)
    assert r["check_ok"], r


def test_cuda_graph_training_matches_eager_training(shards, tmp_path):
    """The same 10-step fp32 run (no TF32, deterministic) with and without --cuda-graphs: the
    graph replays the eager step's kernels, so the weights agree closely; the losses logged from
    replays are finite and the checkpoint restores."""
    from safetensors.torch import load_file

    weights, losses = {}, {}
    for graphs in (False, True):
        out = tmp_path / f"g{int(graphs)}"
        cfg, _ = resolve_config("demo", None, {"data": shards, "out": out, **TINY,
                                               "tf32": False, "deterministic": True,
                                               "cuda_graphs": graphs})  # fmt: skip
        reset_accelerate()  # a second Accelerator in this process
        assert train(cfg).step == 10
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)
        losses[graphs] = [r[k] for r in rows for k in ("loss_d", "loss_g")]  # flat: approx
        weights[graphs] = load_file(out / "checkpoints" / "step-000000010" / "model.safetensors")
    # Replays run the eager step's kernels on fresh inputs: a stale static buffer (the capture
    # step's batch or noise replayed) would change the losses by ~1e-2 on these random images.
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    diff = sum(((weights[True][k].float() - weights[False][k].float()) ** 2).sum()
               for k in weights[False])  # fmt: skip
    norm = sum((v.float() ** 2).sum() for v in weights[False].values())
    assert float(diff.sqrt() / norm.sqrt()) < 1e-5
