"""The `facegan` command line. Each command lives in its own module and registers itself on
`app`; importing them here is what makes them appear in `facegan --help`."""

import importlib

from facegan_dist.cli.app import app

for _name in ("synth", "shard", "train"):  # TEMP(lead): tolerate modules not written yet
    try:
        importlib.import_module(f"facegan_dist.cli.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"facegan_dist.cli.{_name}":
            raise


def main() -> None:
    app(prog_name="facegan")


__all__ = ["app", "main"]
