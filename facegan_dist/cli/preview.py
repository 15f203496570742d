"""`facegan preview`: look at what a shard folder holds (a PNG contact sheet)."""

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
    one_of,
)
from facegan_dist.config import SPLITS


@app.command("preview")
def preview_cmd(
    shards: Annotated[
        str,  # not Path: a URL's "//" would be folded
        typer.Argument(
            help="Shard folder (with manifest.json), or its URL prefix (docs/SHARDS.md).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("contact-sheet.png"),
    n: Annotated[int, typer.Option(help="Number of images in the grid.")] = 64,
    split: Annotated[str, typer.Option(help=f"{one_of(SPLITS)}.")] = "all",
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="URL SHARDS: download the shards read into this cache (train's --cache-dir).",
            show_default=False,
        ),
    ] = None,
    data_retries: DataRetries = DATA_RETRIES,
    data_timeout: DataTimeout = DATA_TIMEOUT_S,
) -> None:
    """Write a contact sheet (a grid of the first N images) of a shard folder."""
    from facegan_dist.data.preview import contact_sheet
    from facegan_dist.data.remote import locate
    from facegan_dist.errors import ConfigError

    with errors_to_exit():
        if n < 1:
            raise ConfigError(f"--n {n} must be at least 1")
        count, _ = contact_sheet(
            locate(shards, cache_dir, retries=data_retries, timeout_s=data_timeout),
            out,
            n=n,
            split=split,
        )
    typer.echo(f"wrote {out} ({count} images from {shards})")
