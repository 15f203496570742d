"""`--labels subfolders`: a plain folder's first-level subfolders become one-hot attributes that
survive the manifest, `facegan verify`, the training stream and the attribute classifier.

Tiny on purpose: 33 images of 24 px in three class folders (one nested a level deeper), each
class a distinct colour so the pixels tell which folder an image came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from facegan_dist.cli import app
from facegan_dist.config import ShardConfig
from facegan_dist.data.shards import verify_shards, write_shards
from facegan_dist.data.stream import ShardStream
from facegan_dist.errors import ConfigError, DataError
from tests.cli.test_shard_cli import assert_one_line_error

# Created in this (unsorted) order; the manifest must list them sorted.
CLASSES = {"zebra": (230, 230, 230), "apple": (200, 30, 30), "moss": (30, 160, 40)}
PER_CLASS = 11
SIZE = 16
runner = CliRunner()


def _image(rng: np.random.Generator, rgb: tuple[int, int, int]) -> Image.Image:
    noise = rng.integers(-20, 21, (24, 24, 3))
    return Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """root/<class>/<class>_NN.png (+ one .jpg, + one image in root/moss/deeper/)."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for name, rgb in CLASSES.items():
        (root / name).mkdir()
        for i in range(PER_CLASS):
            sub = root / name / "deeper" if (name, i) == ("moss", 0) else root / name
            sub.mkdir(exist_ok=True)
            ext = "jpg" if i == 1 else "png"
            _image(rng, rgb).save(sub / f"{name}_{i:02d}.{ext}")
    (root / "README.txt").write_text("not an image: ignored")
    return root


@pytest.fixture(scope="module")
def labelled(class_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("labelled")
    write_shards(_cfg(class_folder, out), labels="subfolders")
    return out


def _cfg(src: Path, out: Path) -> ShardConfig:
    return ShardConfig(src=src, out=out, size=SIZE, format="png", shard_size=8, workers=1)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _epoch(out: Path) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """One unshuffled epoch of (image [3, S, S], attrs [A], key) through the training stream."""
    stream = ShardStream(out, batch_per_device=5, shuffle_buffer=0, return_keys=True)
    got, it = [], iter(stream)
    for _ in range(stream.batches_per_epoch):
        images, attrs, keys = next(it)
        got += zip(images, attrs, keys, strict=True)
    return got


def test_manifest_names_the_sorted_classes(labelled):
    m = _manifest(labelled)
    assert m["attribute_names"] == ["apple", "moss", "zebra"]
    assert m["settings"]["labels"] == "subfolders"
    assert m["source"]["kind"] == "folder"
    assert m["total"] == m["splits"]["train"]["count"] == 3 * PER_CLASS
    report = verify_shards(labelled)
    assert report.ok, report.problems
    assert report.samples == 3 * PER_CLASS


def test_stream_one_hot_matches_the_folder(labelled):
    names = _manifest(labelled)["attribute_names"]
    seen = set()
    for image, attrs, key in _epoch(labelled):
        folder = key.split("_")[0]  # keys are file stems: <class>_NN
        assert attrs.dtype == torch.uint8 and attrs.shape == (len(names),)
        assert attrs.tolist() == [int(n == folder) for n in names], key
        # and the pixels are that folder's colour (the label is not attached to another image)
        mean = image.float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(CLASSES[folder], dtype=torch.float), atol=8)
        seen.add(key)
    assert len(seen) == 3 * PER_CLASS
    assert "moss_00" in seen  # root/moss/deeper/moss_00.png is class moss


def test_cli_shard_and_verify(class_folder, tmp_path):
    out = tmp_path / "o"
    r = _run("shard", class_folder, "--out", out, "--size", SIZE, "--format", "png",
             "--labels", "subfolders", "--shard-size", "8", "--workers", "1",
             "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "labels from subfolders: apple, moss, zebra" in r.stdout
    assert "labels: 3 classes from subfolders" in r.stdout
    r = _run("verify", out)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"OK: 5 shards, {3 * PER_CLASS} samples")


