"""`facegan evaluate`: FID and KID of a generator against a shard split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from facegan_dist.cli.app import (
    DATA_RETRIES,
    DATA_TIMEOUT_S,
    TRUNCATION_MODES,
    DataRetries,
    DataTimeout,
    GeneratorSource,
    app,
    errors_to_exit,
    one_of,
)
from facegan_dist.config import EVAL_FEATURES, SPLITS


@app.command("evaluate")
def evaluate_cmd(
    source: GeneratorSource,
    data: Annotated[
        str,  # not Path: a URL's "//" would be folded
        typer.Option(
            help="Shard folder, or its URL prefix (https://, s3://, gs://, hf://, pipe:CMD with "
            "{name}; docs/SHARDS.md); real statistics are cached in DATA/stats/.",
            show_default=False,
        ),
    ],
    n: Annotated[
        int, typer.Option("--n", help="Generated images (seeds SEED..) and real images used.")
    ] = 50_000,
    split: Annotated[str, typer.Option(help=f"Real split: {one_of(SPLITS)}.")] = "train",
    features: Annotated[
        str,
        typer.Option(
            help=f"{one_of(EVAL_FEATURES)}. attributes: the shards' attribute classifier, 128-d; "
            "fully offline, comparable only between runs using the same cached classifier (the "
            "default here and of train's --eval-features). inception: the standard, "
            "published-table FID (torch-fidelity's TF-FID Inception v3, 2048-d); needs its "
            "weights file, see --inception-weights."
        ),
    ] = "attributes",
    batch: Annotated[int, typer.Option(help="Images per forward, per process.")] = 100,
    kid_subsets: Annotated[
        int, typer.Option(help="KID subsets (of min(1000, n) features each).")
    ] = 100,
    seed: Annotated[int, typer.Option(help="First generated seed.")] = 0,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA of G or raw G.")] = True,
    truncation: Annotated[float, typer.Option(help="Truncation PSI (1 = off).")] = 1.0,
    truncation_mode: Annotated[
        str, typer.Option(help=f"{one_of(TRUNCATION_MODES)} (see `facegan sample --help`).")
    ] = "shrink",
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            help="torch-fidelity's Inception v3 weights file, for --features inception; never "
            "downloaded (without it, the error names the file and its URL). Default: the file in "
            "torch hub's cache, the checkpoints folder under $TORCH_HOME/hub (~/.cache/torch).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Result JSON. Default: a file in RUN/eval/ named after --features, --split, --n, "
            "--no-ema (-raw) and --truncation (-psiP-MODE).",
            show_default=False,
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="URL --data: the shard cache (train's --cache-dir); the attribute classifier and "
            "the real statistics are kept there too. Required for a URL.",
            show_default=False,
        ),
    ] = None,
    data_retries: DataRetries = DATA_RETRIES,
    data_timeout: DataTimeout = DATA_TIMEOUT_S,
) -> None:
    """FID and KID of the generator against N real images of a split.

    FID and KID are torchmetrics' (docs/SAMPLING.md, "Evaluation protocol"). Real statistics
    are cached in DATA/stats/<features>-<split>-<n>.safetensors (recomputed when manifest.json
    or the feature extractor changes); for a URL --data under --cache-dir. Runs split over
    processes under `accelerate launch ... facegan_dist evaluate ...`.
    """
    from facegan_dist import dist
    from facegan_dist.data.remote import locate
    from facegan_dist.metrics import EvaluateConfig, evaluate

    with errors_to_exit():
        cfg = EvaluateConfig(
            source=source,
            data=locate(data, cache_dir, retries=data_retries, timeout_s=data_timeout),
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
