"""Stabilised and conditional GANs: penalties, spectral norm, DiffAugment, conditioning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from facegan_dist.config import parse_policy
from facegan_dist.models import build_models
from facegan_dist.train import augment
from facegan_dist.train.steps import gradient_penalty, r1_penalty

NO_SCALER = SimpleNamespace(scaler=None)  # what the penalties read from the Accelerator


class Linear(nn.Module):
    """A linear critic D(x) = <w, x>: its input gradient is w everywhere."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, c=None):
        return (x.flatten(1) * self.w).sum(1)


def test_gradient_penalty_of_a_linear_critic_is_analytic():
    torch.manual_seed(0)
    w = torch.randn(3 * 4 * 4)
    D = Linear(w.clone())
    real, fake = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    eps = torch.rand(8, 1, 1, 1)
    gp = gradient_penalty(NO_SCALER, D, real, fake, eps)
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)
    gp.backward()  # the penalty is differentiable in D's weights (double backward)
    expected = 2 * (w.norm() - 1) * w / w.norm()
    assert torch.allclose(D.w.grad, expected, atol=1e-5)


def test_gradient_penalty_uses_unscaled_gradients():
    """Under fp16 the loss scale multiplies the output before autograd.grad; the penalty must
    not change with the scale."""
    w = torch.randn(48)
    D = Linear(w)
    real, fake, eps = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.rand(4, 1, 1, 1)

    class Scaler:
        def is_enabled(self):
            return True

        def get_scale(self):
            return 65536.0

    scaled = gradient_penalty(SimpleNamespace(scaler=Scaler()), D, real, fake, eps)
    plain = gradient_penalty(NO_SCALER, D, real, fake, eps)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-5)


def test_r1_equals_hand_computation():
    # D(x) = sum(a * x^2): grad = 2 a x, so R1 = mean_i ||2 a x_i||^2
    a = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (a * x**2).flatten(1).sum(1)
    r1 = r1_penalty(NO_SCALER, logits, x)
    expected = ((2 * a * x.detach()) ** 2).flatten(1).sum(1).mean()
    assert r1.item() == pytest.approx(expected.item(), rel=1e-5)


def test_spectral_norm_keeps_top_singular_value_near_one_after_training():
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=16, g_width=8, d_width=8, spectral_norm="d",
                        d_norm="none")  # fmt: skip
    opt = torch.optim.Adam(D.parameters(), lr=1e-2)  # large steps: the raw weights move a lot
    for _ in range(30):
        x = torch.randn(8, 3, 16, 16)
        loss = torch.relu(1 - D(x)).mean() + torch.relu(1 + D(G(torch.randn(8, 100)))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    D.train()
    for _ in range(20):  # let the power iteration (one step per forward) settle
        D(torch.randn(8, 3, 16, 16))
    D.eval()
    sn_layers = [m for m in D.modules() if hasattr(m, "parametrizations")]
    assert len(sn_layers) == 3  # 2 strided convs + the final conv at 16 px
    raw_sigmas = []
    for m in sn_layers:
        w = m.weight.detach().flatten(1)  # the normalised weight, as [out, in*k*k]
        sigma = torch.linalg.matrix_norm(w, ord=2).item()
        raw = m.parametrizations.weight.original.detach().flatten(1)
        raw_sigmas.append(torch.linalg.matrix_norm(raw, ord=2).item())
        assert sigma == pytest.approx(1.0, abs=0.05), sigma
    # the unnormalised weights are far from norm 1: SN does the work, not a lucky init
    assert max(abs(r - 1) for r in raw_sigmas) > 0.2, raw_sigmas


def test_diffaugment_is_reproducible_and_applied_alike():
    policy = parse_policy("color,translation,cutout")
    x = torch.rand(6, 3, 16, 16) * 2 - 1

    def draw(seed):
        return augment.params(policy, 6, 16, torch.Generator().manual_seed(seed), "cpu")

    a, b, other = draw(3), draw(3), draw(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(augment.apply(x, a), augment.apply(x, b))
    assert not torch.equal(augment.apply(x, a), augment.apply(x, other))
    # one draw for real and fake: the same transform for the same image index
    fake = x.clone().requires_grad_(True)
    out_real, out_fake = augment.apply(x, a), augment.apply(fake, a)
    assert torch.equal(out_real, out_fake.detach())
    out_fake.sum().backward()  # differentiable, so G gets gradients through it
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    # a rank's slice of the global draw is what that rank applies
    half = augment.slice_params(a, slice(3, 6))
    assert torch.equal(augment.apply(x[3:], half), augment.apply(x, a)[3:])


def test_translation_and_cutout_move_and_erase_pixels():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    moved = augment.apply(x, {"shift": torch.tensor([[1, -2]])})
    assert moved[0, 0].nonzero().tolist() == [[3, 6]]  # content shifts by (-dy, -dx)
    cut = augment.apply(torch.ones(1, 1, 8, 8), {"cutout": torch.tensor([[4, 4]])})
    assert cut.sum().item() == 64 - 16  # a 4x4 square (half the side) is zeroed


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_conditional_shapes_and_projection(arch):
    torch.manual_seed(0)
    G, D = build_models(arch, resolution=16, g_width=8, d_width=8, n_cond=5)
    z, c = torch.randn(4, 100), torch.randint(0, 2, (4, 5))
    x = G(z, c)
    assert x.shape == (4, 3, 16, 16)
    assert D(x, c).shape == (4,)
    G.eval()
    D.eval()
    # the condition changes both outputs
    assert not torch.allclose(G(z, c), G(z, 1 - c))
    assert not torch.allclose(D(x, c), D(x, 1 - c))


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_resize_convolution_generator(upsample):
    G, _ = build_models("dcgan", resolution=32, g_width=8, upsample=upsample)
    assert G(torch.randn(2, 100)).shape == (2, 3, 32, 32)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in G.main[4:])
