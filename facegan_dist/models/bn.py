"""BatchNorm statistics that belong to a generator's own weights (the EMA of G above all).

Why: the EMA of G averages G's weights over thousands of steps, but BatchNorm's running mean and
variance were accumulated by the RAW G's forward passes. An averaged network normalised with
another network's statistics draws from mismatched normalisation: on a real 64 px set the EMA
scored a worse FID than the raw G until its statistics were re-estimated (issue 11).

Method: precise BN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021). Reset the running
statistics, switch only the BatchNorm layers to train mode with `momentum=None` (a cumulative,
equal-weight average instead of an exponential one), and run `BN_CALIBRATION_IMAGES` latents in
batches of `BN_CALIBRATION_BATCH` through G without gradients. The alternatives and why not:
- averaging the running statistics like the weights: they still come from other weights;
- sampling the EMA in train mode (batch statistics): an image would then depend on the batch it
  is drawn in, which breaks seed addressing (`facegan sample --seeds`), and on the batch size.
The calibration latents are fixed seeds (`BN_CALIBRATION_SEED` onwards, drawn per seed as every
latent is, `latent.seed_z`), so the statistics are a pure function of the weights: the same on
every rank, for every batch size later used to sample, and after a resume. Dropout and spectral
norm stay in eval mode during the calibration (no RNG consumed, no power iteration).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BN_CALIBRATION_IMAGES = 1024  # latents per calibration (a few G forwards; ~0.1 s at 32 px CPU)
BN_CALIBRATION_BATCH = 128  # latents per forward: a batch's variance is averaged, so not tiny
BN_CALIBRATION_SEED = 2**40  # far from the seeds users sample (0, 1, 2, ...)


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def calibration_settings() -> dict[str, int]:
    """Recorded in generator.json as `ema_bn_calibration`; a loader recalibrates an EMA
    whose meta lacks it."""
    return {
        "images": BN_CALIBRATION_IMAGES,
        "batch": BN_CALIBRATION_BATCH,
        "seed": BN_CALIBRATION_SEED,
    }


@torch.no_grad()
def recalibrate_bn(
    G: nn.Module,
    conds: Tensor | None = None,
    *,
    images: int = BN_CALIBRATION_IMAGES,
    batch: int = BN_CALIBRATION_BATCH,
    seed: int = BN_CALIBRATION_SEED,
) -> bool:
    """Re-estimate every BatchNorm running mean/var of G from G's own forward passes.

    conds: [K, n_cond] conditions for a conditional G, cycled over the calibration latents
    (the training loop passes real attribute rows). Returns False (and changes nothing) when G
    has no BatchNorm. G is left in eval mode."""
    from facegan_dist.latent import seed_z

    bns = batchnorms(G)
    if not bns:
        return False
    if getattr(G, "n_cond", 0) and conds is None:
        raise ValueError("a conditional G needs conditions to recalibrate its BatchNorm")
    device = next(G.parameters()).device
    momenta = [bn.momentum for bn in bns]
    G.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    try:
        for lo in range(0, images, batch):
            z = seed_z(range(seed + lo, seed + min(lo + batch, images)), G.z_dim).to(device)
            c = None
            if conds is not None:
                idx = torch.arange(lo, lo + z.shape[0]) % conds.shape[0]
                c = conds[idx.to(conds.device)].to(device)
            G(z, c)
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        G.eval()
    return True
