"""Exponential moving average of G (StyleGAN2-ADA style): half-life in thousands of images.

beta = 0.5 ** (batch / half_life_images), with a ramp-up that caps the half-life at
`rampup * images_seen` early in training, so the average is not dominated by the random init.
Parameters are averaged. BatchNorm running statistics are NOT copied from G: they belong to G's
weights, not to the average. `ready()` re-estimates them from the EMA's own forward passes
(`models.bn.recalibrate_bn`, seeded, so the same on every rank) before each use: grids,
evaluation, checkpoints and the export. Other buffers (spectral-norm vectors) are copied.
Every rank keeps the same copy (G is identical on every rank under DDP), so sampling can be
split across ranks.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from facegan_dist.models.bn import batchnorms, recalibrate_bn


class EMA:
    def __init__(self, G: nn.Module, half_life_kimg: float, rampup: float | None = 0.05) -> None:
        self.module = copy.deepcopy(G).eval().requires_grad_(False)
        self.half_life_kimg, self.rampup = half_life_kimg, rampup
        self._bn_stale = True  # the BN statistics do not (yet) belong to the current weights

    def beta(self, batch: int, images_seen: int) -> float:
        half_life = self.half_life_kimg * 1000
        if self.rampup is not None:
            half_life = min(half_life, images_seen * self.rampup)
        return 0.5 ** (batch / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, G: nn.Module, batch: int, images_seen: int) -> None:
        """After a G update: ema <- beta * ema + (1 - beta) * G (no host sync). The tensor lists
        are built once per source module, not every step (the optimizer updates in place)."""
        if getattr(self, "_source", None) is not G:
            self._source = G
            self._ema_params = list(self.module.parameters())
            self._src_params = [p.detach() for p in G.parameters()]
            self._ema_buffers, self._src_buffers = _non_bn_buffers(self.module, G)
        beta = self.beta(batch, images_seen)
        torch._foreach_lerp_(self._ema_params, self._src_params, 1.0 - beta)
        if self._ema_buffers:
            torch._foreach_copy_(self._ema_buffers, self._src_buffers)
        self._bn_stale = True

    def ready(self, conds: Tensor | None = None) -> nn.Module:
        """The EMA module, in eval mode, with BatchNorm statistics of its own weights
        (recalibrated only after the weights changed: grid, evaluation and checkpoint of one
        step share one calibration)."""
        if self._bn_stale:
            recalibrate_bn(self.module, conds)
            self._bn_stale = False
        return self.module.eval()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
        self._bn_stale = True


def _non_bn_buffers(ema: nn.Module, src: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The buffers to copy from G each update: all but BatchNorm's running statistics."""

    def named(m: nn.Module) -> list[tuple[str, Tensor]]:
        bn_ids = {id(b) for bn in batchnorms(m) for b in bn.buffers()}
        return [(k, b) for k, b in m.named_buffers() if id(b) not in bn_ids]

    a, b = named(ema), named(src)
    if [k for k, _ in a] != [k for k, _ in b]:
        raise ValueError("EMA and source modules have different buffers")
    return [t for _, t in a], [t for _, t in b]
