"""The training run: the only caller of Accelerate's prepare / backward / save_state.

`train(cfg)` reads like a script: resolve the run, build the Accelerator, data, models and
optimizers, restore a checkpoint, then loop over steps (a step = one G update, preceded by
`d_steps` D updates on one step in `d_every`). Statistics stay on the device and are reduced across
ranks only at the log interval; nothing in the step syncs with the host.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from facegan_dist import dist
from facegan_dist.artifacts import export_generator, generator_meta
from facegan_dist.config import (
    TrainConfig,
    dumps,
    merge_train_config,
    to_jsonable,
    train_config_from_json,
)
from facegan_dist.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FaceganError,
    TrainingError,
)
from facegan_dist.images import grid_uint8
from facegan_dist.latent import fixed_noise
from facegan_dist.models.bn import batchnorms, calibration_settings
from facegan_dist.paths import atomic_write_text
from facegan_dist.train import checkpoint
from facegan_dist.train.ema import EMA
from facegan_dist.train.setup import (
    apply_backend_settings,
    build_gan,
    build_step,
    check_device_settings,
    memory_format_and_optimizers,
    model_input,
)


def resolve_config(
    preset: str | None, config_file: Path | None, flags: dict[str, Any]
) -> tuple[TrainConfig, Path | None]:
    """The run's config and the checkpoint to resume from (None for a fresh run).

    When resuming, the config saved in the checkpoint is the base and only what this command line
    states explicitly (preset, --config file, flags) overrides it, e.g. a larger --max-steps.
    `--resume auto` skips a damaged newest checkpoint for an older intact one, with a warning.
    """
    cfg = merge_train_config(preset, config_file, flags)
    if cfg.restart and cfg.resume is not None:  # before looking for a checkpoint to resume
        raise ConfigError(f"--restart starts the run over: it cannot go with --resume {cfg.resume}")
    ckpt = checkpoint.find_resume(cfg.run_dir, cfg.resume, warn=_print_rank0)
    if ckpt is None:
        if cfg.resume not in (None, "auto"):
            raise CheckpointError(f"--resume {cfg.resume}: not found")
        return cfg.validate(), None
    saved = train_config_from_json(checkpoint.read_state(ckpt).get("config", {}))
    saved.pop("resume", None)
    saved.pop("restart", None)  # an action of the command that started the run, not a setting
    cfg = merge_train_config(preset, config_file, flags, base=saved)
    return cfg.validate(), ckpt


def _print_rank0(line: str) -> None:
    """A warning from before the Accelerator exists: printed by the launcher's rank 0 only (the
    RANK rule of `dist.error_line`), so N processes print it once."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(line, file=sys.stderr, flush=True)


def check_run_folder(cfg: TrainConfig, resume_from: Path | None) -> None:
    """A fresh run never writes into a folder holding another run: two runs' metrics, exports
    and checkpoints would mix (and --resume auto would later pick the old run's checkpoint).
    Read-only; `--restart` moves the old run aside later, on rank 0 (`move_run_aside`).

    `--resume auto` without any checkpoint starts fresh over the leftovers of a run that never
    checkpointed (its metrics rows are dropped), but not over a finished run's export."""
    run_dir = cfg.run_dir
    if resume_from is not None or cfg.restart:
        return
    entries = checkpoint.run_entries(run_dir)
    if cfg.resume == "auto":
        finished = [e for e in entries if e in ("export", "best")]
        if finished:
            raise ConfigError(
                f"--out {run_dir} holds a finished run ({', '.join(e + '/' for e in finished)}) "
                "but no checkpoint to resume: start over with --restart (moves it to "
                f"{checkpoint.aside_name(run_dir)}), or pick a new --out"
            )
        return
    if entries:
        listing = ", ".join(e + "/" if (run_dir / e).is_dir() else e for e in entries)
        raise ConfigError(
            f"--out {run_dir} already holds a run ({listing}): continue it with --resume auto, "
            f"start over with --restart (moves it to {checkpoint.aside_name(run_dir)}), or pick "
            "a new --out"
        )


