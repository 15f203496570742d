"""GAN losses: equal to hand-written BCE, saturation behaviour, stability, autocast, registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facegan_dist.errors import ConfigError
from facegan_dist.losses import LOSSES, d_loss, g_loss, get_loss
from facegan_dist.models import build_models


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3 - 1


def test_registry_keys_are_the_loss_flag_values():
    assert set(LOSSES) == {"minimax", "ns", "wgan", "wgan-gp", "hinge"}
    for kind in LOSSES:
        assert get_loss(kind) is LOSSES[kind]


@pytest.mark.parametrize("kind", ["minimax", "ns"])
def test_d_loss_is_bce_real1_plus_bce_fake0(kind, logits):
    real, fake = logits
    loss, stats = d_loss(kind, real, fake)
    torch.testing.assert_close(loss, bce(real, 1) + bce(fake, 0))
    # Same as the paper's V(D, G): D maximises E[log D(x)] + E[log(1 - D(G(z)))].
    v = torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean()
    torch.testing.assert_close(loss, -v)
    torch.testing.assert_close(stats["loss_d"], loss.detach())
    torch.testing.assert_close(stats["d_real"], torch.sigmoid(real).mean())
    torch.testing.assert_close(stats["d_fake"], torch.sigmoid(fake).mean())


def test_g_losses_equal_bce(logits):
    _, fake = logits
    ns, ns_stats = g_loss("ns", fake)
    mm, mm_stats = g_loss("minimax", fake)
    torch.testing.assert_close(ns, bce(fake, 1))  # -E[log D(G(z))]
    torch.testing.assert_close(mm, -bce(fake, 0))  # E[log(1 - D(G(z)))]
    torch.testing.assert_close(mm, torch.log(1 - torch.sigmoid(fake)).mean())
    for loss, stats in ((ns, ns_stats), (mm, mm_stats)):
        torch.testing.assert_close(stats["loss_g"], loss.detach())
        torch.testing.assert_close(stats["d_fake_g"], torch.sigmoid(fake).mean())


def test_stats_are_detached_tensors_and_loss_differentiable(logits):
    real, fake = (t.clone().requires_grad_(True) for t in logits)
    loss, stats = d_loss("ns", real, fake)
    gloss, gstats = g_loss("ns", fake)
    assert loss.requires_grad and gloss.requires_grad
    for s in (*stats.values(), *gstats.values()):
        assert isinstance(s, torch.Tensor) and s.ndim == 0 and not s.requires_grad
    loss.backward()
    # d/dl of softplus(-l).mean() = -sigmoid(-l)/N for real; softplus(l).mean() -> sigmoid(l)/N
    n = real.numel()
    torch.testing.assert_close(real.grad, -torch.sigmoid(-real.detach()) / n)
    torch.testing.assert_close(fake.grad, torch.sigmoid(fake.detach()) / n)


def test_minimax_saturates_and_ns_does_not():
    """D confidently rejects fakes (D(G(z)) ~ 5e-5): minimax gives G almost no gradient."""
    torch.manual_seed(0)
    G, D = build_models("mlp", resolution=16, dropout=0.0)
    with torch.no_grad():
        D.main[-1].bias.fill_(-10.0)
        D.main[-1].weight.mul_(0.01)
    z = torch.randn(32, 100)
    norms = {}
    for kind in ("minimax", "ns"):
        G.zero_grad()
        fake_logits = D(G(z))
        assert torch.sigmoid(fake_logits).max() < 1e-3
        loss, _ = g_loss(kind, fake_logits)
        loss.backward()
        norms[kind] = torch.sqrt(sum((p.grad**2).sum() for p in G.parameters())).item()
    assert norms["ns"] > 0
    assert norms["minimax"] < 1e-3 * norms["ns"]
    # On the logits themselves: both push the fake logit up, with weights D vs 1 - D.
    x = torch.full((4,), -10.0, requires_grad=True)
    for kind, expected in (("minimax", torch.sigmoid(x)), ("ns", torch.sigmoid(-x))):
        (grad,) = torch.autograd.grad(g_loss(kind, x)[0], x)
        torch.testing.assert_close(grad, -expected.detach() / 4)


@pytest.mark.parametrize("kind", ["minimax", "ns"])
def test_stable_at_extreme_logits(kind):
    big = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4], requires_grad=True)
    ld, _ = d_loss(kind, big, big)
    lg, _ = g_loss(kind, big)
    assert torch.isfinite(ld) and torch.isfinite(lg)
    (ld + lg).backward()
    assert torch.isfinite(big.grad).all()


@pytest.mark.parametrize("kind", ["minimax", "ns"])
def test_autocast_bf16(kind):
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=16, g_width=8, d_width=8)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    z = torch.randn(4, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = G(z)
        logits = D(torch.cat([real, fake]))
        assert logits.dtype == torch.bfloat16  # D ran in bf16
        real_l, fake_l = logits.chunk(2)
        ld, sd = d_loss(kind, real_l, fake_l)
        lg, sg = g_loss(kind, fake_l)
    for t in (ld, lg, *sd.values(), *sg.values()):
        assert t.dtype == torch.float32 and torch.isfinite(t)
    # Same values as float32 maths on the (bf16-rounded) logits.
    r, f = real_l.detach().float(), fake_l.detach().float()
    torch.testing.assert_close(ld.detach(), bce(r, 1) + bce(f, 0))
    expected_g = bce(f, 1) if kind == "ns" else -bce(f, 0)
    torch.testing.assert_close(lg.detach(), expected_g)
    (ld + lg).backward()
    assert all(torch.isfinite(p.grad).all() for p in D.parameters())


def test_unknown_kind_names_the_flag(logits):
    real, fake = logits
    with pytest.raises(
        ConfigError, match=r"^--loss 'lsgan' must be one of minimax, ns, wgan, wgan-gp, hinge$"
    ):
        d_loss("lsgan", real, fake)
    with pytest.raises(ConfigError, match=r"^--loss 'l2'"):
        g_loss("l2", fake)


def test_wasserstein_and_hinge_equal_hand_computations(logits):
    real, fake = logits
    loss, stats = d_loss("wgan", real, fake)
    assert torch.allclose(loss, fake.mean() - real.mean())
    assert torch.allclose(stats["d_real"], real.mean())
    loss, _ = d_loss("hinge", real, fake)
    assert torch.allclose(
        loss, torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean()
    )
    for kind in ("wgan", "wgan-gp", "hinge"):
        loss, _ = g_loss(kind, fake)
        assert torch.allclose(loss, -fake.mean())
