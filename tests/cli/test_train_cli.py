"""`facegan train` at the CLI boundary: entry points, one-line errors, dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from facegan_dist.cli import app
from facegan_dist.errors import ConfigError
from tests.helpers.shards import write_tiny_shards

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("s"), n=32, size=16)


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real entry point: `python facegan_dist ...` from the repo root (what accelerate runs)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "facegan_dist", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_entry_points_list_every_command():
    for cmd in ([sys.executable, "facegan_dist", "--help"],
                [sys.executable, "-m", "facegan_dist", "--help"]):  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for name in ("synth", "shard", "verify", "train"):
            assert name in out.stdout


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train", "--batch", "abc"], ["--batch"]),
        (["train", "--bogus"], ["--bogus"]),
        # a value outside an option's declared choices is refused by typer itself
        (["train", "--arch", "vit"], ["--arch", "vit", "mlp"]),
        (["train", "--loss", "l2"], ["--loss", "l2", "wgan-gp"]),
        (["train", "--precision", "fp8"], ["--precision", "fp8", "bf16"]),
        (["train", "--preset", "nope"], ["--preset", "nope", "quality"]),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, needles):
    proc = cli(*args)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, *needles)


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--batch", "0"], ["--batch 0"]),
        (["--betas-g", "0.5,1.5"], ["--betas-g"]),
        (["--d-every", "5", "--d-steps", "2"], ["--d-steps"]),
        (["--precision", "fp16"], ["--precision fp16"]),  # no CUDA here
        (["--batch", "7", "--resume", "runs/definitely-missing-ckpt"], ["--resume"]),
    ],
)
def test_bad_values_are_one_line_exit_1(shards, tmp_path, extra, needles):
    res = runner.invoke(app, ["train", "--data", str(shards), "--out", str(tmp_path / "r"),
                              "--wandb-mode", "disabled", *extra])  # fmt: skip
    assert res.exit_code == 1, res.output
    assert_one_line_error(res.stderr, *needles)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_missing_and_empty_shard_folders(tmp_path):
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "nope")])
    assert res.exit_code == 1
    assert_one_line_error(res.stderr, "--data", "nope", "no such folder")
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "empty")])
    assert res.exit_code == 1
    assert_one_line_error(res.stderr, "empty", "manifest.json")
    res = runner.invoke(app, ["train"])
    assert res.exit_code == 1
    assert_one_line_error(res.stderr, "--data", "required")


def test_config_file_errors(shards, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("batch = [\n")
    res = runner.invoke(app, ["train", "--data", str(shards), "--config", str(bad)])
    assert res.exit_code == 1
    assert_one_line_error(res.stderr, "--config", "bad.toml")
    unknown = tmp_path / "u.yaml"
    unknown.write_text("learning_rate: 0.1\n")
    res = runner.invoke(app, ["train", "--data", str(shards), "--config", str(unknown)])
    assert res.exit_code == 1
    assert_one_line_error(res.stderr, "learning_rate")


def test_dry_run_prints_resolved_config_and_writes_nothing(shards, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "paper-mlp-leaky", "batch": 32}))
    res = runner.invoke(app, ["train", "--data", str(shards), "--out", str(tmp_path / "r"),
                              "--config", str(cfg), "--lr-d", "0.001", "--dry-run"])  # fmt: skip
    assert res.exit_code == 0, res.output
    resolved = json.loads(res.stdout)
    assert resolved["arch"] == "mlp" and resolved["act"] == "leaky"  # preset (from the file)
    assert resolved["epochs"] == 50 and resolved["loss"] == "minimax"
    assert resolved["batch"] == 32  # file
    assert resolved["lr_d"] == 0.001 and resolved["lr_g"] == 1e-4  # flag beats preset
    assert not (tmp_path / "r").exists()


def test_cuda_graphs_refusals_are_one_line_and_write_nothing(shards, tmp_path):
    """--cuda-graphs: what it cannot capture is refused before any file is written (on this CPU
    machine the device check is the last line of defence)."""
    out = tmp_path / "run"
    cases = [
        (["--preset", "wgan-gp"], "one D step per G step"),
        (["--augment", "color"], "no --augment"),
        (["--compile"], "alternatives"),
        (["--exact"], "--exact"),
        ([], "one process on one CUDA device (here: 1 x cpu)"),
    ]
    for extra, needle in cases:
        res = runner.invoke(app, ["train", "--data", str(shards), "--out", str(out),
                                  "--cuda-graphs", "--max-steps", "2", *extra])  # fmt: skip
        assert res.exit_code == 1, res.output
        assert_one_line_error(res.stderr, "--cuda-graphs", needle)
        assert not out.exists()


def test_help_shows_the_defaults_of_auto_flags():
    """Flags whose default depends on the preset or the device state it in their help; rich
    markup would swallow a bare `[default: ...]` as a style tag, so it must survive rendering."""
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for text in ("[default: 0.3]", "[default: on for CUDA and CPU]", "[default: quality]",
                 "[default: 2000]"):  # fmt: skip
        assert text in res.stdout, text
    bench = runner.invoke(app, ["bench", "train", "--help"], env={"COLUMNS": "200"})
    assert "[default: CUDA and CPU]" in bench.stdout


def test_eval_features_inception_without_the_weights_file_fails_before_any_work(shards, tmp_path):
    missing = tmp_path / "nope.pth"
    r = cli("train", "--data", str(shards), "--out", str(tmp_path / "r"), "--max-steps", "2",
            "--eval-every", "1", "--eval-features", "inception",
            "--inception-weights", str(missing))  # fmt: skip
    assert r.returncode == 1
    assert_one_line_error(r.stderr, str(missing), "--inception-weights")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_typed_flag_wins_even_at_its_default_and_an_omitted_one_never_does(shards, tmp_path):
    """A flag counts as given by click's parameter source, not by a None default: `--upsample
    convtranspose` (the field's default) beats the quality preset's nearest, `--no-hflip` beats
    the file's hflip, and flags left out keep the file's and the preset's values."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('hflip = true\nbetas_g = "0.5,0.9"\nseed = 7\n')
    res = runner.invoke(app, ["train", "--data", str(shards), "--out", str(tmp_path / "r"),
                              "--config", str(cfg), "--upsample", "convtranspose", "--no-hflip",
                              "--betas-d", "0.1,0.2", "--dry-run"])  # fmt: skip
    assert res.exit_code == 0, res.output
    resolved = json.loads(res.stdout)
    assert resolved["upsample"] == "convtranspose" and resolved["hflip"] is False  # typed
    assert resolved["betas_g"] == [0.5, 0.9] and resolved["seed"] == 7  # the file's
    assert resolved["betas_d"] == [0.1, 0.2]  # a typed tuple, coerced like the file's
    assert resolved["ema_kimg"] == 2.0 and resolved["preset"] == "quality"  # the preset's


def test_train_help_imports_no_torch():
    """The options are declared torch-free (config.py), so `facegan train --help` stays fast."""
    code = ("import sys; from typer.testing import CliRunner; from facegan_dist.cli import app; "
            "r = CliRunner().invoke(app, ['train', '--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_every_declared_choice_is_checked_naming_its_flag():
    """validate() checks each choice-valued field against its declaration (config.option)."""
    import dataclasses

    from facegan_dist.config import TrainConfig, merge_train_config

    fields = [f for f in dataclasses.fields(TrainConfig) if f.metadata["choices"]]
    assert len(fields) >= 14
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        try:
            merge_train_config(None, None, {"data": "x", f.name: "bogus"}).validate()
        except ConfigError as exc:
            assert str(exc).startswith(f"{flag} 'bogus'"), (flag, str(exc))
        else:
            raise AssertionError(f"{flag} bogus was accepted")