def check_resolution(cfg: TrainConfig, resolution: int) -> None:
    """The shards' image size must be one the architecture builds (train has no size flag: the
    size comes from --data's manifest)."""
    from facegan_dist.models import RESOLUTIONS

    sizes = RESOLUTIONS[cfg.arch]
    if resolution not in sizes:
        fit = max((s for s in sizes if s <= resolution), default=sizes[0])
        raise ConfigError(
            f"--data {cfg.data}: holds {resolution} px images, but --arch {cfg.arch} trains on "
            f"{', '.join(map(str, sizes))} px; write shards of one of these sizes "
            f"(`facegan shard SRC --size {fit} --out NEW`)"
        )


def check_resume_matches(
    cfg: TrainConfig, state: dict[str, Any], ckpt: Path, resolution: int,
    attribute_names: list[str],
) -> None:  # fmt: skip
    """Before loading: the networks this command builds are the checkpoint's. A changed --arch,
    width, upsampling, norm, condition or image size would fail deep inside load_state_dict;
    here it is one line saying what differs."""
    import dataclasses

    saved = state.get("config", {})
    meta = state.get("generator", {})
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    diffs = []

    def differ(label: str, old: Any, new: Any) -> None:
        if old != new:
            diffs.append(f"{label}: checkpoint {old}, now {new}")

    old_arch = saved.get("arch", defaults["arch"])
    differ("--arch", old_arch, cfg.arch)
    if old_arch == cfg.arch:
        keys = ["z_dim", "spectral_norm"]
        if cfg.arch == "dcgan":
            keys += ["g_width", "d_width", "upsample", "mbstd"]
        for k in keys:
            differ("--" + k.replace("_", "-"), saved.get(k, defaults[k]), getattr(cfg, k))
        if cfg.arch == "dcgan":
            differ("--d-norm", meta.get("d_norm", cfg.resolved_d_norm), cfg.resolved_d_norm)
        old_cond = list(meta.get("condition") or [])
        new_cond = resolve_condition(cfg.condition, attribute_names)
        differ("--condition", ",".join(old_cond) or "none", ",".join(new_cond) or "none")
    old_res = meta.get("resolution")
    if old_res is not None and int(old_res) != resolution:
        diffs.append(
            f"image size: checkpoint {old_res} px, now {resolution} px (--data {cfg.data})"
        )
    if diffs:
        raise ConfigError(
            f"--resume {ckpt}: this run's networks differ from the checkpoint's ("
            + "; ".join(diffs)
            + "); drop the flags that change them (the checkpoint's settings are the defaults), "
            "or train into a new --out"
        )


def resolve_condition(spec: str | None, attribute_names: list[str]) -> list[str]:
    """--condition all | A,B,... -> the attribute names to condition on (checked)."""
    if spec is None:
        return []
    if not attribute_names:
        raise ConfigError(f"--condition {spec}: the shards have no attributes (a plain folder)")
    if spec.strip() == "all":
        return list(attribute_names)
    names = [x.strip() for x in spec.split(",") if x.strip()]
    for name in names:
        if name not in attribute_names:
            raise ConfigError(f"--condition: {name!r} is not an attribute of the shards")
    return names


def read_data_manifest(cfg: TrainConfig) -> dict[str, Any]:
    """The shard manifest of --data, with one-line errors for a missing or empty folder."""
    from facegan_dist.data.stream import read_manifest

    if not cfg.data.exists():
        raise DataError(f"--data {cfg.data}: no such folder (write shards with `facegan shard`)")
    if not cfg.data.is_dir():
        raise DataError(f"--data {cfg.data}: not a folder (give the shard folder)")
    return read_manifest(cfg.data)


def steps_for_epochs(epochs: float, batches_per_epoch: int, d_every: int, d_steps: int) -> int:
    """G steps needed to draw `epochs` passes of real batches (D draws d_steps per D step)."""
    batches = math.ceil(epochs * batches_per_epoch)
    d_updates = math.ceil(batches / d_steps)
    return max(1, (d_updates - 1) * d_every + 1)


def _below_checkpoint(what: str, state: dict[str, Any], ckpt: Path) -> str:
    step = int(state["step"])
    return (
        f"{what} is below step {step} of the checkpoint it resumes ({ckpt}): nothing would "
        f"train; give --max-steps above {step} to train on"
    )


