"""`facegan evaluate`: FID and KID of a generator against a shard split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from facegan_dist.cli.app import GeneratorSource, app, errors_to_exit


@app.command("evaluate")
def evaluate_cmd(
    source: GeneratorSource,
    data: Annotated[
        Path,
        typer.Option(
            help="Shard folder; real statistics are cached in DATA/stats/.", show_default=False
        ),
    ],
    n: Annotated[
        int, typer.Option("--n", help="Generated images (seeds SEED..) and real images used.")
    ] = 50_000,
    split: Annotated[str, typer.Option(help="Real split: train | val | test | all.")] = "train",
    features: Annotated[
        str,
        typer.Option(
            help="attributes (the shards' attribute classifier, 128-d; fully offline, comparable "
            "only between runs using the same cached classifier) or inception (the standard, "
            "published-table FID: torch-fidelity's TF-FID Inception v3, 2048-d; needs its "
            "weights file, see --inception-weights)."
        ),
    ] = "attributes",
    batch: Annotated[int, typer.Option(help="Images per forward, per process.")] = 100,
    kid_subsets: Annotated[
        int, typer.Option(help="KID subsets (of min(1000, n) features each).")
    ] = 100,
    seed: Annotated[int, typer.Option(help="First generated seed.")] = 0,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA of G or raw G.")] = True,
    truncation: Annotated[float, typer.Option(help="Truncation PSI (1 = off).")] = 1.0,
    truncation_mode: Annotated[str, typer.Option(help="shrink | resample.")] = "shrink",
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (from "
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/). Never "
            "downloaded. Default: the torch hub cache, $TORCH_HOME/hub/checkpoints/ "
            "(~/.cache/torch/hub/checkpoints/).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Result JSON. Default: RUN/eval/<features>-<split>-<n>(-raw)(-psiP-MODE).json."
        ),
    ] = None,
) -> None:
    """FID and KID of the generator against N real images of a split.

    FID and KID are torchmetrics' (docs/SAMPLING.md, "Evaluation protocol"). Real statistics
    are cached in DATA/stats/<features>-<split>-<n>.safetensors (recomputed when manifest.json
    or the feature extractor changes). Runs split over processes under
    `accelerate launch ... facegan_dist evaluate ...`.
    """
    from facegan_dist import dist
    from facegan_dist.metrics import EvaluateConfig, evaluate

    with errors_to_exit():
        cfg = EvaluateConfig(
            source=source,
            data=data,
            n=n,
            split=split,
            features=features,
            batch=batch,
            kid_subsets=kid_subsets,
            seed=seed,
            ema=ema,
            truncation=truncation,
            truncation_mode=truncation_mode,
            inception_weights=inception_weights,
            out=out,
        )
        state = dist.process_state()
        res = evaluate(cfg, state, log=lambda m: dist.print0(state, m))
    if dist.is_main(state):
        typer.echo(
            f"FID {res['fid']:.3f}  KID {res['kid']:.5f} ± {res['kid_std']:.5f}  "
            f"({res['features']}, {res['n']} generated vs {res['n_real']} real '{res['split']}', "
            f"{res['world_size']} process(es)) -> {res['path']}"
        )
