"""`facegan synth`: exact CelebA layouts and file formats, determinism, labels that agree with the
pixels, the --out rules and the CLI boundary. Uses the 60-image session fixtures of conftest.py."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegan_dist.config import SynthConfig
from facegan_dist.data.attributes import (
    ATTRIBUTE_NAMES,
    BBOX_COLUMNS,
    CELEBA_TOTAL,
    LANDMARK_COLUMNS,
    PARTITION_COUNTS,
    official_partition,
    scaled_partition_counts,
)
from facegan_dist.data.synth import HAT_COLORS, make_dataset
from facegan_dist.errors import ConfigError, DataError

N = 60  # images in the conftest fixtures
IDS = [f"{i:06d}.jpg" for i in range(1, N + 1)]
KAGGLE_CSVS = (
    "list_attr_celeba.csv",
    "list_bbox_celeba.csv",
    "list_eval_partition.csv",
    "list_landmarks_align_celeba.csv",
)
STAMP = ".facegan-synth.json"


def _synth(out: Path, **kw) -> dict:
    return make_dataset(SynthConfig(out=out, **{"count": 30, "workers": 1, **kw}).validate())


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _read_csv(text: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


def _read_txt(text: str, header_lines: int) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    if header_lines == 0:
        return [], [line.split() for line in lines]
    assert int(lines[0]) == len(lines) - 2  # line 1: the number of rows
    return lines[1].split(), [line.split() for line in lines[2:]]


def _check_tables(attr, part, bbox, lms, *, with_image_id: bool) -> None:
    """Parsed (header, rows) of the four annotation tables of a 60-image set."""
    lead = ["image_id"] if with_image_id else []
    header, rows = attr
    assert header == lead + list(ATTRIBUTE_NAMES)
    assert [r[0] for r in rows] == IDS
    assert all(len(r) == 41 and set(r[1:]) <= {"-1", "1"} for r in rows)
    header, rows = part
    assert header == (["image_id", "partition"] if with_image_id else [])
    codes = [int(r[1]) for r in rows]
    assert [r[0] for r in rows] == IDS
    train, val, test = scaled_partition_counts(N)
    assert codes == [0] * train + [1] * val + [2] * test  # by id order, like CelebA
    assert min(train, val, test) > 0
    # The official bbox header names image_id too ("image_id x_1 y_1 width height").
    for (header, rows), cols, first in (
        (bbox, BBOX_COLUMNS, ["image_id"]),
        (lms, LANDMARK_COLUMNS, lead),
    ):
        assert header == first + list(cols)
        assert [r[0] for r in rows] == IDS
        assert all(
            len(r) == 1 + len(cols) and all(v.lstrip("-").isdigit() for v in r[1:]) for r in rows
        )


def _check_jpeg(data: bytes) -> None:
    img = Image.open(io.BytesIO(data))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (178, 218))


# ----------------------------------------------------------------------------------------------
# attributes.py
# ----------------------------------------------------------------------------------------------


def test_attribute_names_and_official_partition():
    assert len(ATTRIBUTE_NAMES) == len(set(ATTRIBUTE_NAMES)) == 40
    assert ATTRIBUTE_NAMES[0] == "5_o_Clock_Shadow" and ATTRIBUTE_NAMES[-1] == "Young"
    assert ATTRIBUTE_NAMES.index("Smiling") == 31 and ATTRIBUTE_NAMES.index("Male") == 20
    assert sum(PARTITION_COUNTS) == CELEBA_TOTAL
    assert [official_partition(i) for i in (1, 162770, 162771, 182637, 182638, 202599)] == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    assert scaled_partition_counts(CELEBA_TOTAL) == PARTITION_COUNTS
    for count in range(10, 400):
        split = scaled_partition_counts(count)
        assert sum(split) == count and min(split) >= 1, count


# ----------------------------------------------------------------------------------------------
# Layouts and formats
# ----------------------------------------------------------------------------------------------


def test_kaggle_dir_layout(synth_kaggle_dir):
    root = synth_kaggle_dir
    images = {f"img_align_celeba/img_align_celeba/{i}" for i in IDS}
    assert _files(root) == images | set(KAGGLE_CSVS) | {STAMP}
    texts = [(root / name).read_text() for name in KAGGLE_CSVS]
    attr, bbox, part, lms = (_read_csv(t) for t in texts)
    _check_tables(attr, part, bbox, lms, with_image_id=True)
    assert texts[0].startswith("image_id,5_o_Clock_Shadow,Arched_Eyebrows,")
    for name in sorted(images):
        _check_jpeg((root / name).read_bytes())


def test_kaggle_zip_layout_matches_the_extracted_one(synth_kaggle_zip, synth_kaggle_dir):
    root = synth_kaggle_zip.parent
    assert _files(root) == {"archive.zip", STAMP}  # nothing extracted
    with zipfile.ZipFile(synth_kaggle_zip) as zf:
        names = zf.namelist()
        images = [f"img_align_celeba/img_align_celeba/{i}" for i in IDS]
        assert sorted(names) == sorted(images + list(KAGGLE_CSVS))
        # Same seed and count: every member is byte-identical to the extracted dataset.
        for name in names:
            assert zf.read(name) == (synth_kaggle_dir / name).read_bytes(), name
        assert zf.testzip() is None


def test_official_dir_layout(synth_official_dir):
    root = synth_official_dir
    images = {f"Img/img_align_celeba/{i}" for i in IDS}
    annos = {
        "Anno/list_attr_celeba.txt",
        "Anno/list_bbox_celeba.txt",
        "Anno/list_landmarks_align_celeba.txt",
        "Eval/list_eval_partition.txt",
    }
    assert _files(root) == images | annos | {STAMP}
    attr_text = (root / "Anno/list_attr_celeba.txt").read_text()
    attr = _read_txt(attr_text, 2)
    part = _read_txt((root / "Eval/list_eval_partition.txt").read_text(), 0)
    bbox = _read_txt((root / "Anno/list_bbox_celeba.txt").read_text(), 2)
    lms = _read_txt((root / "Anno/list_landmarks_align_celeba.txt").read_text(), 2)
    _check_tables(attr, part, bbox, lms, with_image_id=False)
    # The real file pads every value to two characters: "000001.jpg -1  1  1 -1 ...".
    row = attr_text.splitlines()[2]
    assert re.fullmatch(r"000001\.jpg( (-1| 1)){40}", row), row
    assert (root / "Eval/list_eval_partition.txt").read_text().startswith("000001.jpg 0\n")
    # The official set shares its pixels with the Kaggle one (same seed, same ids).
    for name in IDS[:5]:
        _check_jpeg((root / "Img/img_align_celeba" / name).read_bytes())


def test_official_zip_layout(tmp_path, synth_official_dir):
    summary = _synth(tmp_path / "o", count=N, layout="official", zip=True)
    root = tmp_path / "o"
    assert _files(root) == {
        "Img/img_align_celeba.zip",
        "Anno/list_attr_celeba.txt",
        "Anno/list_bbox_celeba.txt",
        "Anno/list_landmarks_align_celeba.txt",
        "Eval/list_eval_partition.txt",
        STAMP,
    }
    assert summary["paths"]["images"] == str(root / "Img/img_align_celeba.zip")
    with zipfile.ZipFile(root / "Img/img_align_celeba.zip") as zf:
        assert zf.namelist() == [f"img_align_celeba/{i}" for i in IDS]
        for i in IDS[:5]:
            data = zf.read(f"img_align_celeba/{i}")
            _check_jpeg(data)
            assert data == (synth_official_dir / "Img/img_align_celeba" / i).read_bytes()
    for name in ("Anno/list_attr_celeba.txt", "Eval/list_eval_partition.txt"):
        assert (root / name).read_bytes() == (synth_official_dir / name).read_bytes()


def test_summary_agrees_with_the_files(tmp_path):
    summary = _synth(tmp_path / "s", count=40, seed=3)
    assert (summary["count"], summary["seed"], summary["layout"], summary["zip"]) == (
        40,
        3,
        "kaggle",
        False,
    )
    assert summary["reused"] is False and summary["out"] == str(tmp_path / "s")
    assert summary["partition"] == dict(
        zip(("train", "val", "test"), scaled_partition_counts(40), strict=True)
    )
    _, rows = _read_csv(Path(summary["paths"]["attributes"]).read_text())
    labels = np.array([[int(v) for v in r[1:]] for r in rows])
    expected = dict(zip(ATTRIBUTE_NAMES, ((labels == 1).mean(0)).round(4), strict=True))
    assert summary["prevalence"] == pytest.approx(expected)
    assert set(summary["drawn"]) <= set(ATTRIBUTE_NAMES)


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_for_any_workers_and_count(tmp_path, synth_kaggle_dir):
    a = tmp_path / "w1"
    b = tmp_path / "w3"
    _synth(a, count=30, zip=True, workers=1)
    _synth(b, count=30, zip=True, workers=3)  # 3 processes, different chunking
    assert (a / "archive.zip").read_bytes() == (b / "archive.zip").read_bytes()
    # Image n depends on (seed, n) only: a 30-image set is the prefix of the 60-image one.
    with zipfile.ZipFile(a / "archive.zip") as zf:
        for i in IDS[:30]:
            name = f"img_align_celeba/img_align_celeba/{i}"
            assert zf.read(name) == (synth_kaggle_dir / name).read_bytes()


def test_different_seed_different_faces(tmp_path, synth_kaggle_dir):
    _synth(tmp_path / "s1", count=5, seed=1)
    sub = "img_align_celeba/img_align_celeba"
    for i in IDS[:5]:
        assert (tmp_path / "s1" / sub / i).read_bytes() != (synth_kaggle_dir / sub / i).read_bytes()


# ----------------------------------------------------------------------------------------------
# Labels agree with the pixels (60 images, simple statistics at landmark-derived regions)
# ----------------------------------------------------------------------------------------------


def _lum(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


@pytest.fixture(scope="module")
def measured(synth_kaggle_dir) -> list[dict]:
    """Per image: labels and pixel statistics at regions located from its landmarks."""
    root = synth_kaggle_dir
    _, attr_rows = _read_csv((root / "list_attr_celeba.csv").read_text())
    _, lm_rows = _read_csv((root / "list_landmarks_align_celeba.csv").read_text())
    out = []
    for attr, lm in zip(attr_rows, lm_rows, strict=True):
        lab = {n: int(v) == 1 for n, v in zip(ATTRIBUTE_NAMES, attr[1:], strict=True)}
        lex, ey, rex, _, _, nose_y, lmx, my, rmx, _ = (int(v) for v in lm[1:])
        path = root / "img_align_celeba/img_align_celeba" / attr[0]
        im = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)

        def box(x0, x1, y0, y1, im=im):
            return im[round(y0) : round(y1), round(x0) : round(x1)].reshape(-1, 3)

        s = (rex - lex) / 38  # face scale (eyes are 38 px apart at scale 1)
        cx, cy = (lex + rex) / 2, ey + 10 * s
        top = cy - 58 * s  # top of the skull
        head = np.median(box(cx - 12, cx + 12, top - 8, top + 3), 0)  # hair or hat
        bg = np.median(box(2, 12, 2, 12), 0)
        beside_jaw = np.median(box(cx - 50 * s, cx - 47 * s, my - 2, my + 4), 0)
        # Mouth: pixels far from the surrounding colour, around the landmark corners.
        ref = np.median(box(lmx - 8, rmx + 8, my - 9, my + 18), 0)
        y0 = round(my - 8)
        strip = im[y0 : round(my + 16)]
        mouth = np.linalg.norm(strip - ref, axis=2) > 40
        rows = np.arange(strip.shape[0])[:, None] + y0

        def centroid(x0, x1, mouth=mouth, rows=rows):
            m = mouth[:, round(x0) : round(x1)]
            return (rows * m).sum() / max(m.sum(), 1)

        out.append(
            {
                "lab": lab,
                "head": head,
                "hat_dist": min(np.linalg.norm(head - np.array(c)) for c in HAT_COLORS),
                "bridge_dark": int((_lum(box(cx - 3, cx + 4, ey - 6, ey + 2)) < 70).sum()),
                "cheek_lum": float(np.median(_lum(box(lex - 8, rex + 8, ey + 9 * s, nose_y)))),
                "beside_jaw_vs_bg": float(np.linalg.norm(beside_jaw - bg)),
                # Smiling: the mouth's middle sits lower than its corners.
                "smile": centroid(cx - 3, cx + 4)
                - (centroid(lmx + 1, lmx + 5) + centroid(rmx - 4, rmx)) / 2,
                "mouth_height": int(mouth[:, round(cx - 3) : round(cx + 4)].any(1).sum()),
            }
        )
    return out


def _split(measured, attr, key, where=lambda m: True):
    pos = [m[key] for m in measured if where(m) and m["lab"][attr]]
    neg = [m[key] for m in measured if where(m) and not m["lab"][attr]]
    assert len(pos) >= 3 and len(neg) >= 3, (attr, len(pos), len(neg))
    return pos, neg


def test_smiling_mouth_curves_up(measured):
    pos, neg = _split(measured, "Smiling", "smile")
    assert min(pos) > 2.5 and max(neg) < 1.5, (pos, neg)


def test_open_mouth_is_taller(measured):
    pos, neg = _split(measured, "Mouth_Slightly_Open", "mouth_height")
    assert min(pos) >= 11 and max(neg) <= 9, (pos, neg)


def test_eyeglasses_have_a_dark_bridge(measured):
    pos, neg = _split(measured, "Eyeglasses", "bridge_dark")
    assert min(pos) > 5 and max(neg) == 0, (pos, neg)


def test_hat_colour_on_top_of_the_head(measured):
    pos, neg = _split(measured, "Wearing_Hat", "hat_dist")
    assert max(pos) < 35 and min(neg) > 60, (pos, neg)


def test_hair_colour_on_top_of_the_head(measured):
    def visible(m):  # hair shows on top of the head
        return not (m["lab"]["Wearing_Hat"] or m["lab"]["Bald"])

    for m in measured:  # exactly one hair colour label
        hair = [m["lab"][n] for n in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")]
        assert sum(hair) == 1
    lum = {id(m): float(_lum(m["head"])) for m in measured}
    warm = {id(m): float(m["head"][0] - m["head"][2]) for m in measured}  # blond is yellow
    blond = [m for m in measured if visible(m) and m["lab"]["Blond_Hair"]]
    black = [m for m in measured if visible(m) and m["lab"]["Black_Hair"]]
    other = [m for m in measured if visible(m) and m not in blond and m not in black]
    assert len(blond) >= 3 and len(black) >= 3 and len(other) >= 3
    assert all(lum[id(m)] > 150 and warm[id(m)] > 60 for m in blond)
    assert all(lum[id(m)] < 50 for m in black)
    assert not any(lum[id(m)] > 150 and warm[id(m)] > 60 for m in other)
    assert not any(lum[id(m)] < 50 for m in other)


def test_pale_skin_is_brighter(measured):
    pos, neg = _split(measured, "Pale_Skin", "cheek_lum")
    assert min(pos) > 215 and max(neg) < 205, (pos, neg)


def test_women_have_long_hair_beside_the_jaw(measured):
    pos, neg = _split(measured, "Male", "beside_jaw_vs_bg")
    assert max(pos) < 20 and min(neg) > 30, (pos, neg)  # men: background; women: hair


# ----------------------------------------------------------------------------------------------
# --out rules
# ----------------------------------------------------------------------------------------------


def test_same_dataset_again_is_a_no_op(tmp_path):
    out = tmp_path / "d"
    _synth(out, count=12)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = _synth(out, count=12, workers=2)  # workers do not change the dataset
    assert again["reused"] is True and again["count"] == 12
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_refuses_a_non_empty_or_different_out(tmp_path):
    out = tmp_path / "d"
    _synth(out, count=12)
    with pytest.raises(DataError, match=r"already holds a different synthetic dataset"):
        _synth(out, count=13)
    with pytest.raises(DataError, match=r"already holds a different"):
        _synth(out, count=12, layout="official")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"already exists and is not empty") as exc:
        _synth(other)
    assert str(other) in str(exc.value) and "\n" not in str(exc.value)
    assert _files(other) == {"notes.txt"}


def test_unwritable_or_file_out_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(DataError, match="is a file") as exc:
        _synth(blocker)
    assert str(blocker) in str(exc.value)
    with pytest.raises(DataError, match="cannot be written") as exc:
        _synth(blocker / "sub")
    assert str(blocker / "sub") in str(exc.value) and "\n" not in str(exc.value)


def test_leftover_staging_folder_is_replaced(tmp_path):
    out = tmp_path / "d"
    (out / ".facegan-synth.partial" / "junk").mkdir(parents=True)  # an interrupted run
    summary = _synth(out, count=10)
    assert summary["reused"] is False
    assert not (out / ".facegan-synth.partial").exists()
    assert json.loads((out / STAMP).read_text())["key"]["count"] == 10


def test_config_validation_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--count 0"):
        SynthConfig(out=tmp_path, count=0).validate()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    import facegan_dist.cli.synth  # noqa: F401  (registers the command)
    from facegan_dist.cli.app import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["synth", *args])


def test_cli_success_prints_a_summary(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli(
        "--out", str(out), "--count", "20", "--layout", "official", "--zip", "--workers", "1"
    )
    assert result.exit_code == 0, result.output
    assert "20 faces, official layout (zip)" in result.stdout
    assert str(out / "Img" / "img_align_celeba.zip") in result.stdout
    assert "Smiling" in result.stdout and "train" in result.stdout
    assert (out / "Img" / "img_align_celeba.zip").is_file()


def test_cli_bad_count_is_one_line_on_stderr(cli, tmp_path):
    result = cli("--out", str(tmp_path / "x"), "--count", "0")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --count 0") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_cli_non_empty_out_is_one_line_on_stderr(cli, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = cli("--out", str(tmp_path), "--count", "5")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --out") and result.stderr.count("\n") == 1
    assert "not empty" in result.stderr and "Traceback" not in result.output
