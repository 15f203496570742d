"""`facegan sample`: images from a trained generator, addressed by seed (see docs/SAMPLING.md).

Runs as one process (`facegan sample ...`) or many (`accelerate launch [--config_file ...]
facegan_dist sample ...`): the seeds, pairs, expressions and edits are split across processes
and each writes its own PNGs; rank 0 writes the grid, edits.png and sample.json.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from facegan_dist.cli.app import (
    INTERP_MODES,
    TRUNCATION_MODES,
    GeneratorSource,
    app,
    errors_to_exit,
    one_of,
)

SRC = "Generator and output"
SEEDS = "Seeds, grid and truncation"
LATENT = "Interpolation, arithmetic and edits"


@app.command("sample")
def sample_cmd(
    source: GeneratorSource,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the PNGs.", rich_help_panel=SRC)
    ] = Path("samples"),
    ema: Annotated[
        bool,
        typer.Option(
            "--ema/--no-ema",
            help="Sample the EMA of G (when the run kept one) or the raw G.",
            rich_help_panel=SRC,
        ),
    ] = True,
    batch: Annotated[
        int, typer.Option(help="Images per G forward, per process.", rich_help_panel=SRC)
    ] = 64,
    n: Annotated[
        int | None,
        typer.Option(
            "--n", help="Write N PNGs, seeds --seed .. --seed+N-1.", rich_help_panel=SEEDS
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(help="First seed for --n, --grid and --edit.", rich_help_panel=SEEDS),
    ] = 0,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Write one PNG per seed: '0-99', '1,5,7-9' (instead of --seed/--n).",
            rich_help_panel=SEEDS,
        ),
    ] = None,
    grid: Annotated[
        str | None,
        typer.Option(
            help="One grid.png of ROWSxCOLS images (the first R*C seeds). With no other "
            "output asked for: 8x8.",
            rich_help_panel=SEEDS,
        ),
    ] = None,
    truncation: Annotated[
        float,
        typer.Option(
            help="Truncation PSI in [0, 1]; 1 = off (fidelity vs variety).", rich_help_panel=SEEDS
        ),
    ] = 1.0,
    truncation_mode: Annotated[
        str,
        typer.Option(
            help=f"{one_of(TRUNCATION_MODES)}. shrink: z <- PSI*z (toward the mean, 0). "
            "resample: redraw z (from the seed) until ||z|| <= the PSI-quantile of ||z||, so PSI "
            "is the fraction of draws kept.",
            rich_help_panel=SEEDS,
        ),
    ] = "shrink",
    interpolate: Annotated[
        list[str] | None,
        typer.Option(
            help="Seed pair(s) 'A-B' or 'A-B,C-D' (repeatable): one strip PNG per pair, "
            "interp-AAAAAA-BBBBBB.png.",
            rich_help_panel=LATENT,
        ),
    ] = None,
    steps: Annotated[
        int,
        typer.Option(
            help="Images per interpolation strip (endpoints included).", rich_help_panel=LATENT
        ),
    ] = 8,
    interp: Annotated[
        str,
        typer.Option(
            help=f"{one_of(INTERP_MODES)}: lerp is a straight line, slerp a great circle "
            "(keeps |z| typical).",
            rich_help_panel=LATENT,
        ),
    ] = "slerp",
    arith: Annotated[
        list[str] | None,
        typer.Option(
            help="Vector arithmetic on mean latents of seed groups, e.g. '1,2,3 - 4,5,6 + "
            "7,8,9' (spaces around + and -; repeatable): arith-NN.png = group means + result.",
            rich_help_panel=LATENT,
        ),
    ] = None,
    edit: Annotated[
        list[str] | None,
        typer.Option(
            help="ATTR=AMOUNT (or 'A=1,B=-2' combined; repeatable, one 'after' each): move z "
            "along the attribute direction from `facegan directions`, AMOUNT in standard "
            "deviations. Writes edit-seedNNNNNN.png (before, after...) and edits.png.",
            rich_help_panel=LATENT,
        ),
    ] = None,
    attrs: Annotated[
        str | None,
        typer.Option(
            help="Conditional models: the attributes to draw, e.g. 'Smiling=1,Eyeglasses=0' "
            "(attributes not named are 0).",
            rich_help_panel=LATENT,
        ),
    ] = None,
    directions: Annotated[
        Path | None,
        typer.Option(
            help="directions.safetensors to use for --edit. Default: RUN/directions.safetensors.",
            rich_help_panel=LATENT,
        ),
    ] = None,
) -> None:
    """Generate images by seed: per-seed PNGs, a grid, interpolations, arithmetic, edits.

    The image of a seed is the same whatever --batch or the number of processes: z for seed S is
    torch.randn(z_dim) from a CPU generator seeded with S, and G runs in eval mode.
    """
    from facegan_dist import dist
    from facegan_dist.sampling import SampleConfig, sample

    with errors_to_exit():
        cfg = SampleConfig(
            source=source,
            out=out,
            n=n,
            seed=seed,
            seeds=seeds,
            grid=grid,
            batch=batch,
            ema=ema,
            truncation=truncation,
            truncation_mode=truncation_mode,
            interpolate=tuple(interpolate or ()),
            steps=steps,
            interp=interp,
            arith=tuple(arith or ()),
            edit=tuple(edit or ()),
            directions=directions,
            attrs=attrs,
        )
        cfg.plan()  # bad flags fail before any process group starts
        state = dist.process_state()
        result = sample(cfg, state)
    rank, world = dist.world(state)
    if world > 1:
        # one write() per line, so lines of concurrent ranks do not interleave
        sys.stderr.write(f"[rank {rank}/{world}] wrote {len(result['written'])} file(s)\n")
        sys.stderr.flush()
    dist.barrier(state)
    if dist.is_main(state):
        which = "EMA" if result["ema"] else "raw G"
        typer.echo(
            f"sampled {result['kind']} {result['source']} ({which}) on {world} process(es) -> {out}"
        )
