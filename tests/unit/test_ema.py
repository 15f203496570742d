"""EMA of G: the half-life formula, the ramp-up, averaging of parameters and copying of buffers."""

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


def test_update_lerps_parameters_and_copies_buffers():
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
    assert torch.equal(after["1.running_mean"], torch.full((4,), 3.0))
    assert not any(p.requires_grad for p in ema.module.parameters())
