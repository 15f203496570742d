"""`facegan train`: build the TrainConfig from preset -> --config file -> flags, run the loop.

The options are generated from TrainConfig's fields (config.py declares each one once: type,
default, help, panel, choices); a flag counts as given when click says it came from the command
line, so an omitted flag never overrides the preset, the file or a resumed run's config.

The same command runs under `accelerate launch facegan_dist train ...` (one process per device)
and as plain `facegan train ...` (one process: CPU, MPS or one GPU).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from facegan_dist.cli.app import app, errors_to_exit
from facegan_dist.config import DATA, DEFAULT_PRESET, PRESETS, TrainConfig

try:  # typer >= 0.26 vendors Click
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover - older typer with external click
    from click.core import ParameterSource

# Every option of `facegan train` but --config and --dry-run is a TrainConfig field: its type,
# default, help, panel and choices are declared there (config.option) and the command's
# parameters are built from them below. tests/cli/test_train_help.py reads the rendered help
# back against the code.
FIELDS = dataclasses.fields(TrainConfig)
_HINTS = typing.get_type_hints(TrainConfig)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple | list):
        return ",".join(_show(x) for x in v)
    return str(v) or "none"


def _presets(names: list[str]) -> str:
    paper = [p for p in PRESETS if p.startswith("paper-")]
    if paper and all(p in names for p in paper):  # all four paper presets: paper-*
        names = [n for n in names if n not in paper[1:]]
        names = ["paper-*" if n == paper[0] else n for n in names]
    return ", ".join(names)


def _default(f: dataclasses.Field) -> str:
    """`[default: ...]` for field `f`: the default preset's value and, where other presets set
    another one, theirs (or the field's `shown` text). Escaped for rich markup."""
    if f.metadata["shown"] is not None:
        return f"\\[default: {f.metadata['shown']}]" if f.metadata["shown"] else ""

    def text(p: str) -> str:
        v = PRESETS[p].get(f.name, f.default)
        return f.metadata["none"] if v is None else _show(v)

    base = text(DEFAULT_PRESET)
    others: dict[str, list[str]] = {}
    for p in PRESETS:
        if text(p) != base:
            others.setdefault(text(p), []).append(p)
    if not others:
        return f"\\[default: {base}]"
    rest = [p for p in PRESETS if p != DEFAULT_PRESET]
    if len(others) == 1 and list(others.values())[0] == rest:
        return f"\\[default: {base} ({DEFAULT_PRESET}); {list(others)[0]} (other presets)]"
    parts = [base] + [f"{v} with --preset {_presets(ps)}" for v, ps in others.items()]
    return "\\[default: " + "; ".join(parts) + "]"


def _help(f: dataclasses.Field) -> str:
    text, choices = f.metadata["help"], f.metadata["choices"]
    if choices and "{choices}" not in text:
        text = "{choices}. " + text
    text = text.replace("{choices}", " | ".join(choices or ()))
    return f"{text} {_default(f)}".strip()


def _option(name: str, hint: Any, default: Any, flag: str, help: str, panel: str | None, **kw: Any):
    info = typer.Option(flag, help=help, rich_help_panel=panel, show_default=False, **kw)
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, default=default, annotation=Annotated[hint, info])


def _parameter(f: dataclasses.Field) -> inspect.Parameter:
    """The typer option of TrainConfig field `f`. Its default never reaches the config: only the
    options given on the command line are merged (see `given_options`)."""
    hint, default = _HINTS[f.name], f.default
    if typing.get_origin(hint) is tuple:  # "0.5,0.999": coerced (and checked) like a file's value
        hint, default = str | None, None
    elif Path in typing.get_args(hint) and str in typing.get_args(hint):  # --data: URL or path
        hint = str | None  # typer would fold a URL's "//" into a Path; config._coerce sorts it
    kw: dict[str, Any] = {}
    choices = f.metadata["choices"]
    if choices and f.name != "augment" and hint in (str, str | None):
        # typer itself refuses a value outside the declared choices (a usage error, one line
        # from cli/app.py); validate() checks the same tuple for config files. The help row
        # already lists the choices, so the metavar stays <str>.
        hint = typing.Optional[typing.Literal[tuple(choices)]]  # noqa: UP045 (a runtime type)
        kw["metavar"] = "<str>"
    flag = "--" + f.name.replace("_", "-")
    if f.metadata["flag"]:
        flag = f.metadata["flag"]
    elif hint in (bool, bool | None):
        flag = f"{flag}/--no-{flag[2:]}"
    return _option(f.name, hint, default, flag, _help(f), f.metadata["panel"], **kw)


