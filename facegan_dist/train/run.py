"""A training run as one object: `build_run(cfg)` builds it, `restore(run, ckpt)` rewinds it.

`Run` holds everything the step loop and its periodic work read and change: the Accelerator,
G and D (prepared) and their optimizers, the EMA, the data source and the batches drawn from it,
the step counters, the fixed noise of the grids, the logger. `build_run` is the one place that
builds them, in the order that checkpoints and exact resume depend on (the Accelerator, the
data, the seeded models, `prepare`, the per-rank seeds), and `facegan bench train` times a Run
built by it. `restore` is the one way back to a checkpoint: resuming a run and rolling back after
a non-finite loss both call it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from facegan_dist import dist
from facegan_dist.artifacts import generator_meta
from facegan_dist.config import TrainConfig, dumps, to_jsonable
from facegan_dist.data.stream import DataSource
from facegan_dist.errors import CheckpointError, ConfigError, FaceganError
from facegan_dist.images import grid_uint8
from facegan_dist.latent import fixed_noise
from facegan_dist.models.bn import batchnorms, calibration_settings
from facegan_dist.paths import atomic_write_text
from facegan_dist.train import checkpoint
from facegan_dist.train.ema import EMA
from facegan_dist.train.preflight import (
    below_checkpoint,
    check_inception_weights,
    check_resolution,
    check_resume_matches,
    check_run_folder,
    read_data_manifest,
    resolve_condition,
    steps_for_epochs,
)
from facegan_dist.train.setup import (
    apply_backend_settings,
    build_gan,
    build_step,
    check_device_settings,
    memory_format_and_optimizers,
    model_input,
)
from facegan_dist.train.steps import GANStep


@dataclass(eq=False)
class Run:
    """One training run's live state (see the module docstring). Counters are per run, not per
    rank: every rank holds the same values."""

    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    fast: dict[str, bool]  # the resolved speed switches (TrainConfig.fast_settings)
    G: torch.nn.Module  # prepared (DDP under several processes)
    D: torch.nn.Module
    G_plain: torch.nn.Module  # G itself: the EMA, grids and exports read it
    opt_g: Any
    opt_d: Any
    ema: EMA | None
    gan_step: GANStep
    data: DataSource | None  # None: bench train's synthetic batches
    resolution: int
    attribute_names: list[str]
    condition: list[str]  # the attributes G is conditioned on
    cond_idx: torch.Tensor  # their columns in the shards' attributes, on the device
    gen_meta: dict[str, Any]  # enough to rebuild G from a checkpoint or export
    runtime: dict[str, Any]  # run.json: what this launch derived (world size, batches, ...)
    total_steps: int
    batch_per_device: int
    # ---- what a checkpoint stores and `restore` rewinds ----
    step: int = 0
    images_seen: int = 0
    batches_seen: int = 0  # rank-batches drawn from `data` (equal on every rank)
    noise: torch.Tensor | None = None  # z of the fixed grid
    fixed_c: torch.Tensor | None = None  # its conditions (a conditional G), from the first batch
    # ---- the run's history: kept across rollbacks, saved in every checkpoint ----
    run_id: str = ""  # the W&B run id
    rollbacks: int = 0
    lr_scale: float = 1.0  # < 1 after rollbacks
    # ---- bookkeeping of this process ----
    data_iter: Any = None  # data.batches(batches_seen), reopened by restore
    logger: Any = None  # tracking.RunLogger, from `start_logging`
    ckpt_path: Path | None = None  # the last good checkpoint (resumed or written)
    best: dict[str, Any] = field(default_factory=dict)  # RUN/best/best.json
    last_row: dict[str, Any] = field(default_factory=dict)
    last_grid: Path | None = None
    real_logged: bool = False
    last_log_t: float = 0.0
    last_log_images: int = 0
    flip_gen: torch.Generator | None = None

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def epoch(self) -> float:
        return self.batches_seen / self.data.batches_per_epoch


def build_run(
    cfg: TrainConfig,
    resume_from: Path | None = None,
    *,
    run_folder: bool = True,
    batch_per_process: bool = False,
    resolution: int | None = None,
) -> Run:
    """Check, then build the run `cfg` describes (nothing trains, no file is written).

    `facegan bench train` builds its Run with run_folder=False (no --out checks, no W&B),
    batch_per_process=True (`cfg.batch` is per process, as `accelerate launch` scales it) and,
    without --data, `resolution` for its synthetic batches (no data source)."""
    from accelerate.utils import set_seed

    from facegan_dist.models import count_params
    from facegan_dist.paths import out_dir
    from facegan_dist.tracking import new_run_id

    cfg = cfg.validate()
    if run_folder:
        check_run_folder(cfg, resume_from)  # read-only: nothing is written before the checks
    manifest = read_data_manifest(cfg) if resolution is None else None
    if manifest is not None:
        resolution = manifest.image_size
        check_resolution(cfg, resolution)
    attribute_names = manifest.attribute_names if manifest is not None else []
    state: dict[str, Any] = checkpoint.read_state(resume_from) if resume_from else {}
    if resume_from is not None:
        check_resume_matches(cfg, state, resume_from, resolution, attribute_names)
        if cfg.max_steps is not None and cfg.max_steps < int(state["step"]):
            raise ConfigError(below_checkpoint(f"--max-steps {cfg.max_steps}", state, resume_from))
    if cfg.eval_every and cfg.eval_features == "inception":
        check_inception_weights(cfg)  # a missing file fails before any work

    acc = dist.build_accelerator(
        cfg.precision,
        project_dir=cfg.run_dir if run_folder else None,
        autocast_cache=not cfg.cuda_graphs,
    )
    world = acc.num_processes
    bpd = cfg.batch if batch_per_process else dist.batch_per_device(cfg.batch, world)
    batch = bpd * world  # the global batch
    check_device_settings(cfg, acc)
    if run_folder:
        out_dir(cfg.run_dir, "--out")  # a file, under a file, /proc/...: one line, before work
    fast = cfg.fast_settings(acc.device.type)
    apply_backend_settings(fast, acc.device.type)

    # ---- data: each rank reads its own share; NOT passed through accelerator.prepare ----
    data = None if manifest is None else open_data(cfg, manifest, acc, bpd)
    if data is None:
        total_steps = cfg.max_steps or 0
    elif cfg.max_steps is not None:
        total_steps = cfg.max_steps
    else:
        bpe = data.batches_per_epoch
        total_steps = steps_for_epochs(cfg.epochs, bpe, cfg.d_every, cfg.d_steps)
        if resume_from is not None and total_steps < int(state["step"]):
            raise ConfigError(
                below_checkpoint(f"--epochs {cfg.epochs:g} ({total_steps} steps)", state,
                                 resume_from)
            )  # fmt: skip
    if data is not None and cfg.batch > data.num_samples:
        epoch_images = data.batches_per_epoch * cfg.batch
        dist.print0(
            acc,
            f"warning: --batch {cfg.batch} is larger than the {data.num_samples:,} images of "
            f"split '{cfg.split}' in {cfg.data}: every batch repeats images, and an epoch here "
            f"is {epoch_images:,} images ({epoch_images / data.num_samples:.1f} passes over "
            f"them); a --batch of at most {data.num_samples:,} avoids both",
        )

    # ---- models and optimizers: identical init on every rank, then per-rank noise seeds ----
    set_seed(cfg.seed)
    condition = resolve_condition(cfg.condition, attribute_names)
    cond_idx = torch.tensor([attribute_names.index(a) for a in condition], dtype=torch.long)
    G, D = build_gan(cfg, resolution, n_cond=len(condition))
    if cfg.sync_bn and world > 1:
        G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(G)
        D = torch.nn.SyncBatchNorm.convert_sync_batchnorm(D)
    G, D, opt_g, opt_d = memory_format_and_optimizers(G, D, cfg, fast)
    # This order is the checkpoint file order (model.safetensors = G, model_1 = D, ...).
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    dist.seed_rank(acc, cfg.seed)
    noise = fixed_noise(cfg.n_samples, cfg.z_dim, cfg.seed)
    # The EMA of G (every rank keeps the same copy; not prepared: it never trains).
    G_plain = acc.unwrap_model(G)  # the module itself (no DDP wrapper): EMA, grids, exports
    ema = EMA(G_plain, cfg.ema_kimg, cfg.ema_rampup) if cfg.ema_kimg > 0 else None

    gen_meta = generator_meta(
        to_jsonable(cfg), resolution, attribute_names, condition, cfg.resolved_d_norm
    )
    if ema is not None and batchnorms(G_plain):  # saved EMAs carry their own BN statistics
        gen_meta["ema_bn_calibration"] = calibration_settings()
    runtime: dict[str, Any] = {}
    if data is not None:
        runtime = {
            **dist.runtime_info(acc, cfg.batch),
            "dataset": {
                "path": str(cfg.data),
                "split": cfg.split,
                "num_samples": data.num_samples,
            },  # fmt: skip
            "resolution": resolution,
            "batches_per_epoch": data.batches_per_epoch,
            "total_steps": total_steps,
            "params_g": count_params(G_plain),
            "params_d": count_params(acc.unwrap_model(D)),
            "data_layout": data.layout(),
            "fast": fast,
        }
    gan_step = build_step(
        acc, G, D, opt_g, opt_d, cfg, fast, batch=batch, resolution=resolution
    )  # fmt: skip (draws nothing from the torch RNG)
    best_json = cfg.run_dir / "best" / "best.json"
    return Run(
        cfg=cfg, acc=acc, fast=fast, G=G, D=D, G_plain=G_plain, opt_g=opt_g, opt_d=opt_d,
        ema=ema, gan_step=gan_step, data=data, resolution=resolution,
        attribute_names=attribute_names, condition=condition, cond_idx=cond_idx.to(acc.device),
        gen_meta=gen_meta, runtime=runtime, total_steps=total_steps, batch_per_device=bpd,
        noise=noise, batches_seen=int(state.get("batches_seen", 0)),
        run_id=(state.get("wandb_run_id") or new_run_id()) if run_folder else "",
        rollbacks=int(state.get("rollbacks", 0)), lr_scale=float(state.get("lr_scale", 1.0)),
        ckpt_path=resume_from,
        best=json.loads(best_json.read_text()) if run_folder and best_json.is_file() else {},
        real_logged=run_folder and (cfg.run_dir / "samples" / "real.png").exists(),
        flip_gen=torch.Generator(device=acc.device),
    )  # fmt: skip


def open_data(cfg: TrainConfig, manifest, acc, batch_per_device: int) -> DataSource:
    """The data source `--data-cache` names, for this rank (the one place that chooses)."""
    if cfg.data_cache == "device":  # decoded once into device memory (each rank its share)
        from facegan_dist.data.cache import DeviceCache

        return DeviceCache(manifest, split=cfg.split, batch_per_device=batch_per_device,
                           rank=acc.process_index, world_size=acc.num_processes,
                           device=acc.device, seed=cfg.seed)  # fmt: skip
    from facegan_dist.data.stream import ShardStream

    return ShardStream(
        manifest,
        split=cfg.split,
        batch_per_device=batch_per_device,
        rank=acc.process_index,
        world_size=acc.num_processes,
        num_workers=cfg.loader_workers(acc.device.type, dist.cpus_per_process()),
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        skip_bad_samples=cfg.skip_bad_samples,
    )


def prepare_run_folder(run: Run, resume_from: Path | None) -> None:
    """Rank 0 moves or sets aside what a restart or resume replaces and writes config.json and
    run.json; every rank learns whether it could (a collective), so none waits for a failed one."""
    from facegan_dist.tracking import truncate_metrics

    acc, cfg, run_dir = run.acc, run.cfg, run.run_dir
    moved_to: Path | None = None
    set_aside: list[tuple[Path, Path]] = []
    err: Exception | None = None
    if acc.is_main_process:
        try:
            if cfg.restart:
                moved_to = checkpoint.move_run_aside(run_dir)
            elif resume_from is None:  # --resume auto found nothing: drop a dead attempt's rows
                truncate_metrics(run_dir / "metrics.jsonl", 0)
            else:  # later checkpoints than the resumed one: renamed, never reused or deleted
                set_aside = checkpoint.set_aside_newer(run_dir / "checkpoints", resume_from)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "samples").mkdir(exist_ok=True)
            atomic_write_text(run_dir / "config.json", dumps(cfg))
            atomic_write_text(run_dir / "run.json", json.dumps(run.runtime, indent=2))
        except (OSError, FaceganError) as exc:
            err = exc
    if dist.any_rank(acc, err is not None):
        if isinstance(err, FaceganError):
            raise err
        if err is not None:
            why = getattr(err, "strerror", None) or type(err).__name__
            raise CheckpointError(f"--out {run_dir}: cannot write the run files ({why})") from None
        raise ConfigError("rank 0 could not prepare the run folder")  # printed by rank 0 only
    if moved_to is not None:
        dist.print0(acc, f"--restart: moved the previous run in {run_dir} to {moved_to}")
    for old, new in set_aside:
        if ".superseded" in new.name:  # (a damaged one was announced by find_resume)
            dist.print0(acc, f"note: {old} is later than the resumed checkpoint: now {new.name}")
    acc.wait_for_everyone()


def restore(run: Run, ckpt: Path | None) -> None:
    """Reopen the data at the run's position and, with a checkpoint, rewind the run to it:
    G, D, both optimizers, the loss scaler and every RNG (Accelerate), the EMA, the fixed noise,
    the counters and the data position; the learning rates are the configured ones times
    `lr_scale`, and metrics rows after the checkpoint's step are dropped. Resume and rollback
    both call it; the run's history (rollbacks, lr_scale, W&B id) is not rewound.

    The data iterator is opened BEFORE the checkpoint restores the RNG: opening a loader draws
    its workers' base seed from the torch RNG, so the run continues with exactly the RNG state
    that the checkpoint saved, as the uninterrupted run did."""
    from facegan_dist.tracking import truncate_metrics

    acc = run.acc
    if ckpt is None:
        run.data_iter = run.data.batches(run.batches_seen, pin_memory=acc.device.type == "cuda")
        return
    saved = checkpoint.read_state(ckpt)
    layout = saved.get("data_layout")
    if layout and layout != run.data.layout():
        dist.print0(
            acc,
            "warning: the data layout changed since the checkpoint (world size, workers, "
            "batch or shards): training continues, but not on the exact same sample order",
        )
    run.data_iter = run.data.batches(int(saved["batches_seen"]),
                                     pin_memory=acc.device.type == "cuda")  # fmt: skip
    state, tensors = checkpoint.load(acc, ckpt)
    run.noise = tensors["fixed_noise"]["z"]
    run.fixed_c = tensors["fixed_noise"].get("c")
    if run.fixed_c is not None:
        run.fixed_c = run.fixed_c.to(acc.device)
    if run.ema is not None:
        if "ema" not in tensors:
            raise CheckpointError(f"{ckpt}: has no EMA of G; resume with --ema-kimg 0")
        run.ema.load_state_dict(tensors["ema"])
    run.step, run.images_seen = int(state["step"]), int(state["images_seen"])
    run.batches_seen = int(state["batches_seen"])
    run.last_log_images = run.images_seen
    set_learning_rates(run)
    run.gan_step.reset()
    run.ckpt_path = ckpt
    if acc.is_main_process:
        truncate_metrics(run.run_dir / "metrics.jsonl", run.step)


def lr_factor(lr_decay: float, step: int, total_steps: int) -> float:
    """--lr-decay: the factor on both rates for the update made at `step` (0-based): 1, then
    over the last `lr_decay * total_steps` steps a line down towards 0 (the last update still
    moves: 1 / span). A pure function of the step, so a resume needs no scheduler state."""
    span = lr_decay * total_steps
    return 1.0 if span <= 0 else min(1.0, (total_steps - step) / span)


def set_learning_rates(run: Run) -> None:
    """The configured rates times lr_scale and the decay factor of the next step: a resumed
    run's --lr-g/--lr-d win over the rates stored in the optimizer state."""
    scale = run.lr_scale * lr_factor(run.cfg.lr_decay, run.step, run.total_steps)
    for opt, lr in ((run.opt_g, run.cfg.lr_g), (run.opt_d, run.cfg.lr_d)):
        for group in opt.param_groups:
            group["lr"] = lr * scale


