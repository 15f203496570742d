"""Item 7: untrusted files. A checkpoint, an export or a shard from elsewhere must not run code or
write files: checkpoints and exports are read with safetensors, JSON or
`torch.load(weights_only=True)`, and the shard readers never extract members.

Every payload below is a pickle whose loading would create a marker file; each test checks that
the marker does not exist afterwards.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from facegan_dist.cli import app
from tests.conftest import reset_accelerate
from tests.helpers.shards import write_tiny_shards
from tests.reliability._common import REPO, TINY, error_lines


class _Payload:
    """Unpickling this calls open(marker, "w"): code from the file runs and creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def cli(*args: str):
    reset_accelerate()
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step run with its checkpoint and export (in-process, no loader workers)."""
    root = tmp_path_factory.mktemp("untrusted")
    shards = write_tiny_shards(root / "shards", n=32, size=16)
    out = root / "run"
    result = cli("train", "--data", str(shards), "--out", str(out), *TINY, "--num-workers", "0",
                 "--max-steps", "2", "--ckpt-every", "2", "--wandb-mode", "disabled")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_payload_is_live(tmp_path):
    """The control: loaded as a plain pickle, the payload does create its marker."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def _resume(run: Path, tmp_path: Path):
    return cli("train", "--out", str(run), "--resume", "auto", "--max-steps", "4",
               "--num-workers", "0", "--wandb-mode", "disabled")  # fmt: skip


