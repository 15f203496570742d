"""The run folder's files: atomic writes (paths.py), the export (artifacts.py) and checkpoint
folders (train/checkpoint.py): a write that fails midway leaves the previous file or folder and
no temp; rotation keeps the newest K; entries outside the `step-NNNNNNNNN` naming are never
listed or rotated away; loading reads nothing that runs code (safetensors, weights_only=True).

Tiny objects only: two nn.Linear "models" under a one-process CPU Accelerator, a 16 px G.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from facegan_dist import artifacts, paths
from facegan_dist.artifacts import ckpt_name, list_checkpoints, newest_checkpoint
from facegan_dist.errors import CheckpointError
from facegan_dist.train import checkpoint

STATE = "trainer_state.json"


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def raising(exc: BaseException):
    """A stand-in for a function that fails with `exc`."""

    def fail(*args, **kwargs):
        raise exc

    return fail


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class _Payload:
    """Unpickled without weights_only, this runs open(marker, "w"): code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---- paths.atomic_path / atomic_write_text ----


def test_atomic_path_that_fails_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with paths.atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("midway")
    assert target.read_text() == "old" and names(tmp_path) == ["metrics.json"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is cleaned up too (BaseException)
        with paths.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and names(tmp_path) == ["metrics.json"]
    with pytest.raises(RuntimeError):  # a first write that fails leaves nothing at all
        with paths.atomic_path(tmp_path / "new.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert names(tmp_path) == ["metrics.json"]


def test_atomic_write_text_whose_rename_or_fsync_fails_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("old")
    with monkeypatch.context() as m:
        m.setattr(os, "replace", raising(enospc(target)))
        with pytest.raises(OSError, match="No space left"):
            paths.atomic_write_text(target, "new")
    assert target.read_text() == "old" and names(tmp_path) == ["run.json"]
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", raising(OSError(errno.EIO, "I/O error")))
        with pytest.raises(OSError, match="I/O error"):
            paths.atomic_write_text(target, "new")
    assert target.read_text() == "old" and names(tmp_path) == ["run.json"]
    paths.atomic_write_text(target, "new")
    assert target.read_text() == "new" and names(tmp_path) == ["run.json"]


# ---- the export ----


@pytest.fixture
def tiny_g():
    from facegan_dist.models import build_models

    torch.manual_seed(0)
    G, _ = build_models("dcgan", resolution=16, z_dim=8, g_width=8, d_width=8)
    meta = artifacts.generator_meta(
        {"arch": "dcgan", "act": "relu", "dropout": 0.0, "z_dim": 8, "g_width": 8,
         "d_width": 8}, 16, ["A"])  # fmt: skip
    return G.eval(), meta


def test_an_export_that_fails_midway_keeps_the_previous_export(tmp_path, tiny_g, monkeypatch):
    import safetensors.torch

    G, meta = tiny_g
    out = tmp_path / "export"
    artifacts.export_generator(G, meta, out)
    before = {n: (out / n).read_bytes() for n in names(out)}
    old = {k: v.clone() for k, v in G.state_dict().items()}
    real = safetensors.torch.save_file

    def half_then_full(tensors, filename, *a, **kw):
        Path(filename).write_bytes(b"\0" * 64)  # a partial file, then the disk is full
        raise enospc(filename)

    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)  # what the failed export would have written
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        artifacts.export_generator(G, meta, out)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert {n: (out / n).read_bytes() for n in names(out)} == before  # no temp, nothing changed
    loaded, _ = artifacts.load_generator(out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, old[k]), k  # the old weights, not the new ones


def test_generator_weights_that_are_a_pickle_are_refused_and_run_nothing(tmp_path, tiny_g):
    G, meta = tiny_g
    out = tmp_path / "export"
    artifacts.export_generator(G, meta, out)
    marker = tmp_path / "marker"
    torch.save({"w": _Payload(marker)}, out / artifacts.WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=rf"^{out / artifacts.WEIGHTS_NAME}: cannot load"):
        artifacts.load_generator(out)
    assert not marker.exists()


# ---- checkpoint folders ----


@pytest.fixture
def acc():
    """A one-process CPU Accelerator with G, D and their Adams prepared (what save_state saves)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    G, D = nn.Linear(2, 3), nn.Linear(3, 1)
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    acc.models = acc.prepare(G, D, opt_g, opt_d)
    return acc


def save(acc, root: Path, step: int, keep: int = 3) -> Path:
    tensors = {"ema": {"w": torch.full((2,), float(step))}}
    return checkpoint.save(acc, root, step, {"step": step}, tensors, keep=keep)


def steps(root: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in list_checkpoints(root)]


def test_rotation_keeps_exactly_the_newest_k(acc, tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        save(acc, root, step, keep=3)
        assert steps(root) == list(range(max(1, step - 2), step + 1))
    assert names(root) == [ckpt_name(s) for s in (3, 4, 5)]  # the rotated ones are gone
    save(acc, root, 6, keep=1)
    assert names(root) == [ckpt_name(6)]
    assert checkpoint.check_files(root / ckpt_name(6)) is None


def test_saving_a_step_that_is_already_complete_rewrites_nothing(acc, tmp_path):
    root = tmp_path / "checkpoints"
    first = save(acc, root, 5)
    stamp = (first / STATE).stat().st_mtime_ns
    assert save(acc, root, 5) == first and (first / STATE).stat().st_mtime_ns == stamp


def _fail_save_state(acc, monkeypatch):
    real = acc.save_state

    def save_state(output_dir, **kw):
        real(output_dir, **kw)  # every file written, then the disk is full
        raise enospc(Path(output_dir) / "optimizer_1.bin")

    monkeypatch.setattr(acc, "save_state", save_state)


def _fail_state_file(acc, monkeypatch):
    def atomic_write_text(path, text):
        Path(path).with_name(f".{Path(path).name}.tmp").write_text(text[:10])
        raise enospc(path)

    monkeypatch.setattr(checkpoint, "atomic_write_text", atomic_write_text)


def _fail_rename(acc, monkeypatch):
    real = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).name == ckpt_name(2):
            raise enospc(dst)
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fail", [_fail_save_state, _fail_state_file, _fail_rename])
def test_a_checkpoint_that_fails_midway_keeps_the_previous_one(acc, tmp_path, monkeypatch, fail):
    """keep=1: were the failed save counted, rotation would delete the only good checkpoint."""
    root = tmp_path / "checkpoints"
    save(acc, root, 1, keep=1)
    before = {n: (root / ckpt_name(1) / n).read_bytes() for n in names(root / ckpt_name(1))}
    with monkeypatch.context() as m:
        fail(acc, m)
        with pytest.raises(CheckpointError) as exc:
            save(acc, root, 2, keep=1)
    msg = str(exc.value)
    assert msg.startswith(f"cannot write checkpoint {root / ckpt_name(2)}: no space left"), msg
    assert "previous checkpoints are intact" in msg and "\n" not in msg
    assert names(root) == [ckpt_name(1)]  # no .tmp-step-*, no step-2
    after = {n: (root / ckpt_name(1) / n).read_bytes() for n in names(root / ckpt_name(1))}
    assert after == before and checkpoint.check_files(root / ckpt_name(1)) is None
    save(acc, root, 2, keep=1)  # the next save works
    assert names(root) == [ckpt_name(2)]


def test_a_checkpoint_appears_under_its_name_only_when_complete(acc, tmp_path, monkeypatch):
    """While its files are written, step 2 is a `.tmp-` folder: no reader can list or load a
    half-written checkpoint, and the previous one is the newest until the rename."""
    root = tmp_path / "checkpoints"
    save(acc, root, 1)
    seen = []
    real_save_state, real_write = acc.save_state, checkpoint.atomic_write_text

    def save_state(output_dir, **kw):
        real_save_state(output_dir, **kw)
        seen.append((Path(output_dir).name, names(root), steps(root)))

    def atomic_write_text(path, text):
        seen.append((Path(path).parent.name, names(root), steps(root)))
        real_write(path, text)

    monkeypatch.setattr(acc, "save_state", save_state)
    monkeypatch.setattr(checkpoint, "atomic_write_text", atomic_write_text)
    save(acc, root, 2)
    assert len(seen) == 2 and steps(root) == [1, 2]
    for folder, listing, complete in seen:
        assert folder == f".tmp-{ckpt_name(2)}" and ckpt_name(2) not in listing
        assert complete == [1]


def test_a_bug_during_a_save_keeps_its_traceback_and_removes_the_temp(acc, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(acc, root, 1)

    monkeypatch.setattr(acc, "save_state", raising(TypeError("a bug, not the disk")))
    with pytest.raises(TypeError, match="a bug"):
        save(acc, root, 2)
    assert names(root) == [ckpt_name(1)]


def test_foreign_entries_are_never_listed_or_rotated(acc, tmp_path):
    """Only complete `step-` + 9 digits folders are checkpoints. Renamed-aside ones, our own
    incomplete folders at other steps, other people's files survive any number of rotations;
    `.tmp-step-*` folders are a killed save's debris, removed by the next save (not listed)."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    foreign = {
        "notes.txt": "file",
        "step-000000002.damaged": "complete",
        "step-000000001.superseded": "complete",
        "step-000000001.superseded-2": "complete",
        "step-7": "complete",  # not nine digits
        "step-000000003": "incomplete",  # no trainer_state.json
        "step-000000004": "file",
        "old-step-000000005": "complete",
    }
    for name, kind in foreign.items():
        if kind == "file":
            (root / name).write_text("x")
        else:
            (root / name).mkdir()
            if kind == "complete":
                (root / name / STATE).write_text(json.dumps({"step": 1}))
    (root / ".tmp-step-000000009").mkdir()
    (root / ".tmp-step-000000009" / "model.safetensors").write_text("half")
    assert list_checkpoints(root) == [] and newest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40):
        save(acc, root, step, keep=2)
    assert steps(root) == [30, 40]
    assert names(root) == sorted([*foreign, ckpt_name(30), ckpt_name(40)])
    assert (root / "notes.txt").read_text() == "x"
    assert (root / "step-000000002.damaged" / STATE).is_file()


