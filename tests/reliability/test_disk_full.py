"""Item 8: the disk fills up while a checkpoint is written. The previous checkpoint stays intact
and loadable, the temp folder is removed, and the run stops with ONE line naming the checkpoint
folder and "no space left" (exit 1). With 2 processes, a failure on one rank makes EVERY rank
stop at the same point (no rank waits in a barrier the other one skipped).

ENOSPC is simulated (no small filesystem can be mounted here) where each kind of file is written:
accelerate's `torch.save` (optimizer / RNG states: torch reports a full disk as a RuntimeError
without errno, so the free space decides), our safetensors tensor files, and the final rename.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from facegan_dist.cli import app
from tests.conftest import reset_accelerate
from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import (
    REPO,
    TINY,
    complete_checkpoints,
    env,
    error_lines,
    free_port,
    launch_cmd,
    state,
)

pytestmark = pytest.mark.slow  # end-to-end runs (in-process, a few seconds each)
FAILING = "step-000000004"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), n=32, size=16)


def cli_train(*args: str):
    reset_accelerate()
    return CliRunner().invoke(app, ["train", *args])


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fail_tensor_files(monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **kw):
        if FAILING in str(filename):
            Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the error
            raise _enospc(filename)
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _fail_torch_save(monkeypatch):
    real = torch.save

    def save(obj, f, *a, **kw):
        if FAILING in str(f):
            Path(f).write_bytes(b"PK\0")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                "file data/0: file write failed"
            )
        return real(obj, f, *a, **kw)

    real_usage = shutil.disk_usage

    def disk_usage(path):  # what the disk looks like once torch.save has filled it
        return real_usage(path)._replace(free=4096)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def _fail_rename(monkeypatch):
    real = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).name == FAILING:
            raise _enospc(dst)
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fail", [_fail_torch_save, _fail_tensor_files, _fail_rename])
def test_disk_full_keeps_previous_checkpoint(tmp_path, shards, monkeypatch, fail):
    out = tmp_path / "run"
    args = ["--data", str(shards), "--out", str(out), *TINY, "--num-workers", "0",
            "--ckpt-every", "2", "--max-steps", "6", "--wandb-mode", "disabled"]  # fmt: skip
    with monkeypatch.context() as m:
        fail(m)
        result = cli_train(*args)
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.stderr)
    assert str(out / "checkpoints" / FAILING) in line and "no space left" in line, line
    assert "Traceback" not in result.stderr
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000000002"]  # no temp, no step 4
    assert state(ckpts / "step-000000002")["step"] == 2

    # the previous checkpoint is loadable: the run resumes from it and finishes
    result = cli_train("--out", str(out), "--resume", "auto", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.stderr and str(ckpts / "step-000000002") in result.stderr
    assert [state(c)["step"] for c in complete_checkpoints(out)] == [2, 4, 6]


ENTRY = """
import errno, os, sys, torch
sys.path.insert(0, os.getcwd())
real = torch.save
def save(obj, f, *a, **kw):  # rank 1 only: its RNG file at step 4
    if os.environ["RANK"] == "1" and "{failing}" in str(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return real(obj, f, *a, **kw)
torch.save = save
from facegan_dist.cli import main
sys.argv[0] = "facegan"
main()
"""


@pytest.mark.distributed
def test_disk_full_on_one_rank_stops_every_rank(tmp_path, shards):
    """Rank 1 alone fails; both ranks agree, stop at the same checkpoint and each says so in one
    line (rank 0 unprefixed, rank 1 as `[rank 1]`), naming the rank where the write failed."""
    out = tmp_path / "run"
    entry = tmp_path / "enospc_entry.py"
    entry.write_text(ENTRY.format(failing=FAILING))
    # --monitor_interval: torchrun's agent polls its workers every 0.1 s and SIGTERMs the others as
    # soon as one has exited, which can cut a rank short before it prints; here it waits 3 s, so
    # a rank that does not report (or does not stop) fails the test instead of a race hiding it
    launcher_args = ["--main_process_port", str(free_port()), "--monitor_interval", "3"]
    cmd = launch_cmd("--data", str(shards), "--out", str(out), *TINY, "--ckpt-every", "2",
                     "--max-steps", "6", "--wandb-mode", "disabled",
                     launcher_args=launcher_args, wrapper=True)  # fmt: skip
    cmd[cmd.index("facegan_dist")] = str(entry)
    # a rank left waiting in a barrier would hang for the process-group timeout (30 min)
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 2, proc.stderr[-3000:]
    assert sum(line.startswith("error: [rank 1] ") for line in lines) == 1, lines
    for line in lines:
        assert str(out / "checkpoints" / FAILING) in line and "(rank 1)" in line, line
        assert "no space left" in line
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000000002"]
    assert state(ckpts / "step-000000002")["step"] == 2
