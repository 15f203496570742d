"""EMA of G: the half-life formula, the ramp-up, averaging of parameters, and BatchNorm
statistics that belong to the EMA's own weights (models/bn.py), not copied from G."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facegan_dist.train.ema import EMA


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_beta_is_half_life_in_kimg_with_rampup():
    ema = EMA(net(), half_life_kimg=10, rampup=None)
    # after 10 kimg of batches of 100, the old weights count for exactly one half
    assert ema.beta(100, 10**9) ** (10_000 / 100) == pytest.approx(0.5)
    ramped = EMA(net(), half_life_kimg=10, rampup=0.05)
    # early: half-life = 0.05 * 2000 images = 100 images -> beta = 0.5 ** (100 / 100)
    assert ramped.beta(100, 2000) == pytest.approx(0.5)
    assert ramped.beta(100, 10**9) == pytest.approx(ema.beta(100, 10**9))


def test_update_lerps_parameters_and_does_not_copy_bn_statistics():
    G = net()
    ema = EMA(G, half_life_kimg=0.1, rampup=None)  # beta = 0.5 for batch 100
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G[1].running_mean.fill_(3.0)
    ema.update(G, batch=100, images_seen=10**6)
    after = ema.state_dict()
    for k, p in G.state_dict().items():
        if k.endswith(("weight", "bias")):
            assert torch.allclose(after[k], 0.5 * before[k] + 0.5 * p)
    # G's running statistics belong to G's weights: the EMA keeps its own
    assert torch.equal(after["1.running_mean"], before["1.running_mean"])
    assert not any(p.requires_grad for p in ema.module.parameters())


def tiny_g():
    from facegan_dist.models import build_models

    torch.manual_seed(0)
    G, _ = build_models("dcgan", resolution=16, z_dim=8, g_width=8, d_width=8)
    return G


def bn_input_stats(G, n: int = 4096, seed: int = 123):
    """Per-BatchNorm (mean, var) of the inputs each BN sees when G runs in eval mode on n
    fresh latents: the batch statistics of G's own activations."""
    from facegan_dist.latent import seed_z
    from facegan_dist.models.bn import batchnorms

    seen: list[torch.Tensor] = []
    hooks = [bn.register_forward_hook(lambda m, a, out: seen.append(a[0])) for bn in batchnorms(G)]
    G.eval()
    with torch.no_grad():
        G(seed_z(range(seed, seed + n), G.z_dim))
    for h in hooks:
        h.remove()
    return [(x.mean((0, 2, 3)), x.var((0, 2, 3))) for x in seen]


def bn_mismatch(G) -> float:
    """Largest |running - actual| over channels and layers, in units of the actual std."""
    from facegan_dist.models.bn import batchnorms

    worst = 0.0
    for bn, (mean, var) in zip(batchnorms(G), bn_input_stats(G), strict=True):
        std = var.sqrt()
        worst = max(worst, float(((bn.running_mean - mean).abs() / std).max()))
        worst = max(worst, float(((bn.running_var - var).abs() / var).max()))
    return worst


def drifted_ema(copy_buffers: bool):
    """A G trained (here: perturbed) away from its long-half-life EMA, its running statistics
    tracked on its own batches as in training."""
    from facegan_dist.latent import seed_z

    G = tiny_g()
    ema = EMA(G, half_life_kimg=5.0, rampup=None)
    gen = torch.Generator().manual_seed(1)
    for i in range(30):
        with torch.no_grad():
            for p in G.parameters():
                p.add_(0.15 * torch.randn(p.shape, generator=gen) * p.abs().mean())
            G.train()
            G(seed_z(range(i * 64, i * 64 + 64), G.z_dim))  # updates G's running stats
        ema.update(G, batch=64, images_seen=(i + 1) * 64)
        if copy_buffers:  # what the EMA did before: G's statistics on the averaged weights
            for b_ema, b_src in zip(ema.module.buffers(), G.buffers(), strict=True):
                b_ema.copy_(b_src)
    return ema


# Tolerance: 1024 calibration latents vs 4096 fresh ones at 4x4..8x8 positions per channel.
# Sampling error of the mean is ~1/sqrt(16k) of a std; the variance additionally loses the
# between-batch variance of the batch means (batch 128). 0.1 leaves room for both and is far
# below the copied statistics' mismatch (> 0.5 here).
BN_TOLERANCE = 0.1


def test_copied_bn_statistics_do_not_match_the_ema_weights():
    assert bn_mismatch(drifted_ema(copy_buffers=True).module) > 5 * BN_TOLERANCE


def test_ready_ema_bn_statistics_match_its_own_activations():
    ema = drifted_ema(copy_buffers=False)
    G = ema.ready()
    assert not G.training
    assert bn_mismatch(G) < BN_TOLERANCE


def test_recalibration_is_a_pure_function_of_the_weights():
    from facegan_dist.models.bn import recalibrate_bn

    a, b = drifted_ema(False).module, drifted_ema(False).module
    with torch.no_grad():  # b starts from other statistics: they must not matter
        for buf in b.buffers():
            if buf.dtype.is_floating_point:
                buf.normal_()
    recalibrate_bn(a)
    recalibrate_bn(b)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    # momentum is restored (G trains on with its usual exponential average afterwards)
    assert all(m.momentum == 0.1 for m in a.modules() if isinstance(m, nn.BatchNorm2d))


def test_ready_recalibrates_once_per_step_and_after_each_update(monkeypatch):
    import facegan_dist.train.ema as ema_mod

    calls = []
    monkeypatch.setattr(ema_mod, "recalibrate_bn", lambda m, c=None: calls.append(1))
    G = tiny_g()
    ema = EMA(G, half_life_kimg=1.0)
    ema.ready()
    ema.ready()
    assert len(calls) == 1
    ema.update(G, 64, 640)
    ema.ready()  # the weights changed: new statistics
    assert len(calls) == 2
