"""The pieces of a training run that `train()` and `facegan bench train` build the same way,
so the benchmark times exactly what trains: backend switches, models, optimizers, the step."""

from __future__ import annotations

import torch
from torch import nn

from facegan_dist.config import TrainConfig
from facegan_dist.train.steps import GANStep, to_model_input


def apply_backend_settings(fast: dict[str, bool], device_type: str) -> None:
    """Deterministic kernels or cuDNN autotuning; TF32 on or off (process-wide switches)."""
    if fast["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device_type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms
    torch.backends.cuda.matmul.allow_tf32 = fast["tf32"]
    torch.backends.cudnn.allow_tf32 = fast["tf32"]


def check_device_settings(cfg: TrainConfig, acc) -> None:
    """Settings that depend on the devices the Accelerator got (one line each, before any file
    is written)."""
    from facegan_dist.errors import ConfigError

    world, kind = acc.num_processes, acc.device.type
    if cfg.cuda_graphs and (kind != "cuda" or world != 1):
        raise ConfigError(
            f"--cuda-graphs needs one process on one CUDA device (here: {world} x {kind}); "
            "leave it off"
        )
    if cfg.sync_bn and kind != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on CPU/MPS)")


def build_gan(cfg: TrainConfig, resolution: int, n_cond: int = 0) -> tuple[nn.Module, nn.Module]:
    """(G, D) as the config describes them (before channels_last / prepare)."""
    from facegan_dist.models import build_models

    return build_models(
        cfg.arch,
        resolution=resolution,
        z_dim=cfg.z_dim,
        g_width=cfg.g_width,
        d_width=cfg.d_width,
        act=cfg.act,
        dropout=cfg.dropout,
        upsample=cfg.upsample,
        d_norm=cfg.resolved_d_norm,
        spectral_norm=cfg.spectral_norm,
        n_cond=n_cond,
        mbstd=cfg.mbstd,
    )


def memory_format_and_optimizers(G, D, cfg: TrainConfig, fast: dict[str, bool]):
    """channels_last if asked, then Adam per network (fused if asked) -> (G, D, opt_g, opt_d)."""
    if fast["channels_last"]:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    adam = {"fused": True} if fast["fused_adam"] else {}
    if fast["cuda_graphs"]:
        adam["capturable"] = True  # optimizer step counters on the device, so it can be captured
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=cfg.betas_g, **adam)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=cfg.betas_d, **adam)
    return G, D, opt_g, opt_d


def build_step(
    acc, G, D, opt_g, opt_d, cfg: TrainConfig, fast: dict[str, bool], *, batch: int,
    resolution: int,
) -> GANStep:  # fmt: skip
    """The GANStep over the PREPARED modules. torch.compile wraps them for the step only:
    checkpoints, the EMA and exports keep using the plain modules (no `_orig_mod.` keys). A
    penalty needs a double backward through D, which compiled autograd does not support
    (pytorch#91469): then only G is compiled."""
    G_step, D_step = G, D
    if fast["compile"]:
        G_step = torch.compile(G)
        if not (cfg.loss == "wgan-gp" or cfg.r1):
            D_step = torch.compile(D)
    return gan_step_for(acc, G_step, D_step, opt_g, opt_d, cfg, batch=batch,
                        resolution=resolution, cuda_graphs=fast["cuda_graphs"])  # fmt: skip


def gan_step_for(
    acc, G, D, opt_g, opt_d, cfg: TrainConfig, *, batch: int, resolution: int,
    cuda_graphs: bool = False,
) -> GANStep:  # fmt: skip
    """The GANStep the config describes, over exactly these modules (no compile)."""
    from facegan_dist.config import parse_policy

    return GANStep(
        acc, G, D, opt_g, opt_d, loss=cfg.loss, d_every=cfg.d_every,
        d_steps=cfg.d_steps, batch=batch, z_dim=cfg.z_dim, seed=cfg.seed, resolution=resolution,
        augment=parse_policy(cfg.augment), gp_lambda=cfg.gp_lambda, r1_gamma=cfg.r1,
        clip=cfg.clip, cuda_graphs=cuda_graphs,
    )  # fmt: skip


def model_input(images_u8: torch.Tensor, device, fast: dict[str, bool]) -> torch.Tensor:
    """uint8 batch -> float in [-1, 1] on the device, in the step's memory format."""
    x = to_model_input(images_u8, device)
    return x.contiguous(memory_format=torch.channels_last) if fast["channels_last"] else x
