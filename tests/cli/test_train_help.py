"""`facegan train --help` against the code (issue 12, item 8): every choice-valued option lists
exactly the choices the implementation accepts, every option states its default, and those that
a preset sets say so, with the value of each preset. Read from the rendered help, so neither the
help text nor the code can change alone. The README's option table is read against the same help
(issue 13, item 4): it names every option, and the defaults it states are the help's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from facegan_dist import config
from facegan_dist.cli import app
from facegan_dist.config import DEFAULT_PRESET, PRESETS, TrainConfig


def implementation_choices() -> dict[str, tuple[str, ...]]:
    """Flag -> the tuple of the module that implements it (what validation accepts)."""
    from facegan_dist import losses, metrics, models
    from facegan_dist.models import dcgan, mlp

    return {
        "--split": config.SPLITS,
        "--preset": tuple(PRESETS),
        "--arch": models.ARCHS,
        "--act": mlp.ACTS,
        "--upsample": dcgan.UPSAMPLES,
        "--d-norm": (*dcgan.D_NORMS, "auto"),
        "--spectral-norm": models.SPECTRAL_NORMS,
        "--loss": tuple(losses.LOSSES),
        "--augment": config.AUGMENT_CHOICES,  # augment.py takes config.parse_policy's tuple
        "--precision": config.PRECISIONS,
        "--data-cache": config.DATA_CACHES,
        "--eval-features": metrics.FEATURES,
        "--on-nonfinite": config.ON_NONFINITE,
        "--wandb-mode": config.WANDB_MODES,
    }


ROW = re.compile(r"^(--[\w-]+)(?:\s+--no-[\w-]+)?(?:\s+-\w)?\s+<\w+>\s+(.*)$")
CHOICE_RUN = re.compile(r"[\w*-]+(?: \| [\w*-]+)+")


@pytest.fixture(scope="module")
def options() -> dict[str, str]:
    """Option -> its whole help text, rows of the rich panels joined (wrapped at spaces)."""
    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    found: dict[str, str] = {}
    current = None
    for line in res.stdout.splitlines():
        if not line.startswith("│"):
            current = None
            continue
        body = line.strip("│ ").strip()
        if m := ROW.match(body):
            current = m.group(1)
            found[current] = m.group(2).strip()
        elif current is not None and body:
            found[current] += " " + body
    assert "--upsample" in found and "--wandb-mode" in found, res.stdout
    return {k: " ".join(v.split()) for k, v in found.items()}


def test_torch_free_choice_lists_equal_the_implementations():
    """The torch modules take their lists from config.py (declared with the options, torch-free
    so that `facegan --help` needs no torch), metrics.FEATURES included."""
    impl = implementation_choices()
    for flag, mine in (("--arch", config.ARCH_CHOICES), ("--act", config.ACT_CHOICES),
                       ("--upsample", config.UPSAMPLE_CHOICES),
                       ("--d-norm", config.D_NORM_CHOICES),
                       ("--spectral-norm", config.SPECTRAL_NORM_CHOICES),
                       ("--loss", config.LOSS_CHOICES), ("--augment", config.AUGMENT_CHOICES),
                       ("--eval-features", config.EVAL_FEATURES)):  # fmt: skip
        assert sorted(mine) == sorted(impl[flag]), flag


@pytest.mark.parametrize("flag", sorted(implementation_choices()))
def test_each_choice_option_lists_exactly_the_codes_choices(options, flag):
    want = implementation_choices()[flag]
    runs = [r.split(" | ") for r in CHOICE_RUN.findall(options[flag])]
    assert runs, (flag, options[flag])
    listed = runs[0]  # the first `a | b | c` run of the text is the list of choices
    assert len(listed) == len(set(listed)) and set(listed) == set(want), (flag, listed, want)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return ",".join(_fmt(x) for x in v)
    return str(v) or "none"


FIELDS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
PRESET_FIELDS = sorted({k for p in PRESETS.values() for k in p})
NO_DEFAULT = {"--help", "--data"}  # --data is required (or comes from the checkpoint)


def _bracket(text: str) -> str:
    m = re.search(r"\[default: (.*?)\](?!.*\[default:)", text)
    assert m, text
    return m.group(1)


def test_every_option_states_its_default(options):
    for flag, text in options.items():
        if flag not in NO_DEFAULT:
            assert "[default: " in text, (flag, text)
    # a fixed default is the dataclass value
    for name, value in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if name in PRESET_FIELDS or value is None or flag not in options:
            continue
        assert _bracket(options[flag]).startswith(_fmt(value)), (flag, options[flag])


@pytest.mark.parametrize("name", PRESET_FIELDS)
def test_options_a_preset_sets_say_each_presets_default(options, name):
    flag = "--" + name.replace("_", "-")
    default = _bracket(options[flag])
    if name == "d_steps":  # its default follows --loss (merge_train_config)
        assert default == "1; 5 with --loss wgan or wgan-gp", default
        assert all(PRESETS[p].get("d_steps", 1) in (1, 5) for p in PRESETS)
        return
    values = {p: PRESETS[p].get(name, FIELDS[name]) for p in PRESETS}
    base = values[DEFAULT_PRESET]
    if base is not None:
        assert default.startswith(_fmt(base)), (flag, default)
    for p, v in values.items():
        if v == base:
            continue
        named = p in default or "other presets" in default
        named |= p.startswith("paper-") and "paper-*" in default
        assert named, (flag, p, default)
        if v is not None:
            assert _fmt(v) in default, (flag, p, v, default)


def test_restart_and_resume_are_documented(options):
    assert "OUT.old-DATE-TIME" in options["--restart"]
    assert "nothing is deleted" in options["--restart"]
    assert "--resume auto" in options["--out"] and "--restart" in options["--out"]
    assert "damaged" in options["--resume"]


def test_nothing_is_cut_at_80_columns():
    """rich cuts a word longer than its column with "…": the help must read whole at 80."""
    text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).output
    assert "--eval-every" in text and "…" not in text, [ln for ln in text.splitlines() if "…" in ln]


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_train_rows() -> list[tuple[str, str, str]]:
    """(flags, default, meaning) cells of the README's train option table."""
    text = README.read_text()
    table = text[text.index("| flag | default | meaning |") :].split("\n\n")[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        assert len(cells) == 3, line
        rows.append((cells[0], cells[1], cells[2]))
    return rows


def test_readme_table_names_every_option(options):
    rows = readme_train_rows()
    named = {f for row in rows for cell in row for f in re.findall(r"--[\w-]+", cell)}
    missing = set(options) - {"--help"} - named
    assert not missing, f"README's train table does not name {sorted(missing)}"
    listed = {f for row in rows for f in re.findall(r"--[\w-]+", row[0])}
    assert listed <= set(options), sorted(listed - set(options))


def _first_word(text: str) -> str:
    return re.split(r"[\s;(]", text.replace("`", "").strip())[0].rstrip(",")


def _same(readme: str, helps: str, name: str) -> bool:
    if readme == helps or (readme == "auto" and FIELDS[name] is None):  # a device-dependent None
        return True
    try:
        return float(readme) == float(helps)
    except ValueError:
        return False


def test_readme_defaults_are_the_helps(options):
    """Where a row gives one default per flag (`a, b` or `a / b`), each is the help's (first
    word: a preset-dependent default names the default preset's value first)."""
    checked = 0
    for flags_cell, default_cell, _ in readme_train_rows():
        flags = re.findall(r"--[\w-]+", flags_cell)
        sep = " / " if " / " in flags_cell else ", "
        parts = default_cell.split(sep) if default_cell else []
        if len(parts) != len(flags):
            continue  # a row that describes its defaults in words
        for flag, part in zip(flags, parts, strict=True):
            if flag in NO_DEFAULT or "[default: " not in options[flag]:
                continue
            readme, helps = _first_word(part), _first_word(_bracket(options[flag]))
            name = flag[2:].replace("-", "_")
            assert _same(readme, helps, name), (flag, part, _bracket(options[flag]))
            checked += 1
    assert checked >= 30, checked
