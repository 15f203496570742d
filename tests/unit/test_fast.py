"""Fast paths (bf16, channels_last, fused Adam, torch.compile) match the eager fp32 step within
stated tolerances, on the same inputs and the same initial weights."""

from __future__ import annotations

import pytest
import torch

from facegan_dist import dist
from facegan_dist.models import build_models
from facegan_dist.train.steps import GANStep, to_model_input
from tests.conftest import reset_accelerate


def run_steps(precision="no", compile=False, channels_last=False, fused=False, steps=2):
    reset_accelerate()
    acc = dist.build_accelerator(precision)
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=16, g_width=8, d_width=8)
    if channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    kw = {"fused": True} if fused else {}
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), **kw)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), **kw)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    G_step, D_step = (torch.compile(G), torch.compile(D)) if compile else (G, D)
    step = GANStep(acc, G_step, D_step, opt_g, opt_d, loss="ns", d_every=1, d_steps=1, batch=8,
                   z_dim=100, seed=0, resolution=16)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    reals = [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen)
             for _ in range(steps)]  # fmt: skip
    for s in range(steps):
        step(s, lambda s=s: (to_model_input(reals[s], acc.device), None))
    stats = step.take_stats(lambda t: t)
    weights = {k: v.detach().float().clone() for k, v in acc.unwrap_model(G).state_dict().items()}
    return stats, weights


def close(a: dict, b: dict, rel: float) -> None:
    """Weights differ by less than `rel` of how far the reference moved from its init."""
    _, init = run_steps(steps=0)
    moved = sum(((a[k] - init[k]) ** 2).sum() for k in a).sqrt()
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    assert moved > 0 and diff <= rel * moved, (float(diff), float(moved))


@pytest.fixture(scope="module")
def reference():
    return run_steps()


def test_bf16_step_matches_fp32_step(reference):
    stats_ref, w_ref = reference
    stats, w = run_steps(precision="bf16")
    for k in ("loss_d", "loss_g", "d_real", "d_fake"):
        assert stats[k] == pytest.approx(stats_ref[k], abs=2e-2), k
    close(w_ref, w, rel=0.25)  # bf16 has 8 mantissa bits; Adam's first steps amplify sign flips


def test_channels_last_and_fused_adam_match(reference):
    stats_ref, w_ref = reference
    stats, w = run_steps(channels_last=True, fused=True)
    for k in ("loss_d", "loss_g"):
        assert stats[k] == pytest.approx(stats_ref[k], abs=1e-5), k
    close(w_ref, w, rel=1e-3)


@pytest.mark.slow
def test_compiled_step_matches_eager(reference):
    stats_ref, w_ref = reference
    try:  # skip only where compiling anything fails (no C++ toolchain, unsupported platform)
        torch.compile(lambda x: torch.sin(x) * 2 + 1)(torch.ones(4))
    except Exception as exc:
        pytest.skip(f"torch.compile does not work here: {type(exc).__name__}: {exc}"[:200])
    stats, w = run_steps(compile=True)  # a failure to compile OUR step is a test failure
    for k in ("loss_d", "loss_g"):
        assert stats[k] == pytest.approx(stats_ref[k], abs=1e-4), k
    close(w_ref, w, rel=1e-2)


