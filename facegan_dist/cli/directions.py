"""`facegan directions`: one latent direction per attribute, from a classifier of G(z)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from facegan_dist.cli.app import (
    DATA_RETRIES,
    DATA_TIMEOUT_S,
    DIRECTION_METHODS,
    DataRetries,
    DataTimeout,
    GeneratorSource,
    app,
    errors_to_exit,
    one_of,
)

CLF = "Attribute classifier"


@app.command("directions")
def directions_cmd(
    source: GeneratorSource,
    data: Annotated[
        str,  # not Path: a URL's "//" would be folded
        typer.Option(
            help="Shard folder with attributes, or its URL prefix (docs/SHARDS.md); the "
            "classifier is trained on it and cached in DATA/classifier/ (a URL: under "
            "--cache-dir).",
            show_default=False,
        ),
    ],
    n: Annotated[int, typer.Option("--n", help="Generated faces to classify.")] = 2000,
    method: Annotated[
        str,
        typer.Option(
            help=f"{one_of(DIRECTION_METHODS)}. mean-diff: mean z of positives minus negatives. "
            "linear (InterFaceGAN): the normal of a logistic-regression boundary in z."
        ),
    ] = "mean-diff",
    seed: Annotated[int, typer.Option(help="The faces are seeds SEED..SEED+N-1.")] = 0,
    batch: Annotated[int, typer.Option(help="Images per forward, per process.")] = 64,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA of G or raw G.")] = True,
    out: Annotated[
        Path | None,
        typer.Option(help="Output .safetensors (+ .json). Default: RUN/directions.safetensors."),
    ] = None,
    check_seeds: Annotated[
        int,
        typer.Option(
            help="Held-out seeds (from 1,000,000) on which each edit is checked: mean classifier "
            "probability before/after; 0 skips."
        ),
    ] = 64,
    check_amount: Annotated[
        float, typer.Option(help="Edit amount (standard deviations) for that check.")
    ] = 3.0,
    retrain_classifier: Annotated[
        bool,
        typer.Option(
            "--retrain-classifier",
            help="Train it again even if a matching one is cached.",
            rich_help_panel=CLF,
        ),
    ] = False,
    classifier_epochs: Annotated[
        int, typer.Option(help="Epochs when the classifier is trained.", rich_help_panel=CLF)
    ] = 3,
    classifier_width: Annotated[
        int, typer.Option(help="Channels of its first layer.", rich_help_panel=CLF)
    ] = 32,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="URL --data: the shard cache (train's --cache-dir), where the classifier is "
            "kept too. Required for a URL.",
            show_default=False,
        ),
    ] = None,
    data_retries: DataRetries = DATA_RETRIES,
    data_timeout: DataTimeout = DATA_TIMEOUT_S,
) -> None:
    """Find one unit latent direction per attribute and store it next to the run.

    Trains (or reuses) a small 40-attribute CNN on the real shards, classifies G(z) for N seeds
    and writes RUN/directions.safetensors + directions.json (used by `facegan sample --edit`).
    """
    from facegan_dist import dist
    from facegan_dist.data.remote import locate
    from facegan_dist.directions import DirectionsConfig, compute_directions

    with errors_to_exit():
        cfg = DirectionsConfig(
            source=source,
            data=locate(data, cache_dir, retries=data_retries, timeout_s=data_timeout),
            n=n,
            method=method,
            seed=seed,
            batch=batch,
            ema=ema,
            out=out,
            check_seeds=check_seeds,
            check_amount=check_amount,
            retrain_classifier=retrain_classifier,
            classifier_epochs=classifier_epochs,
            classifier_width=classifier_width,
        ).validate()
        state = dist.process_state()
        res = compute_directions(cfg, state, log=lambda m: dist.print0(state, m))
    if not dist.is_main(state):
        return
    typer.echo(
        f"{res['method']} directions from {res['n']} faces -> {res['path']} "
        f"(classifier mean accuracy {res['classifier']['mean_accuracy']:.3f})"
    )
    rows = sorted(res["attributes"].items(), key=lambda kv: -(kv[1]["separation"] or -1e9))
    typer.echo(f"{'attribute':<22}{'pos/neg':>11}{'separation':>12}{'check p before->after':>24}")
    for name, a in rows:
        sep = f"{a['separation']:.2f}" if a["separation"] is not None else "-"
        chk = f"{a['check_before']:.2f} -> {a['check_after']:.2f}" if "check_after" in a else "-"
        typer.echo(f"{name:<22}{a['positive']:>5}/{a['negative']:<5}{sep:>12}{chk:>24}")
