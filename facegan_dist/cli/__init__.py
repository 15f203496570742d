"""The `facegan` command line. Each command lives in its own module and registers itself on
`app`; importing them here is what makes them appear in `facegan --help`."""

import sys

from typer import Abort

# Importing the command modules registers them on `app` (side effect, hence noqa).
from facegan_dist.cli import bench, directions, evaluate, preview, sample, shard, synth, train  # noqa: F401
from facegan_dist.cli.app import app

try:  # typer >= 0.26 vendors Click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer with external click
    from click.exceptions import ClickException, NoArgsIsHelpError


def main() -> None:
    """Run the CLI; usage errors become ONE line (`error: ...`, exit 2) instead of a rich panel."""
    try:
        rv = app(prog_name="facegan", standalone_mode=False)
    except NoArgsIsHelpError:  # the help text was printed already
        sys.exit(0)
    except ClickException as exc:
        msg = " ".join(exc.format_message().split())
        hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
        print(f"error: {msg}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


__all__ = ["app", "main"]
