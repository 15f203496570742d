"""DiffAugment (Zhao et al. 2020): differentiable augmentation of everything D sees.

With few images (the paper's 15,000-image runs) D memorises the training set; augmenting real
AND fake images with the same differentiable transforms keeps D from overfitting while G still
gets gradients through the augmentation. Policies: `color` (brightness, saturation, contrast),
`translation` (1/8 of the image, zero padded), `cutout` (a square of half the image side).

The random parameters are drawn explicitly (`params`) from a generator the caller seeds, for the
GLOBAL batch, so every rank applies the transforms its slice of the global batch would get (the
same for any number of processes, reproducible by seed), and one draw is applied to the real and
to the fake batch alike (`apply` is a pure function of the images and the parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The policy names (config.AUGMENT_CHOICES) and `--augment` parsing (config.parse_policy) live
# with the option in config.py (torch-free); this module takes the parsed tuple.
__all__ = ["apply", "params", "slice_params"]

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def params(policy: tuple[str, ...], n: int, size: int, gen: torch.Generator, device) -> dict:
    """Random parameters for `n` images of `size` px: one dict of [n, ...] tensors."""
    out: dict[str, Tensor] = {}

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, device=device)

    def randint(low: int, high: int, *shape: int) -> Tensor:
        return torch.randint(low, high, shape, generator=gen, device=device)

    if "color" in policy:
        out["brightness"] = rand(n, 1, 1, 1) - 0.5  # added
        out["saturation"] = rand(n, 1, 1, 1) * 2  # x 0..2 around the pixel's grey value
        out["contrast"] = rand(n, 1, 1, 1) + 0.5  # x 0.5..1.5 around the image mean
    if "translation" in policy:
        shift = int(size * TRANSLATION_RATIO + 0.5)
        out["shift"] = randint(-shift, shift + 1, n, 2)  # (dy, dx) in pixels
    if "cutout" in policy:
        cut = int(size * CUTOUT_RATIO + 0.5)
        out["cutout"] = randint(0, size + (1 - cut % 2), n, 2)  # centre (y, x)
    return out


def slice_params(p: dict[str, Tensor], sl: slice) -> dict[str, Tensor]:
    """This rank's rows of global-batch parameters."""
    return {k: v[sl] for k, v in p.items()}


def apply(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    """Augment images x [B, C, H, W] with parameters `p` (differentiable in x)."""
    if "brightness" in p:
        x = x + p["brightness"].to(x.dtype)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * p["saturation"].to(x.dtype) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * p["contrast"].to(x.dtype) + mean
    if "shift" in p:
        x = _translate(x, p["shift"])
    if "cutout" in p:
        x = _cutout(x, p["cutout"])
    return x


def _translate(x: Tensor, shift: Tensor) -> Tensor:
    """Shift each image by (dy, dx) pixels, filling with zeros."""
    B, _, H, W = x.shape
    dev = x.device
    gy = torch.arange(H, device=dev).view(1, H, 1) + shift[:, 0].view(B, 1, 1) + 1
    gx = torch.arange(W, device=dev).view(1, 1, W) + shift[:, 1].view(B, 1, 1) + 1
    gy, gx = gy.clamp(0, H + 1), gx.clamp(0, W + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # [B, H+2, W+2, C], zero border
    b = torch.arange(B, device=dev).view(B, 1, 1)
    return padded[b, gy.expand(B, H, W), gx.expand(B, H, W)].permute(0, 3, 1, 2)


def _cutout(x: Tensor, centre: Tensor) -> Tensor:
    """Zero a square of half the image side around each centre (clipped at the border)."""
    B, _, H, W = x.shape
    cut = int(H * CUTOUT_RATIO + 0.5)
    dev = x.device
    ys = torch.arange(H, device=dev).view(1, H, 1)
    xs = torch.arange(W, device=dev).view(1, 1, W)
    y0 = (centre[:, 0] - cut // 2).view(B, 1, 1)
    x0 = (centre[:, 1] - cut // 2).view(B, 1, 1)
    inside = (ys >= y0) & (ys < y0 + cut) & (xs >= x0) & (xs < x0 + cut)  # [B, H, W]
    return x * (~inside).unsqueeze(1).to(x.dtype)
