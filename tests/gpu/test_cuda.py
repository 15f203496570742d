"""CUDA-only checks (skipped without a GPU): fp16 loss scaling with two optimizers, bf16, the
fast paths, and the device cache on the GPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from facegan_dist.train.loop import resolve_config, train
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
def test_cuda_training_variants(shards, tmp_path, flags):
    flags = dict(flags)
    preset = flags.pop("preset", "demo")
    cfg, _ = resolve_config(preset, None, {"data": shards, "out": tmp_path / "r", **TINY, **flags})
    res = train(cfg)
    assert res.step == 10
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["device"].startswith("cuda") and run["precision"] == cfg.precision
    ckpt = tmp_path / "r" / "checkpoints" / "step-000000010"
    if cfg.precision == "fp16":  # the shared GradScaler is checkpointed
        assert (ckpt / "scaler.pt").is_file()


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_fast_step_agrees_with_eager_fp32(precision, compile):
    """The CUDA step (channels_last, TF32, fused Adam, autocast, compile) against the eager
    fp32 step on the same inputs, within `bench.agreement_tolerance`."""
    from tests.unit.test_fast import agreement

    r = agreement(precision, compile=compile)
    assert r["check_ok"], r
