"""The typer app and the error boundary shared by every command.

Commands stay thin: parse flags, build one frozen config, call one core function inside
`errors_to_exit()`. A `FaceganError` from the core becomes a one-line `error: ...` on stderr and
exit code 1 (under a multi-process launch, config errors print on rank 0 only, see
`dist.error_line`); nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from facegan_dist import __version__
from facegan_dist.errors import FaceganError

# The generator a command reads (`sample`, `directions`, `evaluate`): one argument, one help text.
GeneratorSource = Annotated[
    Path,
    typer.Argument(
        help="Run folder (uses export/, else its newest checkpoint), an export folder or a "
        "checkpoint folder (RUN/checkpoints/step-...).",
        show_default=False,
    ),
]

app = typer.Typer(
    name="facegan",
    help=(
        "Distributed face-GAN training: shard CelebA into WebDataset tars, train the paper's "
        "MLP/DCGAN GANs with Accelerate, log to W&B, sample and evaluate."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"facegan_dist {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """facegan: CelebA -> shards -> GAN training -> samples, on one CPU or many GPUs."""


@contextlib.contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn domain errors into `error: <one line>` on stderr and exit code 1."""
    try:
        yield
    except FaceganError as exc:
        from facegan_dist.dist import error_line

        line = error_line(exc)  # one line per failure, not one per process
        if line:
            print(line, file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
