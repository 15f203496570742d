"""A bad output path is one `error:` line naming its flag, before any work, and leaves no temp
file: `sample --out`, `evaluate --out`, `directions --out`, `preview --out`, `bench data
--work-dir` (issue 12, item 3). Each command is given the wrong kind of path (a file where a
folder goes, a folder where a file goes), a path under a file, and a path in /proc."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from facegan_dist.cli import app
from tests.helpers.shards import write_tiny_shards

runner = CliRunner()

# command -> (args before the output flag, the flag, does the flag name a folder?)
COMMANDS = {
    "sample": (["sample", "{run}", "--seeds", "0"], "--out", True),
    "evaluate": (["evaluate", "{run}", "--data", "{shards}", "--n", "8"], "--out", False),
    "directions": (["directions", "{run}", "--data", "{shards}", "--n", "20"], "--out", False),
    "preview": (["preview", "{shards}"], "--out", False),
    "bench data": (
        "bench data --count 10 --size 16 --read-seconds 0.1 --workers 1".split(),
        "--work-dir",
        True,
    ),  # fmt: skip
}
BAD = ("wrong-kind", "under-a-file", "proc")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from tests.integration.test_sample_eval import tiny_run

    root = tmp_path_factory.mktemp("outputs")
    shards = write_tiny_shards(root / "shards", n=12, size=16, per_shard=12)
    names = json.loads((shards / "manifest.json").read_text())["attribute_names"]
    return {"run": tiny_run(root / "run", names), "shards": shards}


def bad_path(kind: str, tmp: Path, folder: bool) -> Path:
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "a-folder").mkdir()
    if kind == "wrong-kind":
        return tmp / ("a-file" if folder else "a-folder")
    if kind == "under-a-file":
        return tmp / "a-file" / ("sub" if folder else "out.png")
    return Path("/proc/facegan-test/out")  # /proc accepts no new entries, even as root


def temp_files(*roots: Path) -> list[Path]:
    return [p for r in roots if r.is_dir() for p in r.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_output_path_is_one_line_naming_the_flag(command, kind, setup, tmp_path):
    args, flag, folder = COMMANDS[command]
    bad = bad_path(kind, tmp_path, folder)
    argv = [a.format(**setup) for a in args] + [flag, str(bad)]
    r = runner.invoke(app, argv)
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), r.stderr
    assert str(bad) in lines[0] and "Traceback" not in r.output
    # nothing written: no temp file, no stats/classifier from work that should not have started
    assert temp_files(tmp_path, setup["shards"], setup["run"]) == []
    assert not (setup["shards"] / "classifier").exists()
    assert not (setup["shards"] / "stats").exists()
    assert (tmp_path / "a-file").read_text() == "not a folder\n"


def test_a_folder_that_accepts_no_files_is_refused_before_any_work(setup, tmp_path):
    """/proc itself is a folder that looks writable to root: the probe (creating a file) says
    no, so sampling does not start."""
    r = runner.invoke(app, ["sample", str(setup["run"]), "--seeds", "0", "--out", "/proc"])
    assert r.exit_code == 1 and r.stderr.startswith("error: --out /proc: cannot create"), r.output


def test_an_eoferror_is_not_reported_as_aborted(setup, tmp_path, monkeypatch, capsys):
    """Click turns an EOFError escaping a command into Abort; main() printed `error: aborted`,
    which hid a file read that no loader named. It now surfaces as the EOFError it is."""
    import facegan_dist.sampling
    from facegan_dist.cli import main

    def read_empty_file(*a, **k):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(facegan_dist.sampling, "sample", read_empty_file)
    argv = ["facegan", "sample", str(setup["run"]), "--seeds", "0", "--out", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(EOFError, match="Ran out of input"):
        main()
    assert "aborted" not in capsys.readouterr().err


def test_atomic_writes_leave_no_temp_file_when_the_rename_fails(tmp_path):
    """What left a 141 KB `.empty.tmp` behind `preview --out empty/`: the PNG was written to the
    temp name and the rename onto a folder failed."""
    from facegan_dist.images import save_png
    from facegan_dist.paths import atomic_write_text

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "keep").write_text("x")  # a non-empty folder: os.replace fails
    with pytest.raises(OSError):
        save_png(torch.zeros(3, 8, 8, dtype=torch.uint8), tmp_path / "empty")
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "empty", "{}")
    assert temp_files(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_atomic_writes_leave_no_temp_file_when_the_write_fails(tmp_path, monkeypatch):
    from facegan_dist.paths import atomic_path

    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "f.json") as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_directions_out_must_name_the_safetensors_file(setup, tmp_path):
    r = runner.invoke(
        app, ["directions", str(setup["run"]), "--data", str(setup["shards"]), "--n", "20",
              "--out", str(tmp_path / "d.json")],
    )  # fmt: skip
    assert r.exit_code == 1 and r.stderr.startswith("error: --out "), r.output
    assert ".safetensors" in r.stderr and list(tmp_path.iterdir()) == []
