"""`facegan shard` (source -> WebDataset tars + manifest) and `facegan verify` (re-check them).

Thin wrappers: build a ShardConfig, call `facegan_dist.data.shards`, print a summary. Bad input
comes back from the core as a one-line DataError/ConfigError, turned into `error: ...` + exit 1
by `errors_to_exit()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from facegan_dist.cli.app import (
    DATA_RETRIES,
    DATA_TIMEOUT_S,
    DataRetries,
    DataTimeout,
    app,
    errors_to_exit,
)
from facegan_dist.config import default_workers

WHAT = "What to write"
HOW = "How"


@app.command("shard")
def shard_cmd(
    src: Annotated[
        Path,
        typer.Argument(
            help="Kaggle archive.zip (or its extraction), an official CelebA folder "
            "(Img/ Anno/ Eval/), or any folder of images.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (manifest.json + {split}-NNNNNN.tar).",
            rich_help_panel=WHAT,
        ),
    ],
    size: Annotated[
        int, typer.Option(help="Output side in pixels: 16|32|64|128|256.", rich_help_panel=WHAT)
    ] = 64,
    crop: Annotated[
        str,
        typer.Option(
            help="auto (celeba for CelebA, center for folders) | celeba (128x128 face box at "
            "(89,121)) | center (largest centred square) | none (squash).",
            rich_help_panel=WHAT,
        ),
    ] = "auto",
    format: Annotated[
        str, typer.Option("--format", help="jpg | png | webp.", rich_help_panel=WHAT)
    ] = "jpg",
    quality: Annotated[
        int, typer.Option(help="jpg/webp quality 1..100 (png ignores it).", rich_help_panel=WHAT)
    ] = 95,
    limit: Annotated[
        int | None,
        typer.Option(
            help="At most N images per split, a random subset by --seed.", rich_help_panel=WHAT
        ),
    ] = None,
    split: Annotated[
        str,
        typer.Option(help="train | val | test | all (CelebA partitions).", rich_help_panel=WHAT),
    ] = "all",
    shard_size: Annotated[
        int, typer.Option(help="Samples per tar shard.", rich_help_panel=WHAT)
    ] = 5000,
    seed: Annotated[
        int, typer.Option(help="Shuffle (and --limit subset) seed.", rich_help_panel=WHAT)
    ] = 0,
    labels: Annotated[
        str,
        typer.Option(
            help="Plain image folders only: none (unlabelled) | subfolders (each image's "
            "first-level subfolder is its class, stored as one-hot attributes named by the "
            "sorted folder names; an image directly in SRC is an error). CelebA sources carry "
            "their own 40 attributes.",
            rich_help_panel=WHAT,
        ),
    ] = "none",
    workers: Annotated[
        int | None,
        typer.Option(help="Worker processes (default: all CPUs).", rich_help_panel=HOW),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="A bad image is fatal instead of skipped.", rich_help_panel=HOW
        ),
    ] = False,
    progress: Annotated[
        bool,
        typer.Option(
            "--progress/--no-progress", help="Progress bar on stderr.", rich_help_panel=HOW
        ),
    ] = True,
) -> None:
    """Crop and resize a face dataset once into WebDataset tar shards + manifest.json.

    Re-running the same command resumes: finished shards are kept, the rest redone (a damaged
    manifest.json is rebuilt).
    """
    from facegan_dist.config import ShardConfig
    from facegan_dist.data.shards import write_shards

    with errors_to_exit():
        cfg = ShardConfig(
            src=src,
            out=out,
            size=size,
            crop=crop,
            format=format,
            quality=quality,
            limit=limit,
            split=split,
            shard_size=shard_size,
            workers=workers if workers is not None else default_workers(),
            seed=seed,
            strict=strict,
        ).validate()
        try:
            result = write_shards(cfg, labels=labels, progress=progress, log=typer.echo)
        except KeyboardInterrupt:
            # The partial shards are gone and no manifest names them (write_shards' cleanup).
            typer.echo(
                f"error: interrupted; finished shards are kept in {out}: "
                "re-run the same command to resume",
                err=True,
            )
            raise typer.Exit(130) from None
    _print_summary(result)


def _print_summary(result) -> None:
    m = result.manifest
    typer.echo(f"kept {result.kept}, wrote {result.written} shard(s)")
    for split, entry in m["splits"].items():
        n = len(entry["shards"])
        typer.echo(f"  {split:<5} {entry['count']:>8} images  {n:>4} shard{'s' if n != 1 else ''}")
    skipped = m["skipped"]
    if skipped:
        n = m["total"] + len(skipped)
        typer.echo(
            f"skipped {len(skipped)} of {n} images, unreadable (all listed in manifest.json):"
        )
        for s in skipped[:5]:
            typer.echo(f"  {s['file']}: {s['reason']}")
        if len(skipped) > 5:
            typer.echo(f"  ... and {len(skipped) - 5} more")
    else:
        typer.echo("skipped 0 images")
    if result.images_processed:
        typer.echo(
            f"{result.images_processed} images in {result.seconds:.1f} s "
            f"({result.images_per_s:,.0f} images/s)"
        )
    if m["settings"].get("labels"):
        typer.echo(f"labels: {len(m['attribute_names'])} classes from {m['settings']['labels']}")
    typer.echo(f"output: {result.out} ({m['total']} images, manifest.json)")


@app.command("verify")
def verify_cmd(
    shard_dir: Annotated[
        str,  # not Path: a URL's "//" would be folded
        typer.Argument(
            help="Shard folder written by `facegan shard`, or its URL prefix (docs/SHARDS.md).",
            show_default=False,
        ),
    ],
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="URL SHARD_DIR: download into this shard cache (train's --cache-dir) and keep "
            "each shard that matches, so that a run reads it from there.",
            show_default=False,
        ),
    ] = None,
    data_retries: DataRetries = DATA_RETRIES,
    data_timeout: DataTimeout = DATA_TIMEOUT_S,
) -> None:
    """Re-hash and re-count every shard named by DIR/manifest.json; report strays. Exit 1 if bad."""
    from facegan_dist.data.remote import locate
    from facegan_dist.data.shards import verify_shards

    with errors_to_exit():
        report = verify_shards(
            locate(shard_dir, cache_dir, retries=data_retries, timeout_s=data_timeout)
        )
    if report.ok:
        typer.echo(f"OK: {report.shards} shards, {report.samples} samples in {report.out}")
        return
    for name, problem in report.problems:
        typer.echo(f"BAD {name}: {problem}")
    typer.echo(
        f"error: {len(report.problems)} problem(s) in {report.out} "
        f"({report.shards} shards in the manifest)",
        err=True,
    )
    raise typer.Exit(1)
