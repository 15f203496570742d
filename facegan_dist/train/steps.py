"""One D update and one G update. Pure step logic on already-prepared modules.

No host syncs: stats come back as detached device tensors for the loop to accumulate.
D is called twice in the D step (real batch, then fake batch) as in the DCGAN tutorial: separate
BatchNorm statistics for real and fake (ganhacks: never mix them in one batch); DDP is built with
`broadcast_buffers=False` so this is legal under DDP.

With one D update per G update the loop draws `fake = G(z)` once, with its graph: the D step sees
`fake.detach()` and the G step back-propagates through the same `fake`, as the PyTorch DCGAN
tutorial does. That saves one G forward per step compared with regenerating the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facegan_dist.losses import Stats, d_loss, g_loss


def to_model_input(images_u8: Tensor, device: torch.device) -> Tensor:
    """uint8 [B, 3, S, S] -> float32 in [-1, 1] on `device` (normalisation happens on device)."""
    x = images_u8.to(device, non_blocking=True)
    return x.float().div_(127.5).sub_(1.0)


def d_step(acc, D: nn.Module, opt_d, real: Tensor, fake: Tensor, loss: str) -> Stats:
    """One D update on a real batch and a DETACHED fake batch (G gets no gradient)."""
    real_logits = D(real)
    fake_logits = D(fake)
    loss_d, stats = d_loss(loss, real_logits, fake_logits)
    acc.backward(loss_d)
    opt_d.step()
    opt_d.zero_grad(set_to_none=True)
    return stats


def g_step(acc, D: nn.Module, opt_g, fake: Tensor, loss: str) -> Stats:
    """One G update from `fake = G(z)` (with its graph) through a frozen D: D's parameters get no
    gradient, so nothing leaks into D even on a non-sync micro-step."""
    D.requires_grad_(False)
    try:
        loss_g, stats = g_loss(loss, D(fake))
        acc.backward(loss_g)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    finally:
        D.requires_grad_(True)
    return stats
