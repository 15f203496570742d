"""The only rank-aware module: build the Accelerator, print on rank 0, reduce stats, seed ranks.

Models, losses and data know nothing of ranks; the training loop asks this module. Rules kept here
(see ../shared/STACK-NOTES.md):
- DDP without buffer broadcast: D is called twice per step (real, then fake) and DDP's in-place
  copy of BatchNorm buffers before each forward breaks autograd (pytorch#22095).
- On a CPU box torchrun children need `cpu=True`, otherwise each is a lone rank 0.
- fp16 on CPU is silently ignored by torch autocast, so it is refused here instead.
- Every rank calls every collective; only the main process writes files and logs.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from typing import Any

import torch

from facegan_dist.errors import ConfigError

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def _torchrun_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(precision: str, log_with: str | None = None, project_dir: str | None = None):
    """One Accelerator for the whole process, with our DDP and process-group settings."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    cpu = (not cuda and _torchrun_world_size() > 1) or os.environ.get("ACCELERATE_USE_CPU") in (
        "1",
        "true",
        "True",
    )
    if precision == "fp16" and not cuda and not torch.backends.mps.is_available():
        raise ConfigError("--precision fp16 needs a CUDA or MPS device (CPU ignores it); use bf16")
    # torch 2.14 deprecates broadcast_buffers in favour of forward_sync_buffers; we rely on the
    # documented semantics of broadcast_buffers=False (no per-forward BN buffer copy).
    warnings.filterwarnings(
        "ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning
    )
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT),
        ],
    )
    # Check the effective settings: some Accelerator arguments are silently ignored.
    if acc.mixed_precision != precision:
        raise ConfigError(
            f"--precision {precision}: Accelerate runs with {acc.mixed_precision!r} "
            "(check the accelerate config file / ACCELERATE_MIXED_PRECISION)"
        )
    if _torchrun_world_size() != acc.num_processes:
        raise ConfigError(
            f"launched {_torchrun_world_size()} processes but Accelerate sees {acc.num_processes}; "
            "on CPU use launch/cpu-2proc.yaml, not `accelerate launch --cpu`"
        )
    return acc


def batch_per_device(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ConfigError(
            f"--batch {global_batch} must be divisible by the {world_size} processes "
            f"(e.g. --batch {max(world_size, global_batch - global_batch % world_size)})"
        )
    return global_batch // world_size


def print0(acc, *args: Any, **kwargs: Any) -> None:
    """print() on the main process only (to stderr unless `file=` is given)."""
    if acc is None or acc.is_main_process:
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def reduce_sum(acc, t: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over ranks (every rank must call this)."""
    return acc.reduce(t, reduction="sum") if acc.num_processes > 1 else t


def reduce_min(acc, t: torch.Tensor) -> torch.Tensor:
    if acc.num_processes == 1:
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def any_rank(acc, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (a collective: call it on all ranks)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def seed_rank(acc, seed: int) -> None:
    """Seed python/numpy/torch with seed + rank so ranks draw different noise."""
    from accelerate.utils import set_seed

    set_seed(seed, device_specific=True)


def runtime_info(acc, global_batch: int) -> dict[str, Any]:
    """What actually runs: written to run.json and sent to W&B, never into the config."""
    import accelerate

    world = acc.num_processes
    info = {
        "world_size": world,
        "num_machines": int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", 1)) or 1),
        "batch": global_batch,
        "batch_per_device": batch_per_device(global_batch, world),
        "precision": acc.mixed_precision,
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "device": str(acc.device),
        "device_name": (
            torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else None
        ),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
        },
    }
    try:
        import wandb
        import webdataset

        from facegan_dist import __version__

        info["versions"].update(
            webdataset=webdataset.__version__, wandb=wandb.__version__, facegan_dist=__version__
        )
    except Exception:  # versions are informational
        pass
    return info


def param_digests(acc, *models: torch.nn.Module) -> list[str]:
    """sha256 of each rank's parameters, gathered from every rank (a collective).

    Stored in every checkpoint so a DDP desync is visible: all entries must be equal. BatchNorm
    running statistics are left out on purpose: with broadcast_buffers=False they are per rank.
    """
    import hashlib

    from accelerate.utils import gather_object

    h = hashlib.sha256()
    for model in models:
        for name, p in sorted(acc.unwrap_model(model).named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()
    if acc.num_processes == 1:
        return [digest]
    return list(gather_object([digest]))
