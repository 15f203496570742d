"""Model registry: `--arch` name -> (G, D), with validation that names the flag.

Models are plain nn.Modules (no ranks, devices or Accelerate). G maps z [B, z_dim] to images
[B, 3, S, S] in [-1, 1]; D maps images to logits [B] (never a sigmoid: see `losses.py`).

Which options an architecture reads:
    mlp    resolution, z_dim, act, dropout  (hidden sizes fixed by the paper)
    dcgan  resolution, z_dim, g_width, d_width, upsample, d_norm, mbstd  (Radford et al.)
    both   n_cond (conditional GAN on binary attributes), spectral_norm (d | g | both | none)
"""

from __future__ import annotations

from torch import nn

from facegan_dist.config import ARCH_CHOICES as ARCHS
from facegan_dist.config import SPECTRAL_NORM_CHOICES as SPECTRAL_NORMS
from facegan_dist.errors import ConfigError
from facegan_dist.models.dcgan import (
    D_NORMS,
    UPSAMPLES,
    DCGANDiscriminator,
    DCGANGenerator,
    dcgan_init_,
)
from facegan_dist.models.mlp import ACTS, MLPDiscriminator, MLPGenerator

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
    upsample: str = "convtranspose",
    d_norm: str = "batch",
    spectral_norm: str = "none",
    n_cond: int = 0,
    mbstd: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """Build (G, D) for `arch`, initialised; raises ConfigError naming the offending flag.

    The one check of the model options for callers without a validated TrainConfig (a generator
    meta read from a file, scripts); the choices are those of the options (config.py), and the
    model classes trust what this passes them."""
    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch!r} must be one of {', '.join(ARCHS)}")
    sizes = RESOLUTIONS[arch]
    if resolution not in sizes:
        sizes_txt = ", ".join(map(str, sizes))
        raise ConfigError(f"--resolution {resolution} is not supported by {arch} ({sizes_txt})")
    if z_dim < 1:
        raise ConfigError(f"--z-dim {z_dim} must be at least 1")
    if spectral_norm not in SPECTRAL_NORMS:
        raise ConfigError(
            f"--spectral-norm {spectral_norm!r} must be one of {', '.join(SPECTRAL_NORMS)}"
        )
    if upsample not in UPSAMPLES:
        raise ConfigError(f"--upsample {upsample!r} must be one of {', '.join(UPSAMPLES)}")
    if d_norm not in D_NORMS:
        raise ConfigError(f"--d-norm {d_norm!r} must be one of {', '.join(D_NORMS)}")
    if arch == "mlp":
        if act not in ACTS:
            raise ConfigError(f"--act {act!r} must be one of {', '.join(ACTS)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"--dropout {dropout} must be in [0, 1)")
        G = MLPGenerator(resolution=resolution, z_dim=z_dim, act=act, dropout=dropout,
                         n_cond=n_cond)  # fmt: skip
        D = MLPDiscriminator(resolution=resolution, act=act, dropout=dropout, n_cond=n_cond)
    else:
        for flag, width in (("--g-width", g_width), ("--d-width", d_width)):
            if width < 1:
                raise ConfigError(f"{flag} {width} must be at least 1")
        G = DCGANGenerator(resolution=resolution, z_dim=z_dim, width=g_width, upsample=upsample,
                           n_cond=n_cond)  # fmt: skip
        D = DCGANDiscriminator(resolution=resolution, width=d_width, norm=d_norm, n_cond=n_cond,
                               mbstd=mbstd)  # fmt: skip
    if spectral_norm in ("g", "both"):
        apply_spectral_norm(G)
    if spectral_norm in ("d", "both"):
        apply_spectral_norm(D)
    return G, D


def apply_spectral_norm(model: nn.Module) -> nn.Module:
    """Spectral normalisation (Miyato et al. 2018) of every conv / linear weight, in place: the
    weight is divided by its largest singular value, estimated by one power iteration per
    forward in train mode (torch's parametrization; the estimate is a buffer)."""
    from torch.nn.utils.parametrizations import spectral_norm

    layers = [
        m for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)
    ]
    for m in layers:
        spectral_norm(m)
    return model


def count_params(m: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in m.parameters())


__all__ = [
    "ACTS",
    "D_NORMS",
    "SPECTRAL_NORMS",
    "UPSAMPLES",
    "apply_spectral_norm",
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