def test_custom_checkpoint_pickles_are_refused_unopened(trained, tmp_path):
    """Accelerate unpickles custom_checkpoint_<i>.pkl with weights_only=False (for objects
    registered with register_for_checkpointing). We write none: a checkpoint holding one is
    refused in one line before anything reads it."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "marker"
    ckpt = run / "checkpoints" / "step-000000002"
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    torch.save(_Payload(marker), ckpt / "custom_checkpoint_1.pkl")
    result = _resume(run, tmp_path)
    assert not marker.exists()
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.stderr)
    assert str(ckpt / "custom_checkpoint_0.pkl") in line and "refused" in line, line
    assert "Traceback" not in result.stderr


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "name, write",
    [
        ("optimizer.bin", lambda path, p: torch.save(p, path)),  # what torch.save would write
        ("optimizer_1.bin", lambda path, p: path.write_bytes(pickle.dumps(p))),  # a raw pickle
        ("random_states_0.pkl", lambda path, p: torch.save({"torch_manual_seed": p}, path)),
        ("model.safetensors", lambda path, p: path.write_bytes(pickle.dumps(p))),
        ("fixed_noise.safetensors", lambda path, p: path.write_bytes(pickle.dumps(p))),
    ],
)
def test_tampered_checkpoint_file_fails_in_one_line(trained, tmp_path, name, write):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "marker"
    ckpt = run / "checkpoints" / "step-000000002"
    assert (ckpt / name).is_file()
    write(ckpt / name, _Payload(marker))
    result = _resume(run, tmp_path)
    assert not marker.exists()
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.stderr)
    assert str(ckpt) in line, line
    if name.endswith((".bin", ".pkl")):
        assert name in line and "refused" in line, line
    assert "Traceback" not in result.stderr and "\x1b[" not in line


def test_sources_load_nothing_that_runs_code():
    """Every torch.load call in the package passes weights_only=True; nothing unpickles otherwise,
    registers objects that accelerate would unpickle with weights_only=False, or extracts archive
    members (read from the syntax tree, so comments and messages do not count)."""
    import ast

    offenders = []
    for path in sorted((REPO / "facegan_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            weights_only = kw.get("weights_only")
            if isinstance(weights_only, ast.Constant) and weights_only.value is False:
                offenders.append(f"{where}: weights_only=False")
            if (
                owner == "torch"
                and name == "load"
                and not (isinstance(weights_only, ast.Constant) and weights_only.value is True)
            ):
                offenders.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "dill", "cloudpickle") and name in ("load", "loads"):
                offenders.append(f"{where}: {owner}.{name}")
            if name in ("register_for_checkpointing", "extractall", "extract"):
                offenders.append(f"{where}: {name}")
    assert not offenders, offenders


@pytest.mark.parametrize("kind", ["export", "checkpoint"])
def test_generator_file_with_a_pickle_runs_nothing(trained, tmp_path, kind):
    """`facegan sample` / `evaluate` load G from an export or a checkpoint with safetensors only:
    a pickle in its place is a one-line CheckpointError naming the file, and nothing runs."""
    from facegan_dist.artifacts import load_any_generator
    from facegan_dist.errors import CheckpointError

    src = trained / "export" if kind == "export" else trained / "checkpoints" / "step-000000002"
    folder = tmp_path / kind
    shutil.copytree(src, folder)
    marker = tmp_path / "marker"
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.safetensors") as err:
        load_any_generator(folder)
    assert "\n" not in str(err.value)
    assert not marker.exists()


# ---- shards whose member names try to escape the folder ----


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _hostile_shard(root: Path, escape: str, absolute: Path) -> Path:
    """A shard folder whose tar names members `../../<escape>.png`, `<absolute>.png`,
    `sub/../../<escape>-2.png`, plus a symlink and a hard link pointing outside."""
    root.mkdir(parents=True)
    names = [f"../../{escape}", str(absolute), f"sub/../../{escape}-2", "000004"]
    attrs = "0" * 40
    with tarfile.open(root / "train-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key in names:
            for ext, data in (("png", _png()), ("attrs.txt", attrs.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for kind, target in ((tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "../../x")):
            info = tarfile.TarInfo(f"link-{kind.decode()}.png")
            info.type, info.linkname = kind, target
            tar.addfile(info)
    data = (root / "train-000000.tar").read_bytes()
    import hashlib

    manifest = {
        "format_version": 1,
        "settings": {"size": 16, "format": "png"},
        "attribute_names": [f"attr_{i}" for i in range(40)],
        "splits": {"train": {"count": len(names), "shards": [
            {"name": "train-000000.tar", "count": len(names), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}]}},
        "total": len(names),
        "skipped": [],
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_shard_member_names_cannot_write_outside(tmp_path):
    from facegan_dist.data.stream import ShardStream

    work = tmp_path / "a" / "b"  # `../../` from the shard folder lands in tmp_path
    absolute = tmp_path / "abs-target" / "abs"
    shard_dir = _hostile_shard(work / "shards", "escaped", absolute)
    before = _tree(tmp_path)

    stream = ShardStream(shard_dir, split="train", batch_per_device=2, num_workers=0)
    it = iter(stream)
    images, attrs = next(it)
    images2, _ = next(it)
    assert images.shape == (2, 3, 16, 16) and images2.shape == (2, 3, 16, 16)
    verify = cli("verify", str(shard_dir))
    assert verify.exit_code == 0, verify.output  # four well-formed samples, hashes match

    assert _tree(tmp_path) == before  # nothing appeared, inside or outside the shard folder
    assert not absolute.parent.exists()
    assert not list(tmp_path.parent.glob("escaped*")) and not (REPO / "escaped.png").exists()


@pytest.mark.parametrize("name", ["../outside.tar", "/tmp/outside.tar", "sub/train-000000.tar"])
def test_manifest_shard_names_cannot_point_outside(tmp_path, name):
    """A tampered manifest naming a shard outside its folder is refused before anything is opened,
    by the training reader, by `verify` and by `train`, with one line naming the manifest."""
    from facegan_dist.data.stream import ShardStream
    from facegan_dist.errors import DataError

    shards = write_tiny_shards(tmp_path / "shards", n=32, size=16)
    shutil.copy(shards / "train-000000.tar", tmp_path / "outside.tar")  # a valid tar out there
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name
    manifest_path.write_text(json.dumps(manifest))
    before = manifest_path.read_bytes()

    with pytest.raises(DataError, match="outside its folder"):
        ShardStream(shards, split="train", batch_per_device=2, num_workers=0)
    train = ["train", "--data", str(shards), "--out", str(tmp_path / "run"), *TINY,
             "--num-workers", "0", "--max-steps", "1", "--wandb-mode", "disabled"]  # fmt: skip
    for args in (["verify", str(shards)], train):
        result = cli(*args)
        assert result.exit_code != 0
        lines = error_lines(result.output)
        assert len(lines) == 1 and "outside its folder" in lines[0] and name in lines[0], lines
    assert manifest_path.read_bytes() == before
    assert not (tmp_path / "run" / "checkpoints").exists()
