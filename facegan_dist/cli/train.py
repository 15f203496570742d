"""`facegan train`: build the TrainConfig from preset -> --config file -> flags, run the loop.

The same command runs under `accelerate launch facegan_dist train ...` (one process per device)
and as plain `facegan train ...` (one process: CPU, MPS or one GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from facegan_dist.cli.app import app, errors_to_exit

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
            help="Shard folder from `facegan shard` (size/attributes from its manifest).",
            rich_help_panel=DATA,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder. \\[default: runs/<preset>]", rich_help_panel=DATA),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Shard split: train|val|test|all.", rich_help_panel=DATA)
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="quality (the measured best: resize-conv G, Adam betas 0,0.99, 2 kimg EMA; "
            "docs/QUALITY.md) | tutorial | paper-mlp-relu | paper-mlp-leaky | paper-dcgan | "
            "paper-final | demo | wgan-gp | sngan-hinge | cgan. \\[default: quality]",
            rich_help_panel=DATA,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML/YAML/JSON file of options; flags override it.",
            rich_help_panel=DATA,
        ),
    ] = None,
    arch: Annotated[str | None, typer.Option(help="mlp | dcgan.", rich_help_panel=MODEL)] = None,
    act: Annotated[
        str | None,
        typer.Option(help="MLP activation: relu (paper T1) | leaky (T2).", rich_help_panel=MODEL),
    ] = None,
    dropout: Annotated[
        float | None, typer.Option(help="MLP dropout. \\[default: 0.3]", rich_help_panel=MODEL)
    ] = None,
    z_dim: Annotated[
        int | None, typer.Option(help="Latent size. \\[default: 100]", rich_help_panel=MODEL)
    ] = None,
    g_width: Annotated[
        int | None, typer.Option(help="DCGAN G width. \\[default: 64]", rich_help_panel=MODEL)
    ] = None,
    d_width: Annotated[
        int | None, typer.Option(help="DCGAN D width. \\[default: 64]", rich_help_panel=MODEL)
    ] = None,
    upsample: Annotated[
        str | None,
        typer.Option(
            help="DCGAN G upsampling: convtranspose | nearest | bilinear (resize + 3x3 conv, "
            "no checkerboard). \\[default: nearest (quality); convtranspose (other presets)]",
            rich_help_panel=MODEL,
        ),
    ] = None,
    d_norm: Annotated[
        str | None,
        typer.Option(
            help="DCGAN D norm: batch | none | auto (none for wgan-gp / SN D).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    mbstd: Annotated[
        bool | None,
        typer.Option(
            "--mbstd/--no-mbstd",
            help="DCGAN D: minibatch standard deviation channel before its last layer "
            "(ProGAN); shows D a batch's variety. \\[default: off]",
            rich_help_panel=MODEL,
        ),
    ] = None,
    spectral_norm: Annotated[
        str | None,
        typer.Option(help="Spectral normalisation: none | d | g | both.", rich_help_panel=MODEL),
    ] = None,
    condition: Annotated[
        str | None,
        typer.Option(
            help="Conditional GAN on shard attributes: all | Smiling,Male,...",
            rich_help_panel=MODEL,
        ),
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            help="ns (non-saturating) | minimax (the paper's). \\[default: ns]", rich_help_panel=OBJ
        ),
    ] = None,
    gp_lambda: Annotated[
        float | None,
        typer.Option(help="wgan-gp penalty weight. \\[default: 10]", rich_help_panel=OBJ),
    ] = None,
    clip: Annotated[
        float | None,
        typer.Option(help="wgan weight clipping. \\[default: 0.01]", rich_help_panel=OBJ),
    ] = None,
    r1: Annotated[
        float | None,
        typer.Option(
            help="R1 gamma on real data, lazy every 16 D steps (0 = off).", rich_help_panel=OBJ
        ),
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help="DiffAugment policy: color,translation,cutout (or a subset; none).",
            rich_help_panel=OBJ,
        ),
    ] = None,
    d_every: Annotated[
        int | None,
        typer.Option(
            help="Update D on one step in K (the paper's 'D critiques every 5').",
            rich_help_panel=OBJ,
        ),
    ] = None,
    d_steps: Annotated[
        int | None, typer.Option(help="D updates per G update.", rich_help_panel=OBJ)
    ] = None,
    lr_g: Annotated[float | None, typer.Option(help="Adam lr of G.", rich_help_panel=OBJ)] = None,
    lr_d: Annotated[float | None, typer.Option(help="Adam lr of D.", rich_help_panel=OBJ)] = None,
    betas_g: Annotated[
        str | None,
        typer.Option(
            help="Adam betas of G, e.g. 0.5,0.999. \\[default: 0,0.99 (quality); 0.5,0.999 "
            "(tutorial)]",
            rich_help_panel=OBJ,
        ),
    ] = None,
    betas_d: Annotated[
        str | None,
        typer.Option(
            help="Adam betas of D, e.g. 0.5,0.999. \\[default: as --betas-g]",
            rich_help_panel=OBJ,
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            help="GLOBAL batch; each process gets batch / processes.", rich_help_panel=RUN
        ),
    ] = None,
    epochs: Annotated[
        float | None, typer.Option(help="Passes over the split.", rich_help_panel=RUN)
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="G updates; overrides --epochs.", rich_help_panel=RUN)
    ] = None,
    ema_kimg: Annotated[
        float | None,
        typer.Option(
            help="EMA of G: half-life in kimg (0 = off). \\[default: 2 (quality), 10 (other "
            "presets)]",
            rich_help_panel=RUN,
        ),
    ] = None,
    ema_rampup: Annotated[
        float | None,
        typer.Option(
            help="EMA ramp-up: half-life <= this x images seen. \\[default: 0.05]",
            rich_help_panel=RUN,
        ),
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="no | bf16 | fp16 (fp16: GPU only).", rich_help_panel=RUN)
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed. \\[default: 0]", rich_help_panel=RUN)
    ] = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn", help="SyncBatchNorm under DDP (CUDA).", rich_help_panel=RUN
        ),
    ] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic",
            help="Deterministic torch kernels.",
            rich_help_panel=RUN,
        ),
    ] = None,
    data_cache: Annotated[
        str | None,
        typer.Option(
            help="none (stream) | device (decode the split once into GPU memory).",
            rich_help_panel=RUN,
        ),
    ] = None,
    hflip: Annotated[
        bool | None,
        typer.Option(
            "--hflip/--no-hflip",
            help="Random horizontal flips of real images.",
            rich_help_panel=RUN,
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help="torch.compile G and D.", rich_help_panel=RUN),
    ] = None,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="Replay the whole step as one CUDA graph (one CUDA device; one D step per G "
            "step, no penalty/augmentation; not with --compile or fp16). Experimental.",
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
            help="Bit-reproducible: deterministic, no fast paths.",
            rich_help_panel=RUN,
        ),
    ] = None,
    num_workers: Annotated[
        int | None,
        typer.Option(
            help="Loader workers per process. \\[default: 2; on CUDA min(8, CPUs per process - 1)]",
            rich_help_panel=RUN,
        ),
    ] = None,
    shuffle_buffer: Annotated[
        int | None, typer.Option(help="Shuffle buffer per loader worker.", rich_help_panel=RUN)
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            help="Steps between FID/KID evaluations (0 = off); the best G goes to RUN/best/.",
            rich_help_panel=LOG,
        ),
    ] = None,
    eval_n: Annotated[
        int | None,
        typer.Option(help="Images per evaluation. \\[default: 2000]", rich_help_panel=LOG),
    ] = None,
    eval_features: Annotated[
        str | None,
        typer.Option(
            help="attributes (offline: the shards' label classifier) | inception (the "
            "standard TF-FID network; needs its weights file, see --inception-weights). "
            "\\[default: attributes]",
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
            help="On a NaN/inf loss: stop | rollback (to the last checkpoint, lrs "
            "lowered). \\[default: stop]",
            rich_help_panel=LOG,
        ),
    ] = None,
    max_rollbacks: Annotated[
        int | None,
        typer.Option(help="Rollbacks before giving up. \\[default: 3]", rich_help_panel=LOG),
    ] = None,
    rollback_lr_factor: Annotated[
        float | None,
        typer.Option(help="lr multiplier per rollback. \\[default: 0.5]", rich_help_panel=LOG),
    ] = None,
    skip_bad_samples: Annotated[
        bool | None,
        typer.Option(
            "--skip-bad-samples/--no-skip-bad-samples",
            help="Replace undecodable images (counted, logged) instead of stopping.",
            rich_help_panel=LOG,
        ),
    ] = None,
    log_every: Annotated[
        int | None, typer.Option(help="Steps between metric rows.", rich_help_panel=LOG)
    ] = None,
    sample_every: Annotated[
        int | None, typer.Option(help="Steps between fixed-noise grids.", rich_help_panel=LOG)
    ] = None,
    n_samples: Annotated[
        int | None, typer.Option(help="Images in the fixed-noise grid.", rich_help_panel=LOG)
    ] = None,
    ckpt_every: Annotated[
        int | None, typer.Option(help="Steps between checkpoints.", rich_help_panel=LOG)
    ] = None,
    keep: Annotated[
        int | None, typer.Option(help="Checkpoints to keep.", rich_help_panel=LOG)
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="auto (newest complete checkpoint in --out) or a checkpoint folder.",
            rich_help_panel=LOG,
        ),
    ] = None,
    wandb_mode: Annotated[
        str | None,
        typer.Option(
            help="online | offline | disabled. \\[default: offline without an API key]",
            rich_help_panel=LOG,
        ),
    ] = None,
    wandb_project: Annotated[
        str | None, typer.Option(help="W&B project. \\[default: facegan]", rich_help_panel=LOG)
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(help="W&B run name. \\[default: run folder name]", rich_help_panel=LOG),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved config and exit.")
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
    from facegan_dist.train.loop import read_data_manifest, resolve_config, train

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
        wandb_project=wandb_project, run_name=run_name,
    )  # fmt: skip
    if preset is not None:
        flags["preset"] = preset
    with errors_to_exit():
        cfg, ckpt = resolve_config(preset, config, flags)
        if dry_run:
            read_data_manifest(cfg)  # a dry run still checks that the data is there
            print(dumps(cfg))
            if ckpt is not None:
                print(f"# would resume from {ckpt}", file=sys.stderr)
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
