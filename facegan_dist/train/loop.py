"""The training run: the only caller of Accelerate's backward / save_state, through `Run`.

`train(cfg)` reads top to bottom: build the run (`run.build_run`: checks, Accelerator, data,
models, optimizers, EMA, step), prepare the run folder, restore a checkpoint (`run.restore`),
then loop over steps (a step = one G update, preceded by `d_steps` D updates on one step in
`d_every`) with the periodic work (log, grid, evaluation, checkpoint, stop signal) in the named
functions below, and finish (export, final pictures). Statistics stay on the device and are
reduced across ranks only at the log interval; nothing in the step syncs with the host.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from facegan_dist import dist
from facegan_dist.artifacts import export_generator
from facegan_dist.config import TrainConfig
from facegan_dist.errors import TrainingError
from facegan_dist.images import grid_uint8
from facegan_dist.paths import atomic_write_text
from facegan_dist.train import checkpoint
from facegan_dist.train.preflight import (  # noqa: F401  (the CLI and tests import them here)
    check_run_folder,
    data_location,
    read_data_manifest,
    resolve_condition,
    resolve_config,
    steps_for_epochs,
)
from facegan_dist.train.run import (
    G_for_use,
    Run,
    build_run,
    checkpoint_tensors,
    next_real,
    prepare_run_folder,
    restore,
    set_learning_rates,
    start_logging,
    trainer_state,
)


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
        # The first signal names the stop: after a Ctrl-C of a 1-process launch the launcher
        # also forwards SIGTERM, and the message should still say SIGINT.
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, resume_from: Path | None = None) -> TrainResult:
    """Run (or continue) a training run described by `cfg`; returns where everything went."""
    from facegan_dist.progress import make_progress

    run = build_run(cfg, resume_from)  # every check first: nothing is written before them
    prepare_run_folder(run, resume_from)
    restore(run, resume_from)  # opens the data at the run's position; loads the checkpoint
    run.acc.wait_for_everyone()
    start_logging(run)
    print_banner(run, resume_from)
    cfg, acc = run.cfg, run.acc
    signal_check_every = 1 if acc.num_processes == 1 else max(1, min(cfg.log_every, 10))

    stop = _StopFlag()
    progress = make_progress(enabled=acc.is_main_process)
    # an error in the loop (divergence, bad data, a failed checkpoint) closes W&B as failed
    with run.logger.finish_on_error(), stop, progress:
        task = progress.add_task("train", total=run.total_steps, completed=run.step, rate="")
        while run.step < run.total_steps:
            # ---- one step: d_steps D updates (on one step in d_every), then one G update ----
            if cfg.lr_decay:
                set_learning_rates(run)  # host floats: no sync
            consumed = run.gan_step(run.step, lambda: next_real(run))
            if run.ema is not None:
                run.ema.update(run.G_plain, cfg.batch, (run.step + 1) * cfg.batch)
            run.batches_seen += consumed
            run.images_seen += consumed * cfg.batch
            run.step += 1
            progress.update(task, completed=run.step)

            # ---- periodic work: every rank takes the same branches (collectives inside) ----
            step, last = run.step, run.step == run.total_steps
            preempt = (step % signal_check_every == 0 or last) and stop_requested(run, stop)
            if step % cfg.log_every == 0 or last or preempt:
                if rolled_back(run):
                    progress.update(task, completed=run.step)
                    continue
                row = log_metrics(run)
                loss_d = row["loss_d"] if row["loss_d"] is not None else float("nan")
                progress.update(task, rate=f"{row['images_per_s']:,.0f} img/s  D {loss_d:.3f}  "
                                           f"G {row['loss_g']:.3f}")  # fmt: skip
            if (step % cfg.sample_every == 0 or last or preempt) and acc.is_main_process:
                run.last_grid = save_grid(run)
            if cfg.eval_every and (step % cfg.eval_every == 0 or last) and not preempt:
                evaluate_now(run)
            if step % cfg.ckpt_every == 0 or last or preempt:
                if rolled_back(run):
                    progress.update(task, completed=run.step)
                    continue
                save_checkpoint(run)
            if preempt:
                break
    return finish(run, stop)


def print_banner(run: Run, resume_from: Path | None) -> None:
    acc, cfg, world = run.acc, run.cfg, run.acc.num_processes
    dist.print0(
        acc,
        f"facegan train: {cfg.arch} {run.resolution}px loss={cfg.loss} on {world} x "
        f"{run.runtime['device']} ({acc.distributed_type}), precision={acc.mixed_precision}, "
        f"batch {cfg.batch} = {world} x {run.batch_per_device} per device; "
        f"{run.data.num_samples:,} images, {run.data.batches_per_epoch} batches/epoch/rank; "
        f"steps {run.step} -> {run.total_steps}"
        + (f" (resumed from {resume_from})" if resume_from else ""),
    )


# ---- periodic work ----


def stop_requested(run: Run, stop: _StopFlag) -> bool:
    """Whether any rank got SIGTERM/SIGINT (a collective: the same answer on every rank)."""
    return dist.any_rank(run.acc, stop.signum is not None)


def rolled_back(run: Run) -> bool:
    """True after a rollback to the last good checkpoint (the caller restarts the step loop);
    raises on --on-nonfinite stop, without a checkpoint to return to, or after --max-rollbacks
    rollbacks. False while every loss is finite."""
    cfg, acc = run.cfg, run.acc
    bad = dist.reduce_min(acc, run.gan_step.first_bad)  # the same value on every rank
    if not torch.isfinite(bad):
        return False
    bad_step = int(bad.item())
    lr_now = (f"lr_g={run.opt_g.param_groups[0]['lr']:.3g}, "
              f"lr_d={run.opt_d.param_groups[0]['lr']:.3g}")  # fmt: skip
    if cfg.on_nonfinite == "stop" or run.ckpt_path is None:
        raise TrainingError(
            f"a loss became non-finite at step {bad_step} ({lr_now}); last good checkpoint: "
            f"{run.ckpt_path or 'none'}"
        )
    if run.rollbacks >= cfg.max_rollbacks:
        raise TrainingError(
            f"a loss became non-finite at step {bad_step} again after {run.rollbacks} rollbacks "
            f"({lr_now}); giving up (--max-rollbacks {cfg.max_rollbacks})"
        )
    # back to the last good checkpoint with the learning rates lowered by a factor
    run.rollbacks += 1
    run.lr_scale *= cfg.rollback_lr_factor
    restore(run, run.ckpt_path)  # the learning rates: configured x the new lr_scale
    event = {"step": run.step, "event": "rollback", "nonfinite_step": bad_step,
             "rollbacks": run.rollbacks, "lr_g": run.opt_g.param_groups[0]["lr"],
             "lr_d": run.opt_d.param_groups[0]["lr"], "checkpoint": str(run.ckpt_path)}  # fmt: skip
    run.logger.log(event, run.step)
    dist.print0(
        acc,
        f"warning: non-finite loss at step {bad_step}: rolled back to {run.ckpt_path.name}, "
        f"lr x{cfg.rollback_lr_factor} (rollback {run.rollbacks}/{cfg.max_rollbacks})",
    )
    return True


def log_metrics(run: Run) -> dict[str, Any]:
    """The interval's means over ranks (the one host sync per interval) -> metrics.jsonl/W&B."""
    acc = run.acc
    stats = run.gan_step.take_stats(lambda t: dist.reduce_sum(acc, t))
    now = time.perf_counter()
    row: dict[str, Any] = {
        "step": run.step,
        "images_seen": run.images_seen,
        "kimg": run.images_seen / 1000,
        "epoch": run.epoch,
        **stats,
        "lr_g": run.opt_g.param_groups[0]["lr"],
        "lr_d": run.opt_d.param_groups[0]["lr"],
        "images_per_s": (run.images_seen - run.last_log_images) / max(now - run.last_log_t, 1e-9),
    }
    if run.data.bad_samples_total is not None:  # --skip-bad-samples on a source that replaces
        bad = torch.tensor([float(run.data.bad_samples_total)], device=run.device)
        row["bad_samples"] = int(dist.reduce_sum(acc, bad).item())  # all ranks, cumulative
    run.last_log_t, run.last_log_images = now, run.images_seen
    run.last_row = row
    run.logger.log(row, run.step)
    return row