def agreement(precision: str, lr_factor: float = 1.0, steps: int = 3, **overrides):
    """`facegan bench train`'s agreement check on a tiny DCGAN with the device's fast settings
    (and `overrides`, e.g. compile=True); lr_factor != 1 breaks the configured step on purpose
    (its optimizers get other learning rates). Also used by tests/gpu."""
    import copy

    from facegan_dist.bench import step_agreement
    from facegan_dist.config import merge_train_config
    from facegan_dist.train.setup import (
        apply_backend_settings,
        build_gan,
        build_step,
        memory_format_and_optimizers,
        model_input,
    )

    reset_accelerate()
    cfg = merge_train_config(
        "demo", None, {"data": "x", "g_width": 8, "d_width": 8, **overrides}
    ).validate()
    acc = dist.build_accelerator(precision, autocast_cache=not cfg.cuda_graphs)
    fast = cfg.fast_settings(acc.device.type)
    apply_backend_settings(fast, acc.device.type)
    torch.manual_seed(0)
    G, D = build_gan(cfg, 16)
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    G, D, opt_g, opt_d = memory_format_and_optimizers(G, D, cfg, fast)
    for opt in (opt_g, opt_d):
        opt.param_groups[0]["lr"] *= lr_factor
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    step = build_step(acc, G, D, opt_g, opt_d, cfg, fast, batch=8, resolution=16)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen)
               for _ in range(steps)]  # fmt: skip
    return step_agreement(step, acc.unwrap_model(G), G0, D0, cfg, batches,
                          lambda b: model_input(b, acc.device, fast), precision=precision,
                          fast=fast, resolution=16)  # fmt: skip


def test_bench_agreement_check_passes_fast_paths_and_catches_a_wrong_step():
    default = agreement("no")  # channels_last (on CPU and CUDA), plus TF32/fused Adam on CUDA
    assert default["check_ok"]
    if not torch.cuda.is_available():  # without channels_last, the CPU step IS the eager step
        same = agreement("no", channels_last=False)
        assert same["check_max_loss_diff"] == 0.0 and same["check_weight_rel_diff"] == 0.0
    bf16 = agreement("bf16")
    assert bf16["check_ok"] and 0 < bf16["check_max_loss_diff"] <= bf16["check_tolerance"]
    wrong = agreement("no", lr_factor=30.0)
    assert not wrong["check_ok"] and wrong["check_weight_rel_diff"] > 1.0, wrong


@pytest.mark.parametrize("n_cond", [0, 2])
def test_cuda_graph_plumbing_replays_the_step_on_fresh_inputs(n_cond):
    """--cuda-graphs on CPU with the capture simulated (the graph's replay calls the captured
    function on the static buffers): warm-up, one capture, replays and a re-capture after
    reset() must give exactly the eager step's stats and weights, so every input (batch,
    condition, noise, step number) really goes through the static buffers."""
    import contextlib
    import copy

    from facegan_dist.train.steps import GRAPH_WARMUP

    reset_accelerate()
    acc = dist.build_accelerator("no")
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=16, g_width=8, d_width=8, n_cond=n_cond)
    runs = {}
    for graphed in (False, True):
        g, d = copy.deepcopy(G), copy.deepcopy(D)
        opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        step = GANStep(acc, g, d, opt_g, opt_d, loss="ns", d_every=1, d_steps=1, batch=8,
                       z_dim=100, seed=0, resolution=16)  # fmt: skip
        captures = []
        if graphed:  # what a CUDA graph does, minus CUDA: record now, run on replay
            step.cuda_graphs = True
            step.capture = lambda fn, captures=captures: captures.append(fn) or fn
            step.warmup_context = lambda device: contextlib.nullcontext()
        gen = torch.Generator().manual_seed(1)
        stats = []
        for s in range(14):
            if s == 8:
                stats.append(step.take_stats(lambda t: t))
                step.reset()  # e.g. a rollback: warm up and capture again
            if s == 12:
                assert step.n_d == step.n_g == 12 - 8  # replays are counted like eager steps
                stats.append(step.take_stats(lambda t: t))
                weights = [p.detach().clone() for p in (*g.parameters(), *d.parameters())]
            real = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen)
            c = torch.randint(0, 2, (8, n_cond), generator=gen).float() if n_cond else None
            x = to_model_input(real, acc.device)
            if s == 13:  # a replayed step diverges: the marker must name it, not the capture's
                x = x * float("nan")
            step(s, lambda x=x, c=c: (x, c))
        assert float(step.first_bad) == 13.0
        runs[graphed] = stats, weights
        if graphed:
            assert len(captures) == 2  # steps GRAPH_WARMUP and 8 + GRAPH_WARMUP
    assert GRAPH_WARMUP == 3
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        assert torch.equal(a, b)