def test_image_in_the_root_is_aassert_one_line_error(class_folder, tmp_path):
    src = shutil.copytree(class_folder, tmp_path / "src")
    shutil.copy(src / "apple" / "apple_00.png", src / "loose.png")
    r = _run("shard", src, "--out", tmp_path / "o", "--labels", "subfolders", "--no-progress")
    assert_one_line_error(r, str(src / "loose.png"), "class subfolder", "--labels subfolders")
    assert not (tmp_path / "o").exists()
    # without --labels the same folder is fine (unlabelled, as always)
    r = _run("shard", src, "--out", tmp_path / "o", "--size", SIZE, "--workers", "1",
             "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output


def test_default_stays_unlabelled(class_folder, labelled, tmp_path):
    out = tmp_path / "plain"
    m = write_shards(_cfg(class_folder, out)).manifest
    assert m["attribute_names"] == []
    assert "labels" not in m["settings"]  # the settings block of before --labels existed
    assert m["settings"] == {"size": SIZE, "crop": "center", "format": "png", "quality": 95,
                             "limit": None, "split": "all", "shard_size": 8, "seed": 0}  # fmt: skip
    assert all(attrs.shape == (0,) for _, attrs, _ in _epoch(out))
    assert verify_shards(out).ok
    # same images, same order: only the attrs members differ from the labelled shards
    assert [k for _, _, k in _epoch(out)] == [k for _, _, k in _epoch(labelled)]
    # an explicit labels="none" is the default, byte for byte
    again = write_shards(_cfg(class_folder, tmp_path / "none"), labels="none")
    assert json.dumps(again.manifest["splits"]) == json.dumps(m["splits"])


def test_switching_labels_on_an_output_is_refused(class_folder, labelled):
    before = (labelled / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="--labels subfolders .this run: --labels none"):
        write_shards(_cfg(class_folder, labelled))
    assert (labelled / "manifest.json").read_bytes() == before


def test_labels_need_a_plain_folder(synth_kaggle_zip, synth_official_dir, tmp_path):
    for src in (synth_kaggle_zip, synth_official_dir):
        r = _run("shard", src, "--out", tmp_path / "o", "--labels", "subfolders", "--no-progress")
        assert_one_line_error(r, "--labels subfolders", "CelebA source", str(src.resolve()))
    assert not (tmp_path / "o").exists()
    r = _run("shard", synth_kaggle_zip, "--out", tmp_path / "o", "--labels", "folders")
    assert_one_line_error(r, "--labels 'folders'", "none, subfolders")


def test_verify_checks_the_attribute_count(labelled, tmp_path):
    out = shutil.copytree(labelled, tmp_path / "copy")
    m = _manifest(out)
    m["attribute_names"] = ["apple", "moss"]  # 2 names, but every sample has 3 characters
    (out / "manifest.json").write_text(json.dumps(m))
    report = verify_shards(out)
    assert not report.ok and len(report.problems) == len(m["splits"]["train"]["shards"])
    assert all("expected 2 characters 0/1" in why for _, why in report.problems)
    m["attribute_names"] = []  # unlabelled manifest over labelled shards
    (out / "manifest.json").write_text(json.dumps(m))
    assert all("no attribute_names" in why for _, why in verify_shards(out).problems)


def test_attribute_classifier_trains_on_folder_classes(labelled, tmp_path):
    from facegan_dist.classifier import CLASSIFIER_DIR, ClassifierSettings, get_classifier, predict
    from facegan_dist.data.readback import iter_split_once

    out = shutil.copytree(labelled, tmp_path / "shards")
    settings = ClassifierSettings(epochs=2, batch=8, width=8)
    model, meta = get_classifier(out, settings=settings)  # trains, caches, loads back
    assert (out / CLASSIFIER_DIR / "attributes.safetensors").is_file()
    assert model.n_attrs == 3 and model.head.out_features == 3
    assert meta["attribute_names"] == ["apple", "moss", "zebra"]
    assert set(meta["accuracy"]) == {"apple", "moss", "zebra"}
    assert meta["held_out_images"] > 0
    images, attrs, _ = next(iter_split_once(out, "train", 12))
    probs, feats = predict(model, images)
    assert probs.shape == (12, 3) and feats.shape == (12, 128)
    assert torch.isfinite(feats).all() and ((probs >= 0) & (probs <= 1)).all()
    assert attrs.shape == (12, 3) and (attrs.sum(1) == 1).all()


def test_one_hot_rule_without_images():
    from facegan_dist.data.celeba import _subfolder_labels

    names, attrs = _subfolder_labels(Path("/src"), ["b/x.png", "a/y/z.png", "c/w.png"])
    assert names == ("a", "b", "c")
    assert attrs == {"b/x.png": "010", "a/y/z.png": "100", "c/w.png": "001"}
    with pytest.raises(DataError, match="/src/top.png: image directly in /src"):
        _subfolder_labels(Path("/src"), ["a/x.png", "top.png"])