def save_grid(run: Run) -> Path:
    """The fixed-noise grid of this step (main process)."""
    G_eval = G_for_use(run)
    was_training = G_eval.training
    G_eval.eval()
    with torch.no_grad():
        c = run.fixed_c if run.condition else None
        images = G_eval(run.noise.to(run.device), c).float().cpu()
    G_eval.train(was_training)
    path = run.run_dir / "samples" / f"fixed-{run.step:09d}.png"
    run.logger.image("samples/fixed_noise", grid_uint8(images), run.step, path)
    return path


def evaluate_now(run: Run) -> dict[str, Any]:
    """FID/KID of the EMA of G (every rank: the evaluation is split across ranks); exports
    G to RUN/best/ when the FID is the best so far."""
    from facegan_dist.metrics import evaluate_generator

    cfg, acc, best = run.cfg, run.acc, run.best
    G_eval = G_for_use(run)
    res = evaluate_generator(
        G_eval, data_location(cfg), n=cfg.eval_n, features=cfg.eval_features,
        split="train" if cfg.split == "all" else cfg.split, batch=max(run.batch_per_device, 50),
        device=run.device, acc=acc, seed=1_000_000, inception_weights=cfg.inception_weights,
        condition_idx=run.cond_idx.tolist() if run.condition else None,
    )  # fmt: skip
    row = {"step": run.step, "fid": res["fid"], "kid": res["kid"], "kid_std": res["kid_std"],
           "eval_features": cfg.eval_features, "eval_n": cfg.eval_n}  # fmt: skip
    if not best or res["fid"] < best["fid"]:
        best.clear()
        best.update(step=run.step, fid=res["fid"], kid=res["kid"], features=cfg.eval_features)
        if acc.is_main_process:
            export_generator(run.G_plain, run.gen_meta, run.run_dir / "best",
                             ema=G_eval if run.ema is not None else None)  # fmt: skip
            atomic_write_text(run.run_dir / "best" / "best.json", json.dumps(best, indent=2))
        row["best"] = True
    run.logger.log(row, run.step)
    return row


