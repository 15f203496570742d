"""`facegan sample | directions | evaluate` end to end on a tiny exported G (16 px, width 8), in
process through typer's CliRunner; artifacts are read back from the files written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from facegan_dist.cli import app
from tests.helpers.shards import write_tiny_shards

pytestmark = pytest.mark.slow
runner = CliRunner()
Z = 16


def tiny_run(root: Path, attribute_names: list[str], *, ema: bool = True) -> Path:
    """RUN/export/ with a tiny DCGAN G (BatchNorm statistics set) and, with `ema`, an 'EMA'
    whose weights differ (so --no-ema is observable)."""
    from facegan_dist.artifacts import export_generator, generator_meta
    from facegan_dist.models import build_models

    torch.manual_seed(0)
    G, _ = build_models("dcgan", resolution=16, z_dim=Z, g_width=8, d_width=8)
    with torch.no_grad():
        for p in G.parameters():
            if p.ndim == 4:  # DCGAN init (std 0.02) gives flat grey images: add contrast
                p.normal_(0, 0.15)
        for _ in range(3):
            G(torch.randn(32, Z))
    G.eval()
    cfg = {"arch": "dcgan", "act": "relu", "dropout": 0.0, "z_dim": Z, "g_width": 8, "d_width": 8}
    E = None
    if ema:
        E, _ = build_models("dcgan", resolution=16, z_dim=Z, g_width=8, d_width=8)
        E.load_state_dict(G.state_dict())
        with torch.no_grad():
            for p in E.parameters():
                p.add_(0.05 * torch.randn_like(p))
    export_generator(G, generator_meta(cfg, 16, attribute_names), root / "export", ema=E)
    return root


def write_random_directions(run: Path, names: list[str]) -> Path:
    from facegan_dist.directions import save_directions

    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(len(names), Z, generator=g), dim=1)
    attrs = {n: {"usable": True} for n in names}
    meta = {"method": "test", "attribute_names": names, "attributes": attrs}
    save_directions(run / "directions.safetensors", dirs, meta)
    return run / "directions.safetensors"


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), n=96, size=16, per_shard=32)


@pytest.fixture(scope="module")
def names(shards) -> list[str]:
    return json.loads((shards / "manifest.json").read_text())["attribute_names"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, names) -> Path:
    root = tiny_run(tmp_path_factory.mktemp("run"), names)
    write_random_directions(root, names)
    return root


def test_sample_files_are_seed_addressed_whatever_the_batch(run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("sample", run, "--out", a, "--seed", 0, "--n", 5, "--batch", 1).exit_code == 0
    r = invoke("sample", run, "--out", b, "--seeds", "3-7", "--batch", 4, "--grid", "1x5")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in a.glob("seed*.png")) == [f"seed{s:06d}.png" for s in range(5)]
    for s in (3, 4):  # overlapping seeds: the same file content
        assert (a / f"seed{s:06d}.png").read_bytes() == (b / f"seed{s:06d}.png").read_bytes()
    grid = png(b / "grid.png")
    assert grid.shape == (2 + 18, 2 + 5 * 18, 3)  # 16 px + 2 px padding
    # the grid's first tile is seed 3's image
    assert np.array_equal(grid[2:18, 2:18], png(b / "seed000003.png"))
    info = json.loads((b / "sample.json").read_text())
    assert info["ema"] is True and info["kind"] == "export"


def test_no_ema_samples_the_raw_generator(run, tmp_path):
    invoke("sample", run, "--out", tmp_path / "e", "--seeds", "0")
    invoke("sample", run, "--out", tmp_path / "r", "--seeds", "0", "--no-ema")
    e, r = png(tmp_path / "e" / "seed000000.png"), png(tmp_path / "r" / "seed000000.png")
    assert np.abs(e - r).max() > 10
    assert json.loads((tmp_path / "r" / "sample.json").read_text())["ema"] is False


def test_interpolation_arith_and_edit_outputs(run, tmp_path):
    out = tmp_path / "o"
    r = invoke(
        "sample", run, "--out", out, "--seeds", "1,2", "--interpolate", "1-2", "--steps", 5,
        "--interp", "lerp", "--arith", "1 - 2 + 2", "--edit", "attr_0=3",
        "--edit", "attr_1=-2,attr_2=1",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    strip = png(out / "interp-000001-000002.png")
    assert strip.shape == (20, 2 + 5 * 18, 3)
    tile = lambda img, i: img[2:18, 2 + 18 * i : 18 + 18 * i]  # noqa: E731
    one, two = png(out / "seed000001.png"), png(out / "seed000002.png")
    assert np.array_equal(tile(strip, 0), one) and np.array_equal(tile(strip, 4), two)
    arith = png(out / "arith-00.png")  # [1, 2, 2, result = 1 - 2 + 2]
    assert arith.shape[1] == 2 + 4 * 18 and np.abs(tile(arith, 3) - one).max() <= 1
    edit = png(out / "edit-seed000001.png")  # before, after edit 1, after edit 2
    assert edit.shape[1] == 2 + 3 * 18 and np.array_equal(tile(edit, 0), one)
    assert np.abs(tile(edit, 1) - one).max() > 0
    assert png(out / "edits.png").shape == (2 + 3 * 18, 2 + 2 * 18, 3)


def test_sample_falls_back_to_the_newest_checkpoint(tmp_path, names):
    from safetensors.torch import load_file, save_file

    from facegan_dist.artifacts import META_NAME, RAW_WEIGHTS_NAME

    exported = tiny_run(tmp_path / "x", names)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000000100"
    ckpt.mkdir(parents=True)
    save_file(load_file(exported / "export" / RAW_WEIGHTS_NAME), str(ckpt / "model.safetensors"))
    meta = json.loads((exported / "export" / META_NAME).read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 100, "generator": meta}))
    assert (
        invoke("sample", tmp_path / "run", "--out", tmp_path / "c", "--seeds", "0").exit_code == 0
    )
    invoke("sample", exported, "--out", tmp_path / "e", "--seeds", "0", "--no-ema")
    assert np.array_equal(
        png(tmp_path / "c" / "seed000000.png"), png(tmp_path / "e" / "seed000000.png")
    )
    assert json.loads((tmp_path / "c" / "sample.json").read_text())["kind"] == "checkpoint"


def test_cli_errors_are_one_line(run, tmp_path):
    (tmp_path / "empty").mkdir()
    out = ["--out", tmp_path / "o"]
    assert_one_line_error(invoke("sample", tmp_path / "nope", *out), "nope")
    assert_one_line_error(invoke("sample", tmp_path / "empty", *out), "empty", "checkpoint")
    assert_one_line_error(invoke("sample", run, *out, "--seeds", "1-x"), "--seeds", "1-x")
    assert_one_line_error(invoke("sample", run, *out, "--grid", "0x3"), "--grid 0x3")
    assert_one_line_error(invoke("sample", run, *out, "--edit", "Beard=2"), "Beard")
    assert_one_line_error(invoke("sample", run, *out, "--truncation", "1.5"), "--truncation")
    bare = tiny_run(tmp_path / "bare", ["a"])  # no directions.safetensors
    assert_one_line_error(invoke("sample", bare, *out, "--edit", "a=1"), "facegan directions")


@pytest.fixture(scope="module")
def directions_run(tmp_path_factory, shards, names) -> tuple[Path, object]:
    run = tiny_run(tmp_path_factory.mktemp("drun"), names)
    r = invoke(
        "directions", run, "--data", shards, "--n", 200, "--classifier-epochs", 2,
        "--classifier-width", 8, "--check-seeds", 16,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return run, r


def test_directions_are_stored_as_unit_vectors_with_a_report(directions_run, shards, names):
    from facegan_dist.directions import load_directions

    run, result = directions_run
    dirs, got_names, meta = load_directions(run / "directions.safetensors")
    assert got_names == names and dirs.shape == (40, Z)
    usable = [n for n in names if meta["usable"][n]]
    assert usable, meta["attributes"]
    norms = dirs.norm(dim=1)
    for i, n in enumerate(names):
        assert float(norms[i]) == pytest.approx(1.0 if n in usable else 0.0, abs=1e-5)
    data = json.loads((run / "directions.json").read_text())
    assert data["method"] == "mean-diff" and data["n"] == 200
    row = data["attributes"][usable[0]]
    assert {"positive", "negative", "separation", "check_before", "check_after"} <= set(row)
    clf = json.loads((shards / "classifier" / "attributes.json").read_text())
    assert len(clf["accuracy"]) == 40 and clf["held_out"].startswith("train samples")
    # cached classifier reused: not retrained on the second call
    before = (shards / "classifier" / "attributes.safetensors").stat().st_mtime_ns
    r = invoke(
        "directions", run, "--data", shards, "--n", 40, "--method", "linear",
        "--check-seeds", 0, "--out", run / "lin.safetensors",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (shards / "classifier" / "attributes.safetensors").stat().st_mtime_ns == before


def test_evaluate_attributes_caches_real_stats_keyed_and_invalidated(
    directions_run, shards, tmp_path
):
    run, _ = directions_run  # the classifier is cached in shards/classifier by now
    args = ["evaluate", run, "--data", shards, "--features", "attributes", "--n", 48,
            "--kid-subsets", 5, "--batch", 16]  # fmt: skip
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    res = json.loads((run / "eval" / "attributes-train-48.json").read_text())
    assert res["n"] == 48 and res["n_real"] == 48 and res["fid"] > 0
    assert all(np.isfinite([res["fid"], res["kid"], res["kid_std"]]))
    cache = shards / "stats" / "attributes-train-48.safetensors"
    stamp = cache.stat().st_mtime_ns
    assert invoke(*args).exit_code == 0 and cache.stat().st_mtime_ns == stamp  # reused
    again = json.loads((run / "eval" / "attributes-train-48.json").read_text())
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-6)
    r = invoke(*args[:-4], "--n", 40, "--kid-subsets", 5)
    assert r.exit_code == 0 and (shards / "stats" / "attributes-train-40.safetensors").is_file()
    # more generated than real images: a warning on stderr names both counts (issue 12, item 5)
    r = invoke(*args[:-4], "--n", 120, "--kid-subsets", 2)
    assert r.exit_code == 0, r.output
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "--n 120" in warning[0] and "has 96 images" in warning[0]
    res = json.loads((run / "eval" / "attributes-train-120.json").read_text())
    assert res["n"] == 120 and res["n_real"] == 96
    # a changed manifest invalidates the real statistics (and the classifier: retrained)
    manifest = shards / "manifest.json"
    text = manifest.read_text()
    try:
        manifest.write_text(text + "\n")
        assert invoke(*args).exit_code == 0 and cache.stat().st_mtime_ns != stamp
    finally:
        manifest.write_text(text)


def test_evaluate_without_inception_weights_is_one_line(run, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = invoke("evaluate", run, "--data", shards, "--n", 10, "--features", "inception")
    expected = os.path.join(tmp_path, "torch", "hub", "checkpoints")
    assert_one_line_error(r, expected, "weights-inception-2015-12-05-6726825d.pth", "https://")
    assert not list(shards.glob("stats/inception-*"))  # nothing cached from a failed run


# The Inception path end to end (torch-fidelity's network from a weights file) is
# tests/unit/test_metrics.py::test_evaluate_inception_end_to_end_from_a_weights_file; a
# torchvision Inception file is refused there (test_bad_inception_weights_are_one_line...).


# ---- a broken export, checkpoint or directions file is named in one line (issue 12, item 6) ----

GENERATOR_JSON_PROBLEMS = {
    "missing": None,
    "invalid-json": "{",
    "not-an-object": "[1, 2, 3]",
    "missing-keys": '{"arch": "dcgan"}',
    "bad-value": "arch=transformer",
}


@pytest.mark.parametrize("problem", list(GENERATOR_JSON_PROBLEMS))
def test_generator_json_problems_name_generator_json(problem, tmp_path):
    from facegan_dist.artifacts import META_NAME

    run = tiny_run(tmp_path / "run", ["a"], ema=False)
    meta_path = run / "export" / META_NAME
    text = GENERATOR_JSON_PROBLEMS[problem]
    if text is None:
        meta_path.unlink()
    elif text.startswith("arch="):
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "arch": text.removeprefix("arch=")}))
    else:
        meta_path.write_text(text)
    for source in (run, run / "export"):
        r = invoke("sample", source, "--out", tmp_path / "o", "--seeds", 0)
        assert_one_line_error(r)
        assert r.stderr.startswith(f"error: {meta_path}: "), r.stderr
    assert not (tmp_path / "o").exists()  # refused before --out was created


def test_empty_weights_files_are_named(run, tmp_path):
    """An empty generator.safetensors, checkpoint ema.safetensors or directions.safetensors is one
    line naming that file (an EOFError from such a read used to print `error: aborted`)."""
    import shutil

    from facegan_dist.artifacts import WEIGHTS_NAME

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "export" / WEIGHTS_NAME).write_bytes(b"")
    r = invoke("sample", broken, "--out", tmp_path / "o", "--seeds", 0)
    assert_one_line_error(r, f"{broken / 'export' / WEIGHTS_NAME}: cannot load generator")

    ckpt = tmp_path / "ck" / "checkpoints" / "step-000000001"
    ckpt.mkdir(parents=True)
    meta = json.loads((run / "export" / "generator.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "generator": meta}))
    (ckpt / "model.safetensors").write_bytes(b"")
    r = invoke("sample", tmp_path / "ck", "--out", tmp_path / "o", "--seeds", 0)
    assert_one_line_error(r, f"{ckpt / 'model.safetensors'}: cannot load generator")
    # the checkpoint's generator config is blamed on trainer_state.json, not on the weights
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "generator": {"arch": "x"}}))
    r = invoke("sample", tmp_path / "ck", "--out", tmp_path / "o", "--seeds", 0)
    assert_one_line_error(r, f"{ckpt / 'trainer_state.json'}: no resolution")

    dirs = tmp_path / "d.safetensors"
    dirs.write_bytes(b"")
    r = invoke("sample", run, "--out", tmp_path / "o", "--edit", "attr_0=1", "--directions", dirs)
    assert_one_line_error(r, f"{dirs}: cannot load directions")
    shutil.copy(run / "directions.safetensors", dirs)
    dirs.with_suffix(".json").write_text("[1]")  # its .json is the broken part: named
    r = invoke("sample", run, "--out", tmp_path / "o", "--edit", "attr_0=1", "--directions", dirs)
    assert_one_line_error(r, f"{dirs.with_suffix('.json')}: cannot load directions")
