"""Shared fixtures: tiny synthetic CelebA-layout datasets (session-scoped, made once)."""

from __future__ import annotations

from pathlib import Path

import pytest


def reset_accelerate() -> None:
    """Accelerate's state is a process-wide singleton: a second Accelerator with another precision
    raises unless it is reset (STACK-NOTES section 1)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


def _synth(root: Path, **kw) -> Path:
    from facegan_dist.config import SynthConfig
    from facegan_dist.data.synth import make_dataset

    cfg = SynthConfig(out=root, **{"count": 60, "seed": 0, "workers": 1, **kw}).validate()
    make_dataset(cfg)
    return root


@pytest.fixture(scope="session")
def synth_kaggle_dir(tmp_path_factory) -> Path:
    """60 images, Kaggle layout, extracted (img_align_celeba/img_align_celeba/*.jpg + CSVs)."""
    return _synth(tmp_path_factory.mktemp("kaggle_dir"), layout="kaggle")


@pytest.fixture(scope="session")
def synth_kaggle_zip(tmp_path_factory) -> Path:
    """Path of `archive.zip` (Kaggle layout, 60 images)."""
    root = _synth(tmp_path_factory.mktemp("kaggle_zip"), layout="kaggle", zip=True)
    return root / "archive.zip"


@pytest.fixture(scope="session")
def synth_official_dir(tmp_path_factory) -> Path:
    """60 images, official layout (Img/img_align_celeba, Anno/, Eval/)."""
    return _synth(tmp_path_factory.mktemp("official_dir"), layout="official")


@pytest.fixture(scope="session")
def plain_image_folder(tmp_path_factory, synth_kaggle_dir) -> Path:
    """A plain folder of 20 face images (no attributes, no partition), nested one level."""
    import shutil

    root = tmp_path_factory.mktemp("plain")
    src = sorted((synth_kaggle_dir / "img_align_celeba" / "img_align_celeba").glob("*.jpg"))[:20]
    (root / "sub").mkdir()
    for i, p in enumerate(src):
        shutil.copy(p, (root / "sub" if i % 2 else root) / f"face_{i:03d}.jpg")
    return root