def save_checkpoint(run: Run) -> None:
    """A complete, atomic checkpoint on every rank; it becomes the last good one."""
    run.ckpt_path = checkpoint.save(
        run.acc,
        run.run_dir / "checkpoints",
        run.step,
        trainer_state(run),
        checkpoint_tensors(run),
        run.cfg.keep,
    )


# ---- the end of a run ----


def final_pictures(run: Run, G_final: torch.nn.Module) -> None:
    """The end of a run: a grid of seeds 0-63 and a slerp strip seed 0 -> 1 (main process)."""
    from facegan_dist.images import generate, seed_images, strip_uint8
    from facegan_dist.latent import interpolate, seed_z

    samples = run.run_dir / "samples"
    grid = grid_uint8(seed_images(G_final, range(64)))
    run.logger.image("final/grid", grid, run.step, samples / "final-grid.png")
    a, b = seed_z([0, 1], G_final.z_dim)
    strip = strip_uint8(generate(G_final, interpolate(a, b, 10, "slerp")))
    run.logger.image("final/interpolation", strip, run.step, samples / "final-interp.png")


def finish(run: Run, stop: _StopFlag) -> TrainResult:
    """Export G (and its EMA) with the final pictures when the run is complete, or say where a
    stopped run's checkpoint is; close W&B and the process group."""
    acc, ema = run.acc, run.ema
    preempted = run.step < run.total_steps
    export_dir = None
    if not preempted:
        export_dir = run.run_dir / "export"
        if acc.is_main_process:
            G_raw = acc.unwrap_model(run.G, keep_fp32_wrapper=False)
            G_final = G_for_use(run) if ema is not None else G_raw
            export_generator(G_raw, run.gen_meta, export_dir,
                             ema=G_final if ema is not None else None)  # fmt: skip
            if not run.condition:
                final_pictures(run, G_final)
            info = {"step": run.step, "images_seen": run.images_seen, **run.best}
            run.logger.artifact(export_dir, name=f"generator-{run.run_id}", kind="model",
                                metadata=info)  # fmt: skip
        acc.wait_for_everyone()
    if preempted:
        signame = signal.Signals(stop.signum).name if stop.signum else "a signal"
        dist.print0(acc, f"stopped by {signame} at step {run.step}: checkpoint {run.ckpt_path}")
    run.logger.summary({"final_step": run.step, "images_seen": run.images_seen})
    run.logger.finish()  # closes W&B (main process)
    acc.wait_for_everyone()
    acc.end_training()  # destroys the process group
    return TrainResult(
        run_dir=run.run_dir,
        step=run.step,
        images_seen=run.images_seen,
        preempted=preempted,
        checkpoint=run.ckpt_path,
        export_dir=export_dir,
        last_grid=run.last_grid,
        wandb_dir=run.logger.wandb_dir,
        metrics={k: v for k, v in run.last_row.items() if isinstance(v, int | float)},
    )