def _parameters() -> list[inspect.Parameter]:
    """The command's signature: the context, one option per field, --config after --preset, and
    --dry-run (the two options that are not settings of the run)."""
    ctx = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    config = _option(
        "config",
        Path | None,
        None,
        "--config",
        "TOML/YAML/JSON file of options; flags override it. \\[default: none]",
        DATA,
    )
    dry_run = _option("dry_run", bool, False, "--dry-run",
                      "Print the resolved config and exit. \\[default: off]", None)  # fmt: skip
    params = [ctx]
    for f in FIELDS:
        params.append(_parameter(f))
        if f.name == "preset":
            params.append(config)
    return [*params, dry_run]


def given_options(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig options this command line states (click's parameter source), so that an
    omitted flag never overrides the preset, the --config file or a resumed run's config."""
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    names = {f.name for f in FIELDS}
    return {k: v for k, v in values.items() if k in names and ctx.get_parameter_source(k) in typed}


def train_cmd(ctx: typer.Context, *, config: Path | None, dry_run: bool, **options: Any) -> None:
    """Train a GAN on a shard folder. Steps are G updates; progress is counted in images.

    Examples:

      facegan train --data shards/demo32 --preset demo --out runs/demo

      accelerate launch --config_file launch/cpu-2proc.yaml facegan_dist train
      --data shards/demo32 --preset demo

      facegan train --out runs/demo --resume auto --max-steps 2000
    """
    from facegan_dist.config import dumps
    from facegan_dist.train.loop import (
        check_run_folder,
        read_data_manifest,
        resolve_config,
        train,
    )

    flags = given_options(ctx, options)
    with errors_to_exit():
        cfg, ckpt = resolve_config(flags.get("preset"), config, flags)
        if dry_run:
            read_data_manifest(cfg)  # a dry run still checks that the data is there
            check_run_folder(cfg, ckpt)  # and whether --out would be refused
            print(dumps(cfg))
            if ckpt is not None:
                print(f"# would resume from {ckpt}", file=sys.stderr)
            from facegan_dist.train.checkpoint import aside_name, run_entries

            if cfg.restart and run_entries(cfg.run_dir):
                print(f"# would move the run in {cfg.run_dir} to {aside_name(cfg.run_dir)}",
                      file=sys.stderr)  # fmt: skip
            return
        result = train(cfg, resume_from=ckpt)
    if result.checkpoint is None:
        return
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        state = "preempted" if result.preempted else "done"
        typer.echo(f"{state}: step {result.step}, {result.images_seen:,} images seen")
        if m:
            typer.echo(
                f"  last log: loss_d {m.get('loss_d', float('nan')):.4f}  "
                f"loss_g {m.get('loss_g', float('nan')):.4f}  "
                f"{m.get('images_per_s', 0):,.0f} images/s"
            )
        typer.echo(f"  run folder: {result.run_dir}")
        typer.echo(f"  checkpoint: {result.checkpoint}")
        if result.last_grid:
            typer.echo(f"  last grid:  {result.last_grid}")
        if result.export_dir:
            typer.echo(f"  generator:  {result.export_dir}")
        if result.wandb_dir:
            typer.echo(f"  W&B run:    {result.wandb_dir}  (upload: wandb sync {result.wandb_dir})")


train_cmd.__signature__ = inspect.Signature(_parameters())  # what typer reads
app.command("train")(train_cmd)
