"""Turn generator outputs into pictures: seed -> z, image grids as uint8, PNG files.

Shared by training (fixed-noise grids), `facegan sample` and evaluation. It never imports train/.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def fixed_noise(n: int, z_dim: int, seed: int) -> Tensor:
    """The same [n, z_dim] noise for a given seed on every machine (drawn on CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, z_dim, generator=g)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 [0, 255] (W&B 0.31 no longer rescales floats)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_uint8(images: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """A [3, H, W] uint8 grid from [B, 3, S, S] images (uint8, or floats in [-1, 1])."""
    from torchvision.utils import make_grid

    if images.dtype != torch.uint8:
        images = to_uint8(images)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=0)


def save_png(image_chw_uint8: Tensor, path: Path) -> Path:
    """Write a [3, H, W] uint8 tensor as PNG (atomically: temp name + rename)."""
    import os

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image_chw_uint8.permute(1, 2, 0).contiguous().numpy()
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


@torch.no_grad()
def generate(G: torch.nn.Module, z: Tensor, batch: int = 256) -> Tensor:
    """G(z) in eval mode, in chunks, returned on CPU as float in [-1, 1]."""
    was_training = G.training
    G.eval()
    device = next(G.parameters()).device
    try:
        out = [G(z[i : i + batch].to(device)).float().cpu() for i in range(0, z.shape[0], batch)]
    finally:
        G.train(was_training)
    return torch.cat(out)
