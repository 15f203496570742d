"""`--help` of every command but `train` (tests/cli/test_train_help.py) agrees with the code: each
choice-valued option lists exactly the choices of the tuple the code validates against, every
option shows its real default, the core configs have the same defaults as the flags, and nothing
is cut ("…") at 80 columns (issue 12, item 8)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from facegan_dist import bench, config, directions, latent, metrics, sampling
from facegan_dist.cli import app
from facegan_dist.data import celeba, preview

runner = CliRunner()

# (command, option) -> the tuple the code checks the value against
CHOICES: dict[tuple[str, str], tuple] = {
    ("sample", "--truncation-mode"): latent.TRUNCATION_MODES,
    ("sample", "--interp"): latent.INTERP_MODES,
    ("evaluate", "--split"): config.SPLITS,
    ("evaluate", "--features"): metrics.FEATURES,
    ("evaluate", "--truncation-mode"): latent.TRUNCATION_MODES,
    ("directions", "--method"): directions.METHODS,
    ("preview", "--split"): config.SPLITS,
    ("synth", "--layout"): config.SYNTH_LAYOUTS,
    ("bench data", "--format"): config.SHARD_FORMATS,
    ("bench data", "--size"): config.SHARD_SIZES,
    ("bench train", "--preset"): bench.bench_presets(),
    ("bench train", "--precision"): config.PRECISIONS,
    ("bench train", "--data-cache"): config.DATA_CACHES,
    ("shard", "--size"): config.SHARD_SIZES,
    ("shard", "--crop"): config.SHARD_CROPS,
    ("shard", "--format"): config.SHARD_FORMATS,
    ("shard", "--split"): config.SPLITS,
    ("shard", "--labels"): celeba.LABEL_MODES,
}
# the frozen config (or core function) each command builds, whose defaults the flags must share
CORE = {
    "sample": sampling.SampleConfig,
    "evaluate": metrics.EvaluateConfig,
    "directions": directions.DirectionsConfig,
    "preview": preview.contact_sheet,
    "synth": config.SynthConfig,
    "bench data": bench.bench_data,
    "bench train": bench.bench_train,
}


def commands() -> dict[str, object]:
    """'name' / 'group name' -> click command, for every command but train."""
    found = {}

    def walk(group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, f"{prefix}{name} ")
            elif f"{prefix}{name}" != "train":
                found[f"{prefix}{name}"] = cmd

    walk(typer.main.get_command(app), "")
    return found


COMMANDS = commands()


def render(command: str, columns: int) -> str:
    r = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": str(columns)})
    assert r.exit_code == 0, r.output
    return r.stdout


def option_blocks(text: str) -> dict[str, str]:
    """'--opt' -> its row of the rendered table (names, type, help, default) as one line."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith(("╭", "╰")) or not line.startswith("│"):
            current = None
            continue
        body = line.strip("│").rstrip()
        m = re.match(r"^\s{0,5}(?:\*\s+)?(--[a-z][\w-]*)", body)
        if m:
            current = m.group(1)
            blocks[current] = []
        if current is not None:
            blocks[current].append(body.strip())
    return {k: " ".join(v) for k, v in blocks.items()}


def listed_choices(block: str) -> list[list[str]]:
    """Every 'a | b | c' list in an option's help (parenthesised remarks dropped first)."""
    text = re.sub(r"\[default: [^\]]*\]", "", block)
    while True:
        shorter = re.sub(r"\([^()]*\)", "", text)
        if shorter == text:
            break
        text = shorter
    found = re.findall(r"[\w*-]+(?:\s*\|\s*[\w*-]+)+", text)
    return [[c.strip() for c in f.split("|")] for f in found]


def shown_default(param) -> str | None:
    """What `[default: ...]` should say for a click option (None: no default is shown)."""
    d = param.default
    if d is None or param.show_default is False or callable(d):
        return None
    if isinstance(d, bool):
        if not param.secondary_opts:
            return None if d is False else "True"
        return (param.opts[0] if d else param.secondary_opts[0]).lstrip("-")
    return str(d)


