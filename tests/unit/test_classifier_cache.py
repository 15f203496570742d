"""The attribute classifier's cache (SHARD_DIR/classifier): a damaged weights file is one line
naming it, and `get_classifier` (what `directions` and `evaluate --features attributes` call)
trains the classifier again instead of printing safetensors' traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from facegan_dist.classifier import (
    CLASSIFIER_DIR,
    META_NAME,
    WEIGHTS_NAME,
    ClassifierSettings,
    get_classifier,
    load_classifier,
)
from facegan_dist.errors import DataError
from tests.helpers.shards import write_tiny_shards

SETTINGS = ClassifierSettings(epochs=1, batch=8, width=8)


@pytest.fixture()
def shards(tmp_path) -> Path:
    out = write_tiny_shards(tmp_path / "shards", n=40, size=16, per_shard=16, n_attrs=3)
    get_classifier(out, settings=SETTINGS)  # trains and caches
    return out


@pytest.mark.parametrize("content", [b"", b"not a safetensors file" * 4], ids=["empty", "garbage"])
def test_a_damaged_weights_file_is_one_line_naming_it(shards, content):
    folder = shards / CLASSIFIER_DIR
    (folder / WEIGHTS_NAME).write_bytes(content)
    with pytest.raises(DataError) as info:
        load_classifier(folder)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith(f"{folder / WEIGHTS_NAME}: cannot load the attribute classifier (")


def test_a_damaged_meta_file_is_one_line_naming_it(shards):
    folder = shards / CLASSIFIER_DIR
    (folder / META_NAME).write_text('{"resolution": 16}')  # no attribute_names
    with pytest.raises(DataError, match=f"^{folder / META_NAME}: cannot load"):
        load_classifier(folder)


@pytest.mark.parametrize(
    "content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"], ids=["empty", "truncated"]
)
def test_get_classifier_trains_again_over_a_damaged_cache(shards, content):
    weights = shards / CLASSIFIER_DIR / WEIGHTS_NAME
    weights.write_bytes(content)
    lines: list[str] = []
    model, meta = get_classifier(shards, settings=SETTINGS, log=lines.append)
    trained = [line for line in lines if line.startswith("training the attribute classifier")]
    assert len(trained) == 1 and f"{weights}: cannot load" in trained[0]
    assert model.n_attrs == 3 and meta["attribute_names"] == ["attr_0", "attr_1", "attr_2"]
    load_classifier(weights.parent)  # the cache is whole again
    lines.clear()
    get_classifier(shards, settings=SETTINGS, log=lines.append)  # reused, not retrained
    assert not any(line.startswith("training") for line in lines)
