"""The paper's first networks: fully connected G and D (section 4.1.1 / 4.2.1, runs T1 and T2).

Reading of the paper (pt), which follows the Real Python MNIST GAN tutorial:

- D: Linear 3*S*S -> 1024 -> 512 -> 256 -> 1, the same activation between all layers and
  "dropout de 30% entre todas as camadas", i.e. after each hidden layer. The paper ends D with a
  sigmoid; here D returns the logit and the sigmoid lives inside the loss (`losses.py`), which is
  the same function, numerically stable and allowed under autocast.
- G: Linear z_dim(100) -> 256 -> 512 -> 1024 -> 3*S*S, tanh on the output. Section 4.2.1 says
  that every change made to D (adding dropout, ReLU -> LeakyReLU) was made to G "pela mesma
  lógica", so G also gets dropout after each hidden layer (the tutorial's G has none). Dropout
  is active only in train mode: sample with `G.eval()`.
- `act="relu"` is run T1, `act="leaky"` (LeakyReLU, slope 0.2) is run T2 (section 6.1); the
  same activation is used in both nets, as the paper switched D and G together.

Weights keep PyTorch's default Linear init, as in the tutorial (no DCGAN init here).
Conditional (`n_cond` > 0): G reads [z, 2c-1] and D reads [x, 2c-1], c in {0, 1}^n_cond.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn

from facegan_dist.config import ACT_CHOICES as ACTS  # declared with --act; build_models checks

IMG_CHANNELS = 3
LEAKY_SLOPE = 0.2  # the paper's "leakage rating" p
G_HIDDEN = (256, 512, 1024)  # section 4.2.1
D_HIDDEN = (1024, 512, 256)  # section 4.1.1


def _act(act: str) -> nn.Module:
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "leaky":
        return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
    raise ValueError(f"act {act!r} must be one of {', '.join(ACTS)}")  # not relu or leaky


def _hidden_stack(sizes: tuple[int, ...], act: str, dropout: float) -> list[nn.Module]:
    """Linear -> act -> Dropout for each consecutive pair in `sizes` (every hidden layer)."""
    layers: list[nn.Module] = []
    for n_in, n_out in pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), _act(act), nn.Dropout(dropout)]
    return layers


class MLPGenerator(nn.Module):
    """z [B, z_dim] -> image [B, 3, S, S] in [-1, 1]."""

    def __init__(
        self,
        *,
        resolution: int,
        z_dim: int = 100,
        act: str = "relu",
        dropout: float = 0.3,
        n_cond: int = 0,
    ) -> None:
        super().__init__()
        self.resolution, self.z_dim, self.n_cond = resolution, z_dim, n_cond
        n_out = IMG_CHANNELS * resolution * resolution
        self.main = nn.Sequential(
            # [B, z(+c)] -> [B, 256] -> [B, 512] -> [B, 1024], each Linear + act + Dropout
            *_hidden_stack((z_dim + n_cond, *G_HIDDEN), act, dropout),
            nn.Linear(G_HIDDEN[-1], n_out),  # [B, 3*S*S]
            nn.Tanh(),
        )

    def forward(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        if self.n_cond:
            z = torch.cat([z, 2 * c.to(z.dtype) - 1], dim=1)  # [B, z + n_cond]
        x = self.main(z)  # [B, 3*S*S]
        return x.view(z.shape[0], IMG_CHANNELS, self.resolution, self.resolution)  # [B, 3, S, S]


class MLPDiscriminator(nn.Module):
    """image [B, 3, S, S] -> logits [B] (no sigmoid)."""

    def __init__(
        self, *, resolution: int, act: str = "relu", dropout: float = 0.3, n_cond: int = 0
    ) -> None:
        super().__init__()
        self.resolution, self.n_cond = resolution, n_cond
        n_in = IMG_CHANNELS * resolution * resolution + n_cond
        self.main = nn.Sequential(
            # [B, 3*S*S(+c)] -> [B, 1024] -> [B, 512] -> [B, 256], each Linear + act + Dropout
            *_hidden_stack((n_in, *D_HIDDEN), act, dropout),
            nn.Linear(D_HIDDEN[-1], 1),  # [B, 1]
        )

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        x = x.flatten(1)  # [B, 3*S*S]
        if self.n_cond:
            x = torch.cat([x, 2 * c.to(x.dtype) - 1], dim=1)  # [B, 3*S*S + n_cond]
        return self.main(x).squeeze(1)  # [B] logits
