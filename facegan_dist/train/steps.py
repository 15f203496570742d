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

from collections.abc import Callable

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


STAT_KEYS = ("loss_d", "d_real", "d_fake", "loss_g", "d_fake_g")


class GANStep:
    """One training step (d_steps D updates on one step in d_every, then one G update) with its
    on-device bookkeeping. Used by the training loop and by `facegan bench train`, so the
    benchmark times exactly the code that trains.

    Noise: this rank's slice of the GLOBAL batch of noise drawn from a generator seeded by
    (seed, step, phase), so a sample's noise does not depend on the number of processes and a
    resumed run needs no RNG state for it. Stats: summed on the device (no host sync); the
    caller reduces them at log time with `take_stats()`.
    """

    def __init__(
        self,
        acc,
        G: nn.Module,
        D: nn.Module,
        opt_g,
        opt_d,
        *,
        loss: str,
        d_every: int,
        d_steps: int,
        batch: int,
        z_dim: int,
        seed: int,
    ) -> None:
        self.acc, self.G, self.D, self.opt_g, self.opt_d = acc, G, D, opt_g, opt_d
        self.loss, self.d_every, self.d_steps = loss, d_every, d_steps
        self.batch, self.z_dim, self.seed = batch, z_dim, seed
        self.device = acc.device
        bpd = batch // acc.num_processes
        self.rank_slice = slice(acc.process_index * bpd, (acc.process_index + 1) * bpd)
        self.z_gen = torch.Generator(device=self.device)
        # one G forward serves the D step (detached) and the G step when D trains once per step
        self.fused = d_steps == 1 and d_every == 1
        self.stats_sum = torch.zeros(len(STAT_KEYS), device=self.device)
        self.first_bad = torch.full((), float("inf"), device=self.device)  # first non-finite step
        self.n_d = self.n_g = 0

    def draw_z(self, step: int, phase: int) -> Tensor:
        """Phase 0 is the G update, 1..d_steps the D updates."""
        self.z_gen.manual_seed((self.seed * 1_000_003 + step) * 64 + phase)
        z = torch.randn(self.batch, self.z_dim, device=self.device, generator=self.z_gen)
        return z[self.rank_slice]

    def _track(self, step: int, offset: int, values: list[Tensor]) -> None:
        self.stats_sum[offset : offset + len(values)] += torch.stack(values)
        bad = ~torch.isfinite(values[0])
        self.first_bad = torch.where(bad & torch.isinf(self.first_bad), step, self.first_bad)

    def __call__(self, step: int, next_real: Callable[[], Tensor]) -> int:
        """Run step `step`; `next_real()` returns a real batch (float in [-1, 1], on device).
        Returns the number of real batches consumed."""
        consumed = 0
        fake = None
        if step % self.d_every == 0:
            for sub in range(self.d_steps):
                real = next_real()
                z = self.draw_z(step, 1 + sub)
                if self.fused:
                    fake = self.G(z)
                    fake_d = fake.detach()
                else:
                    with torch.no_grad():
                        fake_d = self.G(z)
                sd = d_step(self.acc, self.D, self.opt_d, real, fake_d, self.loss)
                self._track(step, 0, [sd["loss_d"], sd["d_real"], sd["d_fake"]])
                self.n_d += 1
                consumed += 1
        if fake is None:
            fake = self.G(self.draw_z(step, 0))
        sg = g_step(self.acc, self.D, self.opt_g, fake, self.loss)
        self._track(step, 3, [sg["loss_g"], sg["d_fake_g"]])
        self.n_g += 1
        return consumed

    def take_stats(self, reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, float | None]:
        """Means over the interval and over ranks (a collective via `reduce_sum`); resets."""
        world = self.acc.num_processes
        totals = reduce_sum(self.stats_sum).tolist()  # the one host sync per interval
        out: dict[str, float | None] = {}
        for i, k in enumerate(STAT_KEYS):
            n = self.n_d if i < 3 else self.n_g
            out[k] = totals[i] / (n * world) if n else None
        self.stats_sum.zero_()
        self.n_d = self.n_g = 0
        return out
