"""Pictures from a generator: G(z) in chunks, seed-addressed images, uint8, grids, strips, PNG.

A leaf for everyone who draws: training (fixed-noise grids), tracking (the PNG mirror), the data
preview, `facegan sample`, `facegan directions` and evaluation. It imports only `latent` (seed ->
z) and `paths` (atomic writes); no model, no run folder, no ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from facegan_dist.latent import truncated_z
from facegan_dist.paths import atomic_path


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


def seed_images(
    G: torch.nn.Module,
    seeds: list[int] | range,
    *,
    psi: float = 1.0,
    mode: str = "shrink",
    batch: int = 64,
) -> Tensor:
    """[len(seeds), 3, S, S] float in [-1, 1] on CPU; image i depends on seeds[i] only (G in
    eval mode: BatchNorm uses its running statistics, dropout is off)."""
    return generate(G, truncated_z(seeds, G.z_dim, psi, mode), batch=batch)


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


def strip_uint8(images: Tensor, padding: int = 2) -> Tensor:
    """One row of images -> [3, H, W] uint8."""
    return grid_uint8(images, nrow=images.shape[0], padding=padding)


def save_png(image_chw_uint8: Tensor, path: Path) -> Path:
    """Write a [3, H, W] uint8 tensor as PNG (atomically: temp name + rename; a failed write
    leaves no temp file)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image_chw_uint8.permute(1, 2, 0).contiguous().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path
