"""`facegan train`: build the TrainConfig from preset -> --config file -> flags, run the loop.

The same command runs under `accelerate launch facegan_dist train ...` (one process per device)
and as plain `facegan train ...` (one process: CPU, MPS or one GPU).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from facegan_dist.cli.app import app, errors_to_exit
from facegan_dist.config import (
    ACT_CHOICES,
    ARCH_CHOICES,
    AUGMENT_CHOICES,
    D_NORM_CHOICES,
    DATA_CACHES,
    DEFAULT_PRESET,
    EVAL_FEATURES,
    LOSS_CHOICES,
    ON_NONFINITE,
    PRECISIONS,
    PRESETS,
    SPECTRAL_NORM_CHOICES,
    SPLITS,
    UPSAMPLE_CHOICES,
    WANDB_MODES,
    TrainConfig,
)

# Help texts take choices and defaults from the code (config.py) rather than retyping them, so
# they cannot drift; tests/cli/test_train_help.py reads the rendered help back.
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple | list):
        return ",".join(_show(x) for x in v)
    return str(v) or "none"


def _choices(values: Iterable[str]) -> str:
    return " | ".join(values)


def _presets(names: list[str]) -> str:
    paper = [p for p in PRESETS if p.startswith("paper-")]
    if paper and all(p in names for p in paper):  # all four paper presets: paper-*
        names = [n for n in names if n not in paper[1:]]
        names = ["paper-*" if n == paper[0] else n for n in names]
    return ", ".join(names)


def _default(name: str, none: str = "none") -> str:
    """`[default: ...]` for TrainConfig field `name`: the default preset's value and, where other
    presets set another one, theirs (`none` names a None value). Escaped for rich markup."""

    def text(p: str) -> str:
        v = PRESETS[p].get(name, _FIELD_DEFAULTS[name])
        return none if v is None else _show(v)

    base = text(DEFAULT_PRESET)
    others: dict[str, list[str]] = {}
    for p in PRESETS:
        if text(p) != base:
            others.setdefault(text(p), []).append(p)
    if not others:
        return f"\\[default: {base}]"
    rest = [p for p in PRESETS if p != DEFAULT_PRESET]
    if len(others) == 1 and list(others.values())[0] == rest:
        return f"\\[default: {base} ({DEFAULT_PRESET}); {list(others)[0]} (other presets)]"
    parts = [base] + [f"{v} with --preset {_presets(ps)}" for v, ps in others.items()]
    return "\\[default: " + "; ".join(parts) + "]"


DATA = "Data and output"
MODEL = "Model"
OBJ = "Objective and schedule"
RUN = "Length, batch and numerics"
LOG = "Logging, samples and checkpoints"


def _betas(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        parts = tuple(float(x) for x in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not two comma-separated numbers") from None
    if len(parts) != 2:
        raise typer.BadParameter(f"{value!r} must be two comma-separated numbers, e.g. 0.5,0.999")
    return parts  # type: ignore[return-value]


@app.command("train")
def train_cmd(
    data: Annotated[
        Path | None,
        typer.Option(
            help="Shard folder from `facegan shard` (size/attributes from its manifest). "
            "Required (or taken from the checkpoint with --resume).",
            rich_help_panel=DATA,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder. A fresh run refuses one that holds a run: continue it with "
            "--resume auto, or see --restart. \\[default: runs/<preset>]",
            rich_help_panel=DATA,
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help=f"Shard split: {_choices(SPLITS)}. {_default('split')}", rich_help_panel=DATA
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help=f"{_choices(PRESETS)}. quality: the measured best (resize-conv G, Adam betas "
            "0,0.99, 2 kimg EMA; docs/QUALITY.md). Options marked 'with --preset' take their "
            f"default from it. \\[default: {DEFAULT_PRESET}]",
            rich_help_panel=DATA,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML/YAML/JSON file of options; flags override it. \\[default: none]",
            rich_help_panel=DATA,
        ),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(help=f"{_choices(ARCH_CHOICES)}. {_default('arch')}", rich_help_panel=MODEL),
    ] = None,
    act: Annotated[
        str | None,
        typer.Option(
            help=f"MLP activation: {_choices(ACT_CHOICES)} (paper T1 | T2). {_default('act')}",
            rich_help_panel=MODEL,
        ),
    ] = None,
    dropout: Annotated[
        float | None,
        typer.Option(help=f"MLP dropout. {_default('dropout')}", rich_help_panel=MODEL),
    ] = None,
    z_dim: Annotated[
        int | None, typer.Option(help=f"Latent size. {_default('z_dim')}", rich_help_panel=MODEL)
    ] = None,
    g_width: Annotated[
        int | None,
        typer.Option(help=f"DCGAN G width. {_default('g_width')}", rich_help_panel=MODEL),
    ] = None,
    d_width: Annotated[
        int | None,
        typer.Option(help=f"DCGAN D width. {_default('d_width')}", rich_help_panel=MODEL),
    ] = None,
    upsample: Annotated[
        str | None,
        typer.Option(
            help=f"DCGAN G upsampling: {_choices(UPSAMPLE_CHOICES)} (nearest, bilinear: resize "
            "+ 3x3 conv, no checkerboard; nearest-last: resize-conv for the RGB layer only). "
            f"{_default('upsample')}",
            rich_help_panel=MODEL,
        ),
    ] = None,
    d_norm: Annotated[
        str | None,
        typer.Option(
            help=f"DCGAN D norm: {_choices(D_NORM_CHOICES)} (auto: none for wgan-gp or a "
            f"spectral-norm D, else batch). {_default('d_norm')}",
            rich_help_panel=MODEL,
        ),
    ] = None,
    mbstd: Annotated[
        bool | None,
        typer.Option(
            "--mbstd/--no-mbstd",
            help="DCGAN D: minibatch standard deviation channel before its last layer "
            f"(ProGAN); shows D a batch's variety. {_default('mbstd')}",
            rich_help_panel=MODEL,
        ),
    ] = None,
    spectral_norm: Annotated[
        str | None,
        typer.Option(
            help=f"Spectral normalisation of: {_choices(SPECTRAL_NORM_CHOICES)}. "
            f"{_default('spectral_norm')}",
            rich_help_panel=MODEL,
        ),
    ] = None,
    condition: Annotated[
        str | None,
        typer.Option(
            help="Conditional GAN on shard attributes: all, or names like Smiling,Male. "
            f"{_default('condition', none='off')}",
            rich_help_panel=MODEL,
        ),
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            help=f"{_choices(LOSS_CHOICES)}: ns = non-saturating, minimax = the paper's "
            "log(1 - D(G(z))), wgan = weight clipping (--clip), wgan-gp = gradient penalty "
            f"(--gp-lambda), hinge = SNGAN's. {_default('loss')}",
            rich_help_panel=OBJ,
        ),
    ] = None,
    gp_lambda: Annotated[
        float | None,
        typer.Option(help=f"wgan-gp penalty weight. {_default('gp_lambda')}", rich_help_panel=OBJ),
    ] = None,
    clip: Annotated[
        float | None,
        typer.Option(help=f"wgan weight clipping. {_default('clip')}", rich_help_panel=OBJ),
    ] = None,
    r1: Annotated[
        float | None,
        typer.Option(
            help=f"R1 gamma on real data, lazy every 16 D steps (0 = off). {_default('r1')}",
            rich_help_panel=OBJ,
        ),
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help=f"DiffAugment policy: a comma-separated subset of {_choices(AUGMENT_CHOICES)}, "
            f"or none. {_default('augment')}",
            rich_help_panel=OBJ,
        ),
    ] = None,
    d_every: Annotated[
        int | None,
        typer.Option(
            help="Update D on one step in K (the paper's 'D critiques every 5'). "
            f"{_default('d_every')}",
            rich_help_panel=OBJ,
        ),
    ] = None,
    d_steps: Annotated[
        int | None,
        typer.Option(
            help="D updates per G update. \\[default: 1; 5 with --loss wgan or wgan-gp]",
            rich_help_panel=OBJ,
        ),
    ] = None,
    lr_g: Annotated[
        float | None, typer.Option(help=f"Adam lr of G. {_default('lr_g')}", rich_help_panel=OBJ)
    ] = None,
    lr_d: Annotated[
        float | None, typer.Option(help=f"Adam lr of D. {_default('lr_d')}", rich_help_panel=OBJ)
    ] = None,
    betas_g: Annotated[
        str | None,
        typer.Option(
            help=f"Adam betas of G, e.g. 0.5,0.999. {_default('betas_g')}", rich_help_panel=OBJ
        ),
    ] = None,
    betas_d: Annotated[
        str | None,
        typer.Option(
            help=f"Adam betas of D, e.g. 0.5,0.999. {_default('betas_d')}", rich_help_panel=OBJ
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            help=f"GLOBAL batch; each process gets batch / processes. {_default('batch')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    epochs: Annotated[
        float | None,
        typer.Option(
            help=f"Passes over the split. {_default('epochs', none='off (--max-steps)')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            help="G updates; overrides --epochs. "
            f"{_default('max_steps', none='none (from --epochs)')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    ema_kimg: Annotated[
        float | None,
        typer.Option(
            help=f"EMA of G: half-life in kimg (0 = off). {_default('ema_kimg')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    ema_rampup: Annotated[
        float | None,
        typer.Option(
            help="EMA ramp-up: half-life <= this x images seen. "
            f"{_default('ema_rampup', none='off')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help=f"{_choices(PRECISIONS)} (fp16: GPU only). {_default('precision')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Seed. {_default('seed')}", rich_help_panel=RUN)
    ] = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            help=f"SyncBatchNorm under DDP (CUDA). {_default('sync_bn')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic",
            help=f"Deterministic torch kernels. {_default('deterministic')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    data_cache: Annotated[
        str | None,
        typer.Option(
            help=f"{_choices(DATA_CACHES)}: none streams the shards; device decodes the split "
            f"once into GPU memory. {_default('data_cache')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    hflip: Annotated[
        bool | None,
        typer.Option(
            "--hflip/--no-hflip",
            help=f"Random horizontal flips of real images. {_default('hflip')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help=f"torch.compile G and D. {_default('compile')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="Replay the whole step as one CUDA graph (one CUDA device; one D step per G "
            "step, no penalty/augmentation; not with --compile or fp16). Experimental. "
            f"{_default('cuda_graphs')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last",
            help="NHWC. \\[default: on for CUDA and CPU]",
            rich_help_panel=RUN,
        ),
    ] = None,
    tf32: Annotated[
        bool | None,
        typer.Option(
            "--tf32/--no-tf32", help="TF32 math. \\[default: on for CUDA]", rich_help_panel=RUN
        ),
    ] = None,
    fused_adam: Annotated[
        bool | None,
        typer.Option(
            "--fused-adam/--no-fused-adam",
            help="Fused Adam. \\[default: on for CUDA]",
            rich_help_panel=RUN,
        ),
    ] = None,
    exact: Annotated[
        bool | None,
        typer.Option(
            "--exact/--no-exact",
            help=f"Bit-reproducible: deterministic, no fast paths. {_default('exact')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    num_workers: Annotated[
        int | None,
        typer.Option(
            help="Loader workers per process. "
            + _default("num_workers", none="2, on CUDA min(8, CPUs per process - 1)"),
            rich_help_panel=RUN,
        ),
    ] = None,
    shuffle_buffer: Annotated[
        int | None,
        typer.Option(
            help=f"Shuffle buffer per loader worker. {_default('shuffle_buffer')}",
            rich_help_panel=RUN,
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            help="Steps between FID/KID evaluations (0 = off); the best G goes to RUN/best/. "
            f"{_default('eval_every')}",
            rich_help_panel=LOG,
        ),
    ] = None,
    eval_n: Annotated[
        int | None,
        typer.Option(help=f"Images per evaluation. {_default('eval_n')}", rich_help_panel=LOG),
    ] = None,
    eval_features: Annotated[
        str | None,
        typer.Option(
            help=f"{_choices(EVAL_FEATURES)}: attributes = the shards' label classifier "
            "(offline); inception = the standard TF-FID network (needs its weights file, see "
            f"--inception-weights). {_default('eval_features')}",
            rich_help_panel=LOG,
        ),
    ] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            help="--eval-features inception: the torch-fidelity weights file "
            "(weights-inception-2015-12-05-6726825d.pth) \\[default: torch hub's cache]",
            rich_help_panel=LOG,
        ),
    ] = None,
    on_nonfinite: Annotated[
        str | None,
        typer.Option(
            help=f"On a NaN/inf loss: {_choices(ON_NONFINITE)} (rollback: to the last "
            f"checkpoint, lrs lowered). {_default('on_nonfinite')}",
            rich_help_panel=LOG,
        ),
    ] = None,
    max_rollbacks: Annotated[
        int | None,
        typer.Option(
            help=f"Rollbacks before giving up. {_default('max_rollbacks')}", rich_help_panel=LOG
        ),
    ] = None,
    rollback_lr_factor: Annotated[
        float | None,
        typer.Option(
            help=f"lr multiplier per rollback. {_default('rollback_lr_factor')}",
            rich_help_panel=LOG,
        ),
    ] = None,
    skip_bad_samples: Annotated[
        bool | None,
        typer.Option(
            "--skip-bad-samples/--no-skip-bad-samples",
            help="Replace undecodable images (counted, logged) instead of stopping. "
            f"{_default('skip_bad_samples')}",
            rich_help_panel=LOG,
        ),
    ] = None,
    log_every: Annotated[
        int | None,
        typer.Option(
            help=f"Steps between metric rows. {_default('log_every')}", rich_help_panel=LOG
        ),
    ] = None,
    sample_every: Annotated[
        int | None,
        typer.Option(
            help=f"Steps between fixed-noise grids. {_default('sample_every')}", rich_help_panel=LOG
        ),
    ] = None,
    n_samples: Annotated[
        int | None,
        typer.Option(
            help=f"Images in the fixed-noise grid. {_default('n_samples')}", rich_help_panel=LOG
        ),
    ] = None,
    ckpt_every: Annotated[
        int | None,
        typer.Option(
            help=f"Steps between checkpoints. {_default('ckpt_every')}", rich_help_panel=LOG
        ),
    ] = None,
    keep: Annotated[
        int | None,
        typer.Option(help=f"Checkpoints to keep. {_default('keep')}", rich_help_panel=LOG),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="auto (the newest intact checkpoint in --out; a damaged newer one is skipped "
            "with a warning and kept) or a checkpoint folder. \\[default: none: a fresh run]",
            rich_help_panel=LOG,
        ),
    ] = None,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            help="Start over in an --out that holds a run: its files are first MOVED to "
            "OUT.old-<date>-<time> beside it (nothing is deleted). Not with --resume. "
            "\\[default: off]",
            rich_help_panel=LOG,
        ),
    ] = False,
    wandb_mode: Annotated[
        str | None,
        typer.Option(
            help=f"{_choices(WANDB_MODES)}. \\[default: offline without an API key]",
            rich_help_panel=LOG,
        ),
    ] = None,
    wandb_project: Annotated[
        str | None,
        typer.Option(help=f"W&B project. {_default('wandb_project')}", rich_help_panel=LOG),
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(help="W&B run name. \\[default: run folder name]", rich_help_panel=LOG),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the resolved config and exit. \\[default: off]"),
    ] = False,
) -> None:
    """Train a GAN on a shard folder. Steps are G updates; progress is counted in images.

    Examples:

      facegan train --data shards/demo32 --preset demo --out runs/demo

      accelerate launch --config_file launch/cpu-2proc.yaml facegan_dist train
      --data shards/demo32 --preset demo

      facegan train --out runs/demo --resume auto --max-steps 2000
    """
    from facegan_dist.config import dumps
    from facegan_dist.train.loop import (
        check_run_folder,
        read_data_manifest,
        resolve_config,
        train,
    )

    flags = dict(
        data=data, out=out, split=split, arch=arch, act=act, dropout=dropout, z_dim=z_dim,
        g_width=g_width, d_width=d_width, upsample=upsample, d_norm=d_norm, mbstd=mbstd,
        spectral_norm=spectral_norm, condition=condition, gp_lambda=gp_lambda, clip=clip, r1=r1,
        augment=augment, loss=loss, d_every=d_every, d_steps=d_steps,
        lr_g=lr_g, lr_d=lr_d, betas_g=_betas(betas_g), betas_d=_betas(betas_d), batch=batch,
        epochs=epochs, max_steps=max_steps, ema_kimg=ema_kimg, ema_rampup=ema_rampup,
        precision=precision, seed=seed, sync_bn=sync_bn,
        deterministic=deterministic, data_cache=data_cache, hflip=hflip, compile=compile,
        cuda_graphs=cuda_graphs,
        channels_last=channels_last, tf32=tf32, fused_adam=fused_adam, exact=exact,
        num_workers=num_workers, shuffle_buffer=shuffle_buffer,
        eval_every=eval_every, eval_n=eval_n, eval_features=eval_features,
        inception_weights=inception_weights,
        on_nonfinite=on_nonfinite, max_rollbacks=max_rollbacks,
        rollback_lr_factor=rollback_lr_factor, skip_bad_samples=skip_bad_samples,
        log_every=log_every, sample_every=sample_every, n_samples=n_samples,
        ckpt_every=ckpt_every, keep=keep, resume=resume, wandb_mode=wandb_mode,
        wandb_project=wandb_project, run_name=run_name, restart=restart or None,
    )  # fmt: skip
    if preset is not None:
        flags["preset"] = preset
    with errors_to_exit():
        cfg, ckpt = resolve_config(preset, config, flags)
        if dry_run:
            read_data_manifest(cfg)  # a dry run still checks that the data is there
            check_run_folder(cfg, ckpt)  # and whether --out would be refused
            print(dumps(cfg))
            if ckpt is not None:
                print(f"# would resume from {ckpt}", file=sys.stderr)
            from facegan_dist.train.checkpoint import aside_name, run_entries

            if cfg.restart and run_entries(cfg.run_dir):
                print(f"# would move the run in {cfg.run_dir} to {aside_name(cfg.run_dir)}",
                      file=sys.stderr)  # fmt: skip
            return
        result = train(cfg, resume_from=ckpt)
    if result.checkpoint is None:
        return
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        state = "preempted" if result.preempted else "done"
        typer.echo(f"{state}: step {result.step}, {result.images_seen:,} images seen")
        if m:
            typer.echo(
                f"  last log: loss_d {m.get('loss_d', float('nan')):.4f}  "
                f"loss_g {m.get('loss_g', float('nan')):.4f}  "
                f"{m.get('images_per_s', 0):,.0f} images/s"
            )
        typer.echo(f"  run folder: {result.run_dir}")
        typer.echo(f"  checkpoint: {result.checkpoint}")
        if result.last_grid:
            typer.echo(f"  last grid:  {result.last_grid}")
        if result.export_dir:
            typer.echo(f"  generator:  {result.export_dir}")
        if result.wandb_dir:
            typer.echo(f"  W&B run:    {result.wandb_dir}  (upload: wandb sync {result.wandb_dir})")
