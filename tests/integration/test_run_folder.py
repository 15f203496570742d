"""The run folder is never lost or mixed (issue 12, items 1, 5, 6, 7): a fresh run refuses a
folder that holds a run, `--restart` moves it aside, `--resume auto` steps over a damaged newest
checkpoint, and what cannot work (another network, a step already passed, a bad --out) is one
line before any work, with nothing in the folder changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from facegan_dist.cli import app
from tests.conftest import reset_accelerate
from tests.helpers.shards import write_tiny_shards

TINY = ["--preset", "demo", "--g-width", "8", "--d-width", "8", "--batch", "16",
        "--num-workers", "0", "--log-every", "1", "--sample-every", "100000",
        "--wandb-mode", "disabled"]  # fmt: skip
CKPT2, CKPT4 = "step-000000002", "step-000000004"


def cli(*args) -> object:
    reset_accelerate()
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> sha256 (what 'nothing was touched' compares)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def steps_of(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), n=32, size=16)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shards) -> Path:
    """A finished 4-step run: checkpoints at steps 2 and 4, an export, metrics rows 1..4."""
    out = tmp_path_factory.mktemp("base") / "run"
    result = cli("train", "--data", shards, "--out", out, *TINY, "--max-steps", 4,
                 "--ckpt-every", 2)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A private copy of the base run, to damage or restart."""
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def test_fresh_run_into_a_run_folder_is_refused_and_touches_nothing(shards, run):
    before = snapshot(run)
    for extra in ([], ["--dry-run"]):
        result = cli("train", "--data", shards, "--out", run, *TINY, "--max-steps", 2, *extra)
        one_error_line(result, str(run), "already holds a run", "checkpoints/", "metrics.jsonl",
                       "--resume auto", "--restart", "new --out")  # fmt: skip
    assert snapshot(run) == before
    # a folder holding only some of a run's files is a run too
    (run / "checkpoints").rename(run.parent / "elsewhere")
    shutil.rmtree(run / "export")
    result = cli("train", "--data", shards, "--out", run, *TINY, "--max-steps", 2)
    one_error_line(result, "already holds a run", "metrics.jsonl", "run.json")
    # --resume auto with no checkpoint does not overwrite a finished run's export either
    shutil.rmtree(run)
    shutil.copytree(run.parent / "elsewhere", run / "export")  # any folder named export/
    result = cli("train", "--data", shards, "--out", run, *TINY, "--max-steps", 2,
                 "--resume", "auto")  # fmt: skip
    one_error_line(result, "export/", "no checkpoint to resume", "--restart")


def test_restart_moves_the_old_run_aside_and_starts_over(shards, run):
    before = snapshot(run)
    dry = cli("train", "--data", shards, "--out", run, *TINY, "--restart", "--dry-run")
    assert dry.exit_code == 0 and f"would move the run in {run} to {run}.old-" in dry.stderr
    assert snapshot(run) == before and not list(run.parent.glob("run.old-*"))
    result = cli("train", "--data", shards, "--out", run, *TINY, "--max-steps", 2,
                 "--ckpt-every", 2, "--restart")  # fmt: skip
    assert result.exit_code == 0, result.output
    [old] = sorted(run.parent.glob("run.old-*"))
    assert snapshot(old) == before  # every file of the old run, unchanged, in one place
    assert f"moved the previous run in {run} to {old}" in result.stderr
    assert steps_of(run) == [1, 2]  # only the new run's rows
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [CKPT2]
    state = json.loads((run / "checkpoints" / CKPT2 / "trainer_state.json").read_text())
    assert state["config"]["max_steps"] == 2 and state["config"]["restart"] is True
    # a resume of the restarted run does not inherit --restart (it would refuse --resume)
    result = cli("train", "--out", run, "--resume", "auto", "--max-steps", 3)
    assert result.exit_code == 0, result.output
    assert steps_of(run) == [1, 2, 3]
    # --restart with --resume is a contradiction: one line, nothing moved
    result = cli("train", "--out", run, "--resume", "auto", "--restart")
    one_error_line(result, "--restart", "--resume")
    assert sorted(run.parent.glob("run.old-*")) == [old]


@pytest.mark.parametrize("kind", ["file", "under-file", "proc"])
def test_out_that_cannot_be_a_folder_is_one_line(shards, tmp_path, kind):
    (tmp_path / "f").write_text("x")
    out, why = {"file": (tmp_path / "f", "is a file, not a folder"),
                "under-file": (tmp_path / "f" / "run", f"{tmp_path / 'f'} is a file"),
                "proc": (Path("/proc/facegan-run"), "cannot create the folder")}[kind]  # fmt: skip
    result = cli("train", "--data", shards, "--out", out, *TINY, "--max-steps", 1)
    one_error_line(result, f"--out {out}", why)
    assert (tmp_path / "f").read_text() == "x"


def damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    else:  # truncated
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, how", [("optimizer.bin", "empty"),
                                       ("model.safetensors", "truncated")])  # fmt: skip