def test_an_incomplete_folder_at_the_step_being_saved_is_replaced(acc, tmp_path):
    root = tmp_path / "checkpoints"
    (root / ckpt_name(10)).mkdir(parents=True)
    (root / ckpt_name(10) / "model.safetensors").write_text("half")
    save(acc, root, 10)
    assert steps(root) == [10] and checkpoint.check_files(root / ckpt_name(10)) is None


def test_list_checkpoints_orders_by_step_number(tmp_path):
    """Oldest first by the step in the name: not by creation order, not by modification time."""
    root = tmp_path / "checkpoints"
    for step in (1000, 20, 300_000_000, 5, 300):
        folder = root / ckpt_name(step)
        folder.mkdir(parents=True)
        (folder / STATE).write_text("{}")
        os.utime(folder, (1e9 - step, 1e9 - step))  # the newest step looks the oldest
    assert steps(root) == [5, 20, 300, 1000, 300_000_000]
    assert newest_checkpoint(tmp_path) == root / ckpt_name(300_000_000)
    assert list_checkpoints(tmp_path / "missing") == []


# ---- loading: nothing that runs code ----


def test_a_checkpoint_loads_back_what_was_saved(acc, tmp_path):
    root = tmp_path / "checkpoints"
    G = acc.models[0]
    want = {k: v.clone() for k, v in G.state_dict().items()}
    ckpt = save(acc, root, 7)
    with torch.no_grad():
        for p in G.parameters():
            p.zero_()
    state, tensors = checkpoint.load(acc, ckpt)
    assert state["step"] == 7 and state["tensor_files"] == ["ema"]
    assert torch.equal(tensors["ema"]["w"], torch.full((2,), 7.0))
    for k, v in G.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_pickle_in_a_checkpoint_is_refused_by_weights_only_and_runs_nothing(acc, tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = save(acc, root, 3)
    marker = tmp_path / "marker"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, ckpt / "optimizer_1.bin")
    problem = checkpoint.check_files(ckpt)
    assert problem is not None and problem[1] is True, problem  # untrusted, not damaged
    assert problem[0].startswith(f"{ckpt / 'optimizer_1.bin'}: refused"), problem
    with pytest.raises(CheckpointError, match="refused: it holds objects other than tensors"):
        checkpoint.load(acc, ckpt)
    assert not marker.exists()


def test_a_custom_checkpoint_pickle_is_refused_unopened(acc, tmp_path):
    """accelerate would unpickle custom_checkpoint_*.pkl with weights_only=False."""
    ckpt = save(acc, tmp_path / "checkpoints", 3)
    marker = tmp_path / "marker"
    torch.save(_Payload(marker), ckpt / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.pkl: refused"):
        checkpoint.load(acc, ckpt)
    assert checkpoint.check_files(ckpt)[1] is True
    assert not marker.exists()
