"""GAN losses as pure functions of D's logits -> (loss, stats).

D returns logits, never probabilities: with D(x) = sigmoid(l),
    -log D(x)     = softplus(-l)        log(1 - D(x)) = -softplus(l)
so every loss is a softplus of a logit. That is the numerically stable form of BCE (no log(0)
at saturated D) and is allowed under autocast, where Sigmoid + BCELoss is refused. Logits are
cast to float32 first, so a bf16/fp16 D is fine.

Kinds (`--loss`), each a (d_fn, g_fn) pair in `LOSSES`:
    minimax  the paper / Goodfellow et al. 2014: G minimises E[log(1 - D(G(z)))]. Saturates: when
             D confidently rejects fakes (D(G(z)) ~ 0) G's gradient vanishes.
    ns       non-saturating: G minimises -E[log D(G(z))] (same fixed point, strong gradient early).
Both share D's loss, BCE with targets real=1, fake=0: E[softplus(-l_real)] + E[softplus(l_fake)].
    wgan     Wasserstein (Arjovsky et al. 2017): the critic maximises E[C(x)] - E[C(G(z))], G
             minimises -E[C(G(z))]; the Lipschitz constraint comes from weight clipping.
    wgan-gp  the same objective; the constraint is the gradient penalty of Gulrajani et al. 2017,
             added by the D step (`train/steps.py`: it needs D and the images, not just logits).
    hinge    (Lim & Ye 2017, SNGAN): D minimises E[relu(1 - C(x))] + E[relu(1 + C(G(z)))], G
             minimises -E[C(G(z))].
For wgan/wgan-gp/hinge the stats d_real / d_fake are mean critic outputs, not probabilities.

Stats are detached device tensors (no `.item()`, no host sync); reduce them at log time.
    d step: loss_d, d_real = mean D(x), d_fake = mean D(G(z))
    g step: loss_g, d_fake_g = mean D(G(z)) seen by the G step (after D's update)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from facegan_dist.errors import ConfigError

Stats = dict[str, Tensor]


def _d_bce(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Stats]:
    """D maximises log D(x) + log(1 - D(G(z))), i.e. minimises BCE(real, 1) + BCE(fake, 0)."""
    real, fake = real_logits.float(), fake_logits.float()
    loss = F.softplus(-real).mean() + F.softplus(fake).mean()
    stats = {
        "loss_d": loss.detach(),
        "d_real": torch.sigmoid(real.detach()).mean(),
        "d_fake": torch.sigmoid(fake.detach()).mean(),
    }
    return loss, stats


def _g_stats(loss: Tensor, fake: Tensor) -> Stats:
    return {"loss_g": loss.detach(), "d_fake_g": torch.sigmoid(fake.detach()).mean()}


def _g_minimax(fake_logits: Tensor) -> tuple[Tensor, Stats]:
    """G minimises E[log(1 - D(G(z)))] = E[-softplus(l)] = -BCE(fake, 0). Always <= 0."""
    fake = fake_logits.float()
    loss = (-F.softplus(fake)).mean()
    return loss, _g_stats(loss, fake)


def _g_ns(fake_logits: Tensor) -> tuple[Tensor, Stats]:
    """G minimises -E[log D(G(z))] = E[softplus(-l)] = BCE(fake, 1)."""
    fake = fake_logits.float()
    loss = F.softplus(-fake).mean()
    return loss, _g_stats(loss, fake)


def _critic_stats(loss: Tensor, real: Tensor, fake: Tensor) -> Stats:
    return {"loss_d": loss.detach(), "d_real": real.detach().mean(), "d_fake": fake.detach().mean()}


def _d_wgan(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Stats]:
    """The critic maximises E[C(x)] - E[C(G(z))]: minimises the negation."""
    real, fake = real_logits.float(), fake_logits.float()
    loss = fake.mean() - real.mean()
    return loss, _critic_stats(loss, real, fake)


def _d_hinge(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Stats]:
    real, fake = real_logits.float(), fake_logits.float()
    loss = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return loss, _critic_stats(loss, real, fake)


def _g_critic(fake_logits: Tensor) -> tuple[Tensor, Stats]:
    """G maximises the critic's score of its samples (wgan, wgan-gp, hinge)."""
    fake = fake_logits.float()
    loss = -fake.mean()
    return loss, {"loss_g": loss.detach(), "d_fake_g": fake.detach().mean()}


class LossPair(NamedTuple):
    d: Callable[[Tensor, Tensor], tuple[Tensor, Stats]]  # (real_logits, fake_logits)
    g: Callable[[Tensor], tuple[Tensor, Stats]]  # (fake_logits)


LOSSES: dict[str, LossPair] = {
    "minimax": LossPair(d=_d_bce, g=_g_minimax),
    "ns": LossPair(d=_d_bce, g=_g_ns),
    "wgan": LossPair(d=_d_wgan, g=_g_critic),
    "wgan-gp": LossPair(d=_d_wgan, g=_g_critic),
    "hinge": LossPair(d=_d_hinge, g=_g_critic),
}


def get_loss(kind: str) -> LossPair:
    """The (d_fn, g_fn) pair for `--loss kind`; ConfigError naming the flag if unknown."""
    try:
        return LOSSES[kind]
    except KeyError:
        raise ConfigError(f"--loss {kind!r} must be one of {', '.join(LOSSES)}") from None


def d_loss(kind: str, real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Stats]:
    """D's loss (scalar float32, differentiable) and detached stats for loss `kind`."""
    return get_loss(kind).d(real_logits, fake_logits)


def g_loss(kind: str, fake_logits: Tensor) -> tuple[Tensor, Stats]:
    """G's loss (scalar float32, differentiable) and detached stats for loss `kind`."""
    return get_loss(kind).g(fake_logits)