def start_logging(run: Run) -> None:
    """metrics.jsonl, samples/ and W&B (resumed under the run's id)."""
    from facegan_dist.tracking import RunLogger, resolve_wandb_mode

    cfg = run.cfg
    run.logger = RunLogger(
        run.acc,
        run.run_dir,
        mode=resolve_wandb_mode(cfg.wandb_mode),
        project=cfg.wandb_project,
        run_name=cfg.run_name or run.run_dir.name,
        run_id=run.run_id,
        config={**to_jsonable(cfg), "runtime": run.runtime},
    )
    run.last_log_t, run.last_log_images = time.perf_counter(), run.images_seen


def next_real(run: Run) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next real batch as the step takes it: on the device, in [-1, 1], flipped if asked,
    with its conditions. The first batch also fixes the grid's conditions and logs real.png."""
    cfg, device = run.cfg, run.device
    images_u8, attrs = next(run.data_iter)
    c = attrs.to(device, non_blocking=True)[:, run.cond_idx] if run.condition else None
    if run.condition and run.fixed_c is None:
        # the grid's conditions: real attribute combinations of the first batch (repeated)
        reps = -(-cfg.n_samples // len(c))
        run.fixed_c = c.repeat(reps, 1)[: cfg.n_samples].clone()
    if not run.real_logged:
        if run.acc.is_main_process:
            grid = grid_uint8(images_u8[: cfg.n_samples])
            run.logger.image("samples/real", grid, run.step, run.run_dir / "samples" / "real.png")
        run.real_logged = True
    x = model_input(images_u8, device, run.fast)
    if cfg.hflip:  # a flip per image, seeded by (seed, batch drawn, rank): replayable
        seed = (cfg.seed * 1_000_003 + run.batches_seen) * 4096 + run.acc.process_index
        run.flip_gen.manual_seed(seed)
        mask = torch.rand(len(x), 1, 1, 1, generator=run.flip_gen, device=device) < 0.5
        x = torch.where(mask, x.flip(3), x)
    return x, c


def G_for_use(run: Run) -> torch.nn.Module:
    """What grids, evaluation, checkpoints and the export draw with: the EMA with BatchNorm
    statistics of its own weights (`EMA.ready`), else the unwrapped G."""
    if run.ema is None:
        return run.G_plain
    return run.ema.ready(run.fixed_c if run.condition else None)


def trainer_state(run: Run) -> dict[str, Any]:
    """trainer_state.json of a checkpoint."""
    return {
        "format_version": 1,
        "step": run.step,
        "images_seen": run.images_seen,
        "batches_seen": run.batches_seen,
        "epoch": run.epoch,
        "wandb_run_id": run.run_id,
        "rollbacks": run.rollbacks,
        "lr_scale": run.lr_scale,
        "world_size": run.acc.num_processes,
        "data_layout": run.data.layout(),
        "rank_param_sha256": dist.param_digests(run.acc, run.G, run.D),  # equal on every rank
        # enough to rebuild G from this checkpoint alone (`facegan sample CKPT`)
        "generator": run.gen_meta,
        "config": to_jsonable(run.cfg),
    }


def checkpoint_tensors(run: Run) -> dict[str, dict[str, torch.Tensor]]:
    """The tensor files of a checkpoint: the fixed noise (and conditions), the EMA."""
    tensors = {"fixed_noise": {"z": run.noise}}
    if run.fixed_c is not None:
        tensors["fixed_noise"]["c"] = run.fixed_c
    if run.ema is not None:
        G_for_use(run)  # the saved EMA is usable as it is (`facegan sample CKPT`)
        tensors["ema"] = run.ema.state_dict()
    return tensors
