"""The only rank-aware module: build the Accelerator, print on rank 0, reduce stats, seed ranks.

Models, losses and data know nothing of ranks; the training loop asks this module. Rules kept here
(each checked against accelerate 1.15 / torch 2.14):
- DDP without buffer broadcast: D is called twice per step (real, then fake) and DDP's in-place
  copy of BatchNorm buffers before each forward breaks autograd (pytorch#22095).
- On a CPU box torchrun children need `cpu=True`, otherwise each is a lone rank 0.
- fp16 on CPU is silently ignored by torch autocast, so it is refused here instead.
- Every rank calls every collective; only the main process writes files and logs.
- A process that started a process group destroys it before the interpreter exits (an exit
  hook), whatever the exit: with gloo's threads still alive, exit can abort with
  "terminate called without an active exception" (SIGABRT, pytorch#190489), turning a clean
  exit 0 or our exit 1 into -6.
"""

from __future__ import annotations

import atexit
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


def build_accelerator(
    precision: str,
    project_dir: str | None = None,
    autocast_cache: bool = True,
):
    """One Accelerator for the whole process, with our DDP and process-group settings.
    autocast_cache=False: no autocast weight-cast cache (what CUDA-graph capture asks for)."""
    from accelerate import Accelerator
    from accelerate.utils import (
        AutocastKwargs,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
    )

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
        project_dir=project_dir,
        kwargs_handlers=[
            # gradient_as_bucket_view: grads live in the all-reduce buckets (one copy fewer).
            DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True),
            InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT),
            *([] if autocast_cache else [AutocastKwargs(cache_enabled=False)]),
        ],
    )
    _destroy_group_at_exit()
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


def _destroy_group_at_exit() -> None:
    """Register (once) the exit hook of the module docstring. A no-op after
    `accelerator.end_training()`, which destroys the group itself."""
    atexit.unregister(_destroy_group)
    atexit.register(_destroy_group)


def _destroy_group() -> None:
    """Not accelerate's `state.destroy_process_group`: it raises at exit once the shared state
    was reset (`PartialState._reset_state`, as the tests and notebook relaunches do)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def error_line(exc: Exception) -> str | None:
    """The `error: ...` line this process prints for a FaceganError, or None to stay silent.

    A ConfigError comes from validating the same config and world on every rank, so only rank 0
    prints it (one line, not one per process). Any other error may be this rank's alone (a bad
    shard in its share, its disk), so every rank prints it, ranks > 0 with their rank."""
    rank = int(os.environ.get("RANK", "0") or 0)
    msg = " ".join(str(exc).split()) or exc.__class__.__name__
    if rank == 0:
        return f"error: {msg}"
    return None if isinstance(exc, ConfigError) else f"error: [rank {rank}] {msg}"


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


def cpus_per_process() -> int:
    """This process's share of the CPUs it may run on: the machine's processes of this job
    (LOCAL_WORLD_SIZE, set by torchrun / accelerate launch) split them."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


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


# ---- work splitting for sampling and evaluation (no DDP: G only runs forward, locally) ----
# `state` below is an Accelerator, a PartialState, or None (one process, no collectives). The
# split is accelerate's `split_between_processes` (contiguous chunks, the first `n % world` ranks
# get one more); `chunk_sizes` reproduces it so gathered rows come back in the original order.


def process_state():
    """The PartialState for commands that only split work (`sample`, `directions`,
    `evaluate`): the same CPU/torchrun rules as `build_accelerator`, without DDP or trackers."""
    from accelerate import PartialState

    cpu = (not torch.cuda.is_available() and _torchrun_world_size() > 1) or os.environ.get(
        "ACCELERATE_USE_CPU"
    ) in ("1", "true", "True")
    state = PartialState(cpu=cpu)
    _destroy_group_at_exit()
    if _torchrun_world_size() != state.num_processes:
        raise ConfigError(
            f"launched {_torchrun_world_size()} processes but Accelerate sees "
            f"{state.num_processes}; on CPU use launch/cpu-2proc.yaml, "
            "not `accelerate launch --cpu`"
        )
    return state


def world(state) -> tuple[int, int]:
    """(rank, world_size) of `state` (None = one process)."""
    if state is None:
        return 0, 1
    return state.process_index, state.num_processes


def is_main(state) -> bool:
    return state is None or state.is_main_process


def barrier(state) -> None:
    if state is not None and state.num_processes > 1:
        state.wait_for_everyone()


def chunk_sizes(n: int, world_size: int) -> list[int]:
    """How many of n items each rank gets from `split_between_processes`."""
    per, extra = divmod(n, world_size)
    return [per + (1 if r < extra else 0) for r in range(world_size)]


def split_items(state, items: list) -> list:
    """This rank's contiguous share of `items` (all of them on one process)."""
    items = list(items)
    if state is None or state.num_processes == 1:
        return items
    with state.split_between_processes(items) as mine:
        mine = list(mine)
    assert len(mine) == chunk_sizes(len(items), state.num_processes)[state.process_index]
    return mine


def gather_rows(state, rows: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate every rank's `rows` ([n_rank, ...], the rows of `split_items` of n_total
    items) in rank order -> [n_total, ...] on the CPU, on every rank (a collective).

    The one padded gather: accelerate's `pad_across_processes` + `gather` (ranks' shares differ
    by one row). Not `gather_for_metrics`: it trims only the padding of a prepared dataloader,
    and these shares come from `split_items`, so each rank's padding is cut here."""
    if state is None or state.num_processes == 1:
        return rows.cpu()
    from accelerate.utils import gather, pad_across_processes

    sizes = chunk_sizes(n_total, state.num_processes)
    if rows.shape[0] != sizes[state.process_index]:
        raise ValueError(f"rank {state.process_index}: {rows.shape[0]} rows, expected its share")
    padded = pad_across_processes(rows.to(state.device).contiguous(), dim=0)
    parts = gather(padded).split(max(sizes))  # [world * max(sizes), ...], rank by rank
    return torch.cat([p[:k].cpu() for p, k in zip(parts, sizes, strict=True)])


def broadcast_object(state, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a collective)."""
    if state is None or state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]