@pytest.fixture(scope="module")
def wide() -> dict[str, str]:
    return {name: render(name, 200) for name in COMMANDS}


def test_every_command_but_train_is_covered():
    assert set(COMMANDS) == {"sample", "evaluate", "directions", "preview", "synth", "shard",
                             "verify", "bench data", "bench train"}  # fmt: skip


@pytest.mark.parametrize("command", list(COMMANDS))
def test_choice_options_list_exactly_the_codes_choices(command, wide):
    blocks = option_blocks(wide[command])
    with_lists = {opt for opt, block in blocks.items() if listed_choices(block)}
    expected = {opt for (cmd, opt) in CHOICES if cmd == command}
    assert with_lists == expected, "an option lists choices that this test does not check"
    for opt in expected:
        lists = listed_choices(blocks[opt])
        assert len(lists) == 1, (opt, lists)
        got, want = lists[0], [str(c) for c in CHOICES[command, opt]]
        assert sorted(got) == sorted(want) and len(set(got)) == len(got), (command, opt, got)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_shows_its_real_default(command, wide):
    blocks = option_blocks(wide[command])
    for param in COMMANDS[command].params:
        opt = next((o for o in param.opts if o.startswith("--")), None)
        if opt is None or opt == "--help":
            continue
        default = shown_default(param)
        block = blocks[opt]
        if default is None:
            continue
        assert f"[default: {default}]" in block, (command, opt, block)
        if (command, opt) in CHOICES:  # the default is one of the choices
            assert default in [str(c) for c in CHOICES[command, opt]], (command, opt)


@pytest.mark.parametrize("command", list(CORE))
def test_flag_defaults_equal_the_core_defaults(command):
    core = CORE[command]
    if dataclasses.is_dataclass(core):
        fields = dataclasses.fields(core)
        core_defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    else:
        sig = inspect.signature(core).parameters.items()
        core_defaults = {k: p.default for k, p in sig if p.default is not inspect.Parameter.empty}
    checked = 0
    for param in COMMANDS[command].params:
        if param.name in core_defaults and param.default is not None:
            core_default = core_defaults[param.name]
            if isinstance(core_default, Path | str) and isinstance(param.default, Path | str):
                core_default, flag_default = str(core_default), str(param.default)
            else:
                flag_default = param.default
            assert flag_default == core_default, (command, param.name, flag_default, core_default)
            checked += 1
    assert checked >= 2, (command, "names of the flags and the core fields drifted apart?")


def test_evaluate_features_default_is_trains_and_the_help_says_so(wide):
    assert metrics.EvaluateConfig.features == config.TrainConfig.eval_features == "attributes"
    block = option_blocks(wide["evaluate"])["--features"]
    assert "[default: attributes]" in block and "train's --eval-features" in block


def test_choice_mirrors_equal_their_sources():
    """cli/app.py restates a few tuples so that `--help` does not import torch."""
    app_module = importlib.import_module("facegan_dist.cli.app")  # `cli.app` is the Typer
    assert app_module.TRUNCATION_MODES == latent.TRUNCATION_MODES
    assert app_module.INTERP_MODES == latent.INTERP_MODES
    assert app_module.DIRECTION_METHODS == directions.METHODS
    assert set(config.EVAL_FEATURES) == set(metrics.FEATURES)
    from facegan_dist.cli.bench import BENCH_PRESETS

    assert BENCH_PRESETS == bench.bench_presets() and "cgan" not in BENCH_PRESETS


@pytest.mark.parametrize("command", list(COMMANDS))
def test_nothing_is_cut_at_80_columns(command):
    text = render(command, 80)
    assert "…" not in text, [line for line in text.splitlines() if "…" in line]


def test_docstring_paragraphs_are_reflowed_not_broken_at_source_lines():
    """typer keeps a docstring's single line breaks after the first paragraph: without the reflow
    a short stray line ('statistics') ends every source line."""
    lines = [line.strip() for line in render("evaluate", 80).splitlines()]
    text = "\n".join(lines)
    assert "Real statistics are cached" in " ".join(lines)
    assert "\nstatistics\n" not in text and "\nmanifest.json\n" not in text