def check_inception_weights(cfg: TrainConfig) -> None:
    """`--eval-features inception` needs its weights file: checked before any work, with the
    train flags in the message (metrics.py names evaluate's `--features`)."""
    from facegan_dist.metrics import inception_weights_path

    try:
        inception_weights_path(cfg.inception_weights)
    except CheckpointError as exc:
        msg = str(exc).replace("--features attributes", "--eval-features attributes")
        raise CheckpointError(msg) from None


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    images_seen: int
    preempted: bool
    checkpoint: Path | None
    export_dir: Path | None
    last_grid: Path | None
    wandb_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


class _StopFlag:
    """SIGTERM/SIGINT (preemption, Ctrl-C) set a flag; the loop checkpoints and exits 0.
    A second SIGINT restores the default handler's behaviour (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, resume_from: Path | None = None) -> TrainResult:
    """Run (or continue) a training run described by `cfg`; returns where everything went."""
    from accelerate.utils import set_seed

    from facegan_dist.data.stream import ShardStream, make_loader
    from facegan_dist.models import count_params
    from facegan_dist.paths import out_dir
    from facegan_dist.progress import make_progress
    from facegan_dist.tracking import RunLogger, new_run_id, resolve_wandb_mode, truncate_metrics

    cfg = cfg.validate()
    check_run_folder(cfg, resume_from)  # read-only: nothing is written before the checks pass
    manifest = read_data_manifest(cfg)
    resolution = int(manifest["settings"]["size"])
    check_resolution(cfg, resolution)
    attribute_names = list(manifest.get("attribute_names") or [])
    run_dir = cfg.run_dir
    state: dict[str, Any] = checkpoint.read_state(resume_from) if resume_from else {}
    if resume_from is not None:
        check_resume_matches(cfg, state, resume_from, resolution, attribute_names)
        if cfg.max_steps is not None and cfg.max_steps < int(state["step"]):
            raise ConfigError(_below_checkpoint(f"--max-steps {cfg.max_steps}", state, resume_from))
    if cfg.eval_every and cfg.eval_features == "inception":
        check_inception_weights(cfg)  # a missing file fails before any work

    wandb_mode = resolve_wandb_mode(cfg.wandb_mode)
    acc = dist.build_accelerator(
        cfg.precision,
        log_with="wandb" if wandb_mode != "disabled" else None,
        project_dir=run_dir,
        autocast_cache=not cfg.cuda_graphs,
    )
    world = acc.num_processes
    bpd = dist.batch_per_device(cfg.batch, world)
    check_device_settings(cfg, acc)
    out_dir(run_dir, "--out")  # a file, a path under a file, /proc/...: one line, before any work
    fast = cfg.fast_settings(acc.device.type)
    apply_backend_settings(fast, acc.device.type)

    # ---- data: each rank reads its own share; NOT passed through accelerator.prepare ----
    batches_seen = int(state.get("batches_seen", 0))  # per rank, identical on every rank
    if cfg.data_cache == "device":  # decoded once into device memory (each rank its share)
        from facegan_dist.data.cache import DeviceCache

        data = DeviceCache(cfg.data, split=cfg.split, batch_per_device=bpd,
                           rank=acc.process_index, world_size=world, device=acc.device,
                           seed=cfg.seed)  # fmt: skip
    else:
        data = ShardStream(
            cfg.data,
            split=cfg.split,
            batch_per_device=bpd,
            rank=acc.process_index,
            world_size=world,
            num_workers=cfg.loader_workers(acc.device.type, dist.cpus_per_process()),
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            start_batch=batches_seen,
            skip_bad_samples=cfg.skip_bad_samples,
        )
    bpe = data.batches_per_epoch
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    else:
        total_steps = steps_for_epochs(cfg.epochs, bpe, cfg.d_every, cfg.d_steps)
        if resume_from is not None and total_steps < int(state["step"]):
            raise ConfigError(
                _below_checkpoint(f"--epochs {cfg.epochs:g} ({total_steps} steps)", state,
                                  resume_from)
            )  # fmt: skip
    if cfg.batch > data.num_samples:
        epoch_images = bpe * cfg.batch
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
    fixed_c: torch.Tensor | None = None  # conditions of the fixed grid (conditional GAN)
    # The EMA of G (every rank keeps the same copy; not prepared: it never trains).
    G_plain = acc.unwrap_model(G)  # the module itself (no DDP wrapper): EMA, grids, exports
    ema = EMA(G_plain, cfg.ema_kimg, cfg.ema_rampup) if cfg.ema_kimg > 0 else None

    gen_meta = generator_meta(
        to_jsonable(cfg), resolution, attribute_names, condition, cfg.resolved_d_norm
    )
    if ema is not None and batchnorms(G_plain):  # saved EMAs carry their own BN statistics
        gen_meta["ema_bn_calibration"] = calibration_settings()
    runtime = {
        **dist.runtime_info(acc, cfg.batch),
        "dataset": {"path": str(cfg.data), "split": cfg.split, "num_samples": data.num_samples},
        "resolution": resolution,
        "batches_per_epoch": bpe,
        "total_steps": total_steps,
        "params_g": count_params(G_plain),
        "params_d": count_params(acc.unwrap_model(D)),
        "data_layout": data.layout(),
        "fast": fast,
    }
    # ---- the run folder: rank 0 writes; every rank learns whether it could ----
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
            atomic_write_text(run_dir / "run.json", json.dumps(runtime, indent=2))
        except (OSError, FaceganError) as exc:
            err = exc
    if dist.any_rank(acc, err is not None):  # a collective: no rank waits for a failed rank 0
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

    # The loader's iterator draws its worker base seed from the torch RNG: create it BEFORE the
    # checkpoint restores the RNG, so a resumed run draws the same noise as an uninterrupted one.
    def new_data_iter(start_batch: int):
        if cfg.data_cache == "device":
            return data.iterate(start_batch)
        data.start_epoch, data.start_batch = 0, start_batch
        return iter(make_loader(data, pin_memory=acc.device.type == "cuda"))

    data_iter = new_data_iter(batches_seen)

    step, images_seen = 0, 0
    run_id = state.get("wandb_run_id") or new_run_id()
    rollbacks = int(state.get("rollbacks", 0))
    lr_scale = float(state.get("lr_scale", 1.0))  # < 1 after rollbacks

    def set_learning_rates() -> None:
        """The configured rates times lr_scale: a resumed run's --lr-g/--lr-d win over the
        rates stored in the optimizer state."""
        for opt, lr in ((opt_g, cfg.lr_g), (opt_d, cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * lr_scale

    if resume_from is not None:
        saved_layout = state.get("data_layout")
        if saved_layout and saved_layout != data.layout():
            dist.print0(
                acc,
                "warning: the data layout changed since the checkpoint (world size, workers, "
                "batch or shards): training continues, but not on the exact same sample order",
            )
        state, tensors = checkpoint.load(acc, resume_from)
        noise = tensors["fixed_noise"]["z"]
        fixed_c = tensors["fixed_noise"].get("c")
        if fixed_c is not None:
            fixed_c = fixed_c.to(acc.device)
        if ema is not None:
            if "ema" not in tensors:
                raise CheckpointError(f"{resume_from}: has no EMA of G; resume with --ema-kimg 0")
            ema.load_state_dict(tensors["ema"])
        step, images_seen = int(state["step"]), int(state["images_seen"])
        set_learning_rates()
        if acc.is_main_process:
            truncate_metrics(run_dir / "metrics.jsonl", step)
    acc.wait_for_everyone()

    logger = RunLogger(
        acc,
        run_dir,
        mode=wandb_mode,
        project=cfg.wandb_project,
        run_name=cfg.run_name or run_dir.name,
        run_id=run_id,
        config={**to_jsonable(cfg), "runtime": runtime},
    )

    dist.print0(
        acc,
        f"facegan train: {cfg.arch} {resolution}px loss={cfg.loss} on {world} x "
        f"{runtime['device']} ({acc.distributed_type}), precision={acc.mixed_precision}, "
        f"batch {cfg.batch} = {world} x {bpd} per device; {data.num_samples:,} images, "
        f"{bpe} batches/epoch/rank; steps {step} -> {total_steps}"
        + (f" (resumed from {resume_from})" if resume_from else ""),
    )

    def state_dict_for_ckpt() -> dict[str, Any]:
        return {
            "format_version": 1,
            "step": step,
            "images_seen": images_seen,
            "batches_seen": batches_seen,
            "epoch": batches_seen / bpe,
            "wandb_run_id": run_id,
            "rollbacks": rollbacks,
            "lr_scale": lr_scale,
            "world_size": world,
            "data_layout": data.layout(),
            "rank_param_sha256": dist.param_digests(acc, G, D),  # equal on every rank
            # enough to rebuild G from this checkpoint alone (`facegan sample CKPT`)
            "generator": gen_meta,
            "config": to_jsonable(cfg),
        }

    device = acc.device
    flip_gen = torch.Generator(device=device)
    gan_step = build_step(acc, G, D, opt_g, opt_d, cfg, fast, batch=cfg.batch,
                          resolution=resolution)  # fmt: skip
    cond_idx = cond_idx.to(device)
    last_log_t, last_log_images = time.perf_counter(), images_seen
    last_row: dict[str, Any] = {}
    last_grid: Path | None = None
    ckpt_path: Path | None = resume_from
    real_logged = (run_dir / "samples" / "real.png").exists()
    signal_check_every = 1 if world == 1 else max(1, min(cfg.log_every, 10))

    def healthy() -> bool:
        """False after a rollback (the caller restarts the step loop); raises on --on-nonfinite
        stop, without a checkpoint to return to, or after --max-rollbacks rollbacks."""
        bad = dist.reduce_min(acc, gan_step.first_bad)  # the same value on every rank
        if not torch.isfinite(bad):
            return True
        bad_step = int(bad.item())
        lr_now = f"lr_g={opt_g.param_groups[0]['lr']:.3g}, lr_d={opt_d.param_groups[0]['lr']:.3g}"
        if cfg.on_nonfinite == "stop" or ckpt_path is None:
            raise TrainingError(
                f"a loss became non-finite at step {bad_step} ({lr_now}); last good checkpoint: "
                f"{ckpt_path or 'none'}"
            )
        if rollbacks >= cfg.max_rollbacks:
            raise TrainingError(
                f"a loss became non-finite at step {bad_step} again after {rollbacks} rollbacks "
                f"({lr_now}); giving up (--max-rollbacks {cfg.max_rollbacks})"
            )
        rollback(bad_step)
        return False

    def rollback(bad_step: int) -> None:
        """Back to the last good checkpoint with the learning rates lowered by a factor."""
        nonlocal step, images_seen, batches_seen, data_iter, noise, fixed_c, rollbacks, lr_scale
        nonlocal last_log_images
        saved, tensors = checkpoint.load(acc, ckpt_path)
        step, images_seen = int(saved["step"]), int(saved["images_seen"])
        batches_seen = int(saved["batches_seen"])
        noise = tensors["fixed_noise"]["z"]
        fixed_c = tensors["fixed_noise"].get("c")
        if fixed_c is not None:
            fixed_c = fixed_c.to(device)
        if ema is not None:
            ema.load_state_dict(tensors["ema"])
        rollbacks += 1
        lr_scale *= cfg.rollback_lr_factor
        set_learning_rates()
        gan_step.reset()
        data_iter = new_data_iter(batches_seen)
        last_log_images = images_seen
        if acc.is_main_process:
            truncate_metrics(run_dir / "metrics.jsonl", step)
        event = {"step": step, "event": "rollback", "nonfinite_step": bad_step,
                 "rollbacks": rollbacks, "lr_g": opt_g.param_groups[0]["lr"],
                 "lr_d": opt_d.param_groups[0]["lr"], "checkpoint": str(ckpt_path)}  # fmt: skip
        logger.log(event, step)
        dist.print0(
            acc,
            f"warning: non-finite loss at step {bad_step}: rolled back to {ckpt_path.name}, "
            f"lr x{cfg.rollback_lr_factor} (rollback {rollbacks}/{cfg.max_rollbacks})",
        )

    def log_row() -> dict[str, Any]:
        nonlocal last_log_t, last_log_images
        stats = gan_step.take_stats(lambda t: dist.reduce_sum(acc, t))
        now = time.perf_counter()
        row: dict[str, Any] = {
            "step": step,
            "images_seen": images_seen,
            "kimg": images_seen / 1000,
            "epoch": batches_seen / bpe,
            **stats,
            "lr_g": opt_g.param_groups[0]["lr"],
            "lr_d": opt_d.param_groups[0]["lr"],
            "images_per_s": (images_seen - last_log_images) / max(now - last_log_t, 1e-9),
        }
        if cfg.skip_bad_samples and cfg.data_cache != "device":
            bad = torch.tensor([float(data.bad_samples_total)], device=device)
            row["bad_samples"] = int(dist.reduce_sum(acc, bad).item())  # all ranks, cumulative
        last_log_t, last_log_images = now, images_seen
        return row

    def final_pictures(G_final: torch.nn.Module) -> None:
        """The end of a run: a grid of seeds 0-63 and a slerp strip seed 0 -> 1 (main process)."""
        from facegan_dist.images import generate, seed_images, strip_uint8
        from facegan_dist.latent import interpolate, seed_z

        grid = grid_uint8(seed_images(G_final, range(64)))
        logger.image("final/grid", grid, step, run_dir / "samples" / "final-grid.png")
        a, b = seed_z([0, 1], G_final.z_dim)
        strip = strip_uint8(generate(G_final, interpolate(a, b, 10, "slerp")))
        logger.image("final/interpolation", strip, step, run_dir / "samples" / "final-interp.png")

    def G_for_use() -> torch.nn.Module:
        """What grids, evaluation, checkpoints and the export draw with: the EMA with BatchNorm
        statistics of its own weights (`EMA.ready`), else the unwrapped G."""
        if ema is None:
            return G_plain
        return ema.ready(fixed_c if condition else None)

    def ckpt_tensors() -> dict[str, dict[str, torch.Tensor]]:
        tensors = {"fixed_noise": {"z": noise}}
        if fixed_c is not None:
            tensors["fixed_noise"]["c"] = fixed_c
        if ema is not None:
            G_for_use()  # the saved EMA is usable as it is (`facegan sample CKPT`)
            tensors["ema"] = ema.state_dict()
        return tensors

    def sample_grid() -> Path:
        G_eval = G_for_use()
        was_training = G_eval.training
        G_eval.eval()
        with torch.no_grad():
            c = fixed_c if condition else None
            images = G_eval(noise.to(device), c).float().cpu()
        G_eval.train(was_training)
        grid = grid_uint8(images)
        path = run_dir / "samples" / f"fixed-{step:09d}.png"
        logger.image("samples/fixed_noise", grid, step, path)
        return path

    def next_real() -> tuple[torch.Tensor, torch.Tensor | None]:
        nonlocal real_logged, fixed_c
        images_u8, attrs = next(data_iter)
        c = attrs.to(device, non_blocking=True)[:, cond_idx] if condition else None
        if condition and fixed_c is None:
            # the grid's conditions: real attribute combinations of the first batch (repeated)
            reps = -(-cfg.n_samples // len(c))
            fixed_c = c.repeat(reps, 1)[: cfg.n_samples].clone()
        if not real_logged:
            if acc.is_main_process:
                grid = grid_uint8(images_u8[: cfg.n_samples])
                logger.image("samples/real", grid, step, run_dir / "samples" / "real.png")
            real_logged = True
        x = model_input(images_u8, device, fast)
        if cfg.hflip:  # a flip per image, seeded by (seed, batch drawn, rank): replayable
            flip_gen.manual_seed((cfg.seed * 1_000_003 + batches_seen) * 4096 + acc.process_index)
            mask = torch.rand(len(x), 1, 1, 1, generator=flip_gen, device=device) < 0.5
            x = torch.where(mask, x.flip(3), x)
        return x, c

    best: dict[str, Any] = (
        json.loads((run_dir / "best" / "best.json").read_text())
        if (run_dir / "best" / "best.json").is_file()
        else {}
    )

    def evaluate_now() -> dict[str, Any]:
        """FID/KID of the EMA of G (every rank: the evaluation is split across ranks); exports
        G to RUN/best/ when the FID is the best so far."""
        from facegan_dist.metrics import evaluate_generator

        G_eval = G_for_use()
        res = evaluate_generator(
            G_eval, cfg.data, n=cfg.eval_n, features=cfg.eval_features,
            split="train" if cfg.split == "all" else cfg.split, batch=max(bpd, 50),
            device=device, acc=acc, seed=1_000_000, inception_weights=cfg.inception_weights,
            condition_idx=cond_idx.tolist() if condition else None,
        )  # fmt: skip
        row = {"step": step, "fid": res["fid"], "kid": res["kid"], "kid_std": res["kid_std"],
               "eval_features": cfg.eval_features, "eval_n": cfg.eval_n}  # fmt: skip
        if not best or res["fid"] < best["fid"]:
            best.clear()
            best.update(step=step, fid=res["fid"], kid=res["kid"], features=cfg.eval_features)
            if acc.is_main_process:
                export_generator(G_plain, gen_meta, run_dir / "best",
                                 ema=G_eval if ema is not None else None)  # fmt: skip
                atomic_write_text(run_dir / "best" / "best.json", json.dumps(best, indent=2))
            row["best"] = True
        logger.log(row, step)
        return row

    stop = _StopFlag()
    progress = make_progress(enabled=acc.is_main_process)
    # an error in the loop (divergence, bad data, a failed checkpoint) closes W&B as failed
    with logger.finish_on_error(), stop, progress:
        task = progress.add_task("train", total=total_steps, completed=step, rate="")
        while step < total_steps:
            # ---- one step: d_steps D updates (on one step in d_every), then one G update ----
            consumed = gan_step(step, next_real)
            if ema is not None:
                ema.update(G_plain, cfg.batch, (step + 1) * cfg.batch)
            batches_seen += consumed
            images_seen += consumed * cfg.batch
            step += 1
            progress.update(task, completed=step)

            last = step == total_steps
            if step % signal_check_every == 0 or last:
                preempt = dist.any_rank(acc, stop.signum is not None)
            else:
                preempt = False
            if step % cfg.log_every == 0 or last or preempt:
                if not healthy():
                    progress.update(task, completed=step)
                    continue
                last_row = log_row()
                logger.log(last_row, step)
                loss_d = last_row["loss_d"] if last_row["loss_d"] is not None else float("nan")
                progress.update(
                    task,
                    rate=f"{last_row['images_per_s']:,.0f} img/s  D {loss_d:.3f}  "
                    f"G {last_row['loss_g']:.3f}",
                )
            if step % cfg.sample_every == 0 or last or preempt:
                if acc.is_main_process:
                    last_grid = sample_grid()
            if cfg.eval_every and (step % cfg.eval_every == 0 or last) and not preempt:
                evaluate_now()
            if step % cfg.ckpt_every == 0 or last or preempt:
                if not healthy():
                    progress.update(task, completed=step)
                    continue
                ckpt_path = checkpoint.save(
                    acc,
                    run_dir / "checkpoints",
                    step,
                    state_dict_for_ckpt(),
                    ckpt_tensors(),
                    cfg.keep,
                )
            if preempt:
                break

    preempted = step < total_steps
    export_dir = None
    if not preempted:
        export_dir = run_dir / "export"
        if acc.is_main_process:
            meta = gen_meta
            G_raw = acc.unwrap_model(G, keep_fp32_wrapper=False)
            G_final = G_for_use() if ema is not None else G_raw
            export_generator(G_raw, meta, export_dir, ema=G_final if ema is not None else None)
            if not condition:
                final_pictures(G_final)
            info = {"step": step, "images_seen": images_seen, **best}
            logger.artifact(export_dir, name=f"generator-{run_id}", kind="model", metadata=info)
        acc.wait_for_everyone()
    if preempted:
        signame = signal.Signals(stop.signum).name if stop.signum else "a signal"
        dist.print0(acc, f"stopped by {signame} at step {step}: checkpoint {ckpt_path}")
    logger.summary({"final_step": step, "images_seen": images_seen})
    acc.wait_for_everyone()
    acc.end_training()  # finishes W&B on the main process, then destroys the process group
    metrics = {k: v for k, v in last_row.items() if isinstance(v, int | float)}
    result = TrainResult(
        run_dir=run_dir,
        step=step,
        images_seen=images_seen,
        preempted=preempted,
        checkpoint=ckpt_path,
        export_dir=export_dir,
        last_grid=last_grid,
        wandb_dir=logger.wandb_dir,
        metrics=metrics,
    )
    return result
