"""The typer app and the error boundary shared by every command.

Commands stay thin: parse flags, build one frozen config, call one core function inside
`errors_to_exit()`. A `FaceganError` from the core becomes a one-line `error: ...` on stderr and
exit code 1 (under a multi-process launch, config errors print on rank 0 only, see
`dist.error_line`); nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from facegan_dist import __version__
from facegan_dist.config import TrainConfig
from facegan_dist.errors import FaceganError

# Choices whose tuples live in modules that import torch, mirrored here so that `--help` stays
# fast; tests/cli/test_help.py checks that each mirror equals its source and that the help lists it.
TRUNCATION_MODES = ("shrink", "resample")  # latent.TRUNCATION_MODES
INTERP_MODES = ("lerp", "slerp")  # latent.INTERP_MODES
DIRECTION_METHODS = ("mean-diff", "linear")  # directions.METHODS

# The generator a command reads (`sample`, `directions`, `evaluate`): one argument, one help text.
GeneratorSource = Annotated[
    Path,
    typer.Argument(
        help="Run folder (uses export/, else its newest checkpoint), an export folder or a "
        "checkpoint folder (RUN/checkpoints/step-...).",
        show_default=False,
    ),
]

# A URL data folder's retry policy, for the commands that read shards besides train (whose
# TrainConfig fields declare the same two options): the defaults are those fields'.
DATA_RETRIES, DATA_TIMEOUT_S = TrainConfig.data_retries, TrainConfig.data_timeout
DataRetries = Annotated[
    int,
    typer.Option(
        "--data-retries", help="URL data: retries, with backoff, of a failed transfer (as train's)."
    ),
]
DataTimeout = Annotated[
    float,
    typer.Option(
        "--data-timeout", help="URL data: read timeout (s) of a transfer: seconds without a byte."
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


def one_of(values: Iterable[object]) -> str:
    """'a | b | c': how a help text lists an option's choices, taken from the code's own tuple
    (tests/cli/test_help.py reads them back from the rendered help)."""
    return " | ".join(str(v) for v in values)


def _reflow(doc: str) -> str:
    """A docstring as help text: the lines of each paragraph joined into one, so rich wraps it to
    the terminal (typer keeps single line breaks after the first paragraph, which leaves a
    stray short line at every source line end). Paragraphs with indented or bulleted lines are
    kept as written (examples, lists)."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    out = []
    for par in paragraphs:
        lines = par.splitlines()
        if any(line.startswith((" ", "-", "*", "\b")) for line in lines):
            out.append(par)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def reflow_help(typer_app: typer.Typer) -> None:
    """Give every command of `typer_app` (and of its sub-apps) its docstring, reflowed, as help."""
    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = _reflow(info.callback.__doc__)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)


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
        if line:  # one write: print() writes the newline apart, and the ranks' lines interleave
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
