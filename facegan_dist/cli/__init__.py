"""The `facegan` command line. Each command lives in its own module and registers itself on
`app`; importing them here is what makes them appear in `facegan --help`."""

import sys

from typer import Abort

# Importing the command modules registers them on `app` (side effect, hence noqa).
from facegan_dist.cli import bench, directions, evaluate, preview, sample, shard, synth, train  # noqa: F401
from facegan_dist.cli.app import app, reflow_help

reflow_help(app)

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
    except Abort as exc:
        # Click turns ANY EOFError escaping a command into Abort ("aborted"), which hid, e.g., an
        # empty weights file read by torch.load. We never prompt, so an EOFError is a file read
        # that its loader failed to name: show where it came from instead of a bare "aborted".
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, EOFError):
            raise cause from None
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


__all__ = ["app", "main"]