def test_resume_auto_falls_back_over_a_damaged_newest_checkpoint(run, name, how):
    bad = run / "checkpoints" / CKPT4
    damage(bad / name, how)
    damaged_files = snapshot(bad)
    result = cli("train", "--out", run, "--resume", "auto", "--max-steps", 5)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert str(bad) in warnings[0] and name in warnings[0] and CKPT2 in warnings[0], warnings
    assert f"resumed from {run / 'checkpoints' / CKPT2}" in result.stderr
    # the damaged checkpoint stays on disk, byte for byte, out of --resume's way
    kept = run / "checkpoints" / f"{CKPT4}.damaged"
    assert snapshot(kept) == damaged_files
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [CKPT2, CKPT4, f"{CKPT4}.damaged", "step-000000005"]  # a new, real step 4
    assert steps_of(run) == [1, 2, 3, 4, 5]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(run):
    """A later checkpoint of the old timeline would be taken for the new run's own at its step
    (and picked by a later --resume auto): it is renamed, not reused or deleted."""
    newer = snapshot(run / "checkpoints" / CKPT4)
    result = cli("train", "--out", run, "--resume", run / "checkpoints" / CKPT2,
                 "--max-steps", 4, "--lr-g", "1e-4")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{run / 'checkpoints' / CKPT4} is later than the resumed checkpoint" in result.stderr
    assert snapshot(run / "checkpoints" / f"{CKPT4}.superseded") == newer
    state = json.loads((run / "checkpoints" / CKPT4 / "trainer_state.json").read_text())
    assert state["config"]["lr_g"] == 1e-4  # the new run's step 4, not the old one


def test_damaged_checkpoints_without_a_fallback_are_one_line(run):
    # a core caller that skips resolve_config's check: loading names the file (was: "EOFError")
    from facegan_dist.errors import CheckpointError
    from facegan_dist.train.loop import resolve_config, train

    cfg, ckpt = resolve_config(None, None, {"out": run, "resume": "auto", "max_steps": 5})
    (run / "checkpoints" / CKPT4 / "optimizer.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{ckpt / 'optimizer.bin'}: empty file"):
        train(cfg, resume_from=ckpt)
    # an explicit --resume of a damaged checkpoint names the file too, before any work
    before = snapshot(run)
    result = cli("train", "--out", run, "--resume", run / "checkpoints" / CKPT4,
                 "--max-steps", 5)  # fmt: skip
    one_error_line(result, "damaged checkpoint", str(run / "checkpoints" / CKPT4 / "optimizer.bin"),
                   "empty file")  # fmt: skip
    assert snapshot(run) == before
    # auto with every checkpoint damaged: no silent fresh start
    damage(run / "checkpoints" / CKPT2 / "model_1.safetensors", "truncated")
    before = snapshot(run)
    result = cli("train", "--out", run, "--resume", "auto", "--max-steps", 5)
    one_error_line(result, "--resume auto", "no intact checkpoint", CKPT4, "--restart")
    assert snapshot(run) == before


def test_resume_that_cannot_continue_is_one_line_before_any_work(run, tmp_path):
    before = snapshot(run)
    ckpt = str(run / "checkpoints" / CKPT4)
    cases = [
        (["--arch", "mlp"], ["--arch: checkpoint dcgan, now mlp"]),
        (["--g-width", "16", "--upsample", "nearest"],
         ["--g-width: checkpoint 8, now 16", "--upsample: checkpoint convtranspose, now nearest"]),
        (["--loss", "wgan-gp"], ["--d-norm: checkpoint batch, now none"]),
        (["--data", write_tiny_shards(tmp_path / "s32", n=32, size=32)],
         ["image size: checkpoint 16 px, now 32 px"]),
        (["--max-steps", "3"], ["--max-steps 3", "below step 4"]),
        (["--epochs", "1", "--batch", "16"], ["--epochs 1 (2 steps)", "below step 4"]),
    ]  # fmt: skip
    for extra, needles in cases:
        result = cli("train", "--out", run, "--resume", "auto", *extra)
        one_error_line(result, ckpt, *needles)
    assert snapshot(run) == before


def test_batch_larger_than_the_split_warns_with_both_numbers(shards, tmp_path):
    result = cli("train", "--data", shards, "--out", tmp_path / "r", *TINY, "--batch", 48,
                 "--max-steps", 1)  # fmt: skip
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "--batch 48" in warning and "32 images" in warning and "repeats" in warning


def test_unsupported_shard_size_names_data_not_a_missing_flag(tmp_path):
    big = write_tiny_shards(tmp_path / "s256", n=2, size=256, n_attrs=2)
    result = cli("train", "--data", big, "--out", tmp_path / "r", *TINY, "--max-steps", 1)
    line = one_error_line(result, f"--data {big}", "256 px", "facegan shard")
    assert "--resolution" not in line
    assert not (tmp_path / "r").exists()


def test_missing_inception_weights_name_the_train_flags(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    result = cli("train", "--data", shards, "--out", tmp_path / "r", *TINY, "--max-steps", 1,
                 "--eval-every", 1, "--eval-features", "inception")  # fmt: skip
    line = one_error_line(result, "--inception-weights", "--eval-features attributes")
    assert " --features" not in line
    assert not (tmp_path / "r").exists()
