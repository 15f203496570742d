"""Model registry: `--arch` name -> (G, D), with validation that names the flag.

Models are plain nn.Modules (no ranks, devices or Accelerate). G maps z [B, z_dim] to images
[B, 3, S, S] in [-1, 1]; D maps images to logits [B] (never a sigmoid: see `losses.py`).

Which options an architecture reads:
    mlp    resolution, z_dim, act, dropout  (hidden sizes fixed by the paper)
    dcgan  resolution, z_dim, g_width, d_width  (activations fixed by Radford et al.)
"""

from __future__ import annotations

from torch import nn

from facegan_dist.errors import ConfigError
from facegan_dist.models.dcgan import DCGANDiscriminator, DCGANGenerator, dcgan_init_
from facegan_dist.models.mlp import ACTS, MLPDiscriminator, MLPGenerator

ARCHS = ("mlp", "dcgan")
RESOLUTIONS: dict[str, tuple[int, ...]] = {
    "mlp": (16, 32, 64, 128),  # any size works; 128 px is ~50M weights per net
    "dcgan": (16, 32, 64, 128),
}


def build_models(
    arch: str,
    *,
    resolution: int,
    z_dim: int = 100,
    g_width: int = 64,
    d_width: int = 64,
    act: str = "relu",
    dropout: float = 0.3,
) -> tuple[nn.Module, nn.Module]:
    """Build (G, D) for `arch`, initialised; raises ConfigError naming the offending flag."""
    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch!r} must be one of {', '.join(ARCHS)}")
    sizes = RESOLUTIONS[arch]
    if resolution not in sizes:
        sizes_txt = ", ".join(map(str, sizes))
        raise ConfigError(f"--resolution {resolution} is not supported by {arch} ({sizes_txt})")
    if z_dim < 1:
        raise ConfigError(f"--z-dim {z_dim} must be at least 1")
    if arch == "mlp":
        if act not in ACTS:
            raise ConfigError(f"--act {act!r} must be one of {', '.join(ACTS)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"--dropout {dropout} must be in [0, 1)")
        G = MLPGenerator(resolution=resolution, z_dim=z_dim, act=act, dropout=dropout)
        D = MLPDiscriminator(resolution=resolution, act=act, dropout=dropout)
        return G, D
    for flag, width in (("--g-width", g_width), ("--d-width", d_width)):
        if width < 1:
            raise ConfigError(f"{flag} {width} must be at least 1")
    G = DCGANGenerator(resolution=resolution, z_dim=z_dim, width=g_width)
    D = DCGANDiscriminator(resolution=resolution, width=d_width)
    return G, D


def count_params(m: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in m.parameters())


__all__ = [
    "ACTS",
    "ARCHS",
    "RESOLUTIONS",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "MLPDiscriminator",
    "MLPGenerator",
    "build_models",
    "count_params",
    "dcgan_init_",
]
