"""Reading the source layouts: shape detection, attribute/partition parsing, id checks, errors."""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path

import pytest

from facegan_dist.data.attributes import ATTRIBUTE_NAMES
from facegan_dist.data.celeba import ImageReader, open_source
from facegan_dist.errors import DataError

# ----------------------------------------------------------------------------- independent parsers


def kaggle_tables(root: Path) -> tuple[dict[str, str], dict[str, int]]:
    """{image id: 40-char 0/1 string}, {image id: partition} straight from the Kaggle CSVs."""
    with open(root / "list_attr_celeba.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    attrs = {
        r["image_id"]: "".join("1" if r[n] == "1" else "0" for n in ATTRIBUTE_NAMES) for r in rows
    }
    with open(root / "list_eval_partition.csv", newline="") as f:
        parts = {r["image_id"]: int(r["partition"]) for r in csv.DictReader(f)}
    return attrs, parts


def official_tables(root: Path) -> tuple[dict[str, str], dict[str, int]]:
    lines = (root / "Anno" / "list_attr_celeba.txt").read_text().splitlines()
    assert int(lines[0]) == len(lines) - 2
    assert tuple(lines[1].split()) == ATTRIBUTE_NAMES
    attrs = {}
    for line in lines[2:]:
        image_id, *vals = line.split()
        attrs[image_id] = "".join({"1": "1", "-1": "0"}[v] for v in vals)
    parts = {}
    for line in (root / "Eval" / "list_eval_partition.txt").read_text().splitlines():
        image_id, p = line.split()
        parts[image_id] = int(p)
    return attrs, parts


def make_official_zip(official_dir: Path, dest: Path) -> Path:
    """The official layout with the images zipped as Img/img_align_celeba.zip (members
    img_align_celeba/000001.jpg), built from the synthetic official folder."""
    shutil.copytree(official_dir / "Anno", dest / "Anno")
    shutil.copytree(official_dir / "Eval", dest / "Eval")
    (dest / "Img").mkdir(parents=True)
    with zipfile.ZipFile(dest / "Img" / "img_align_celeba.zip", "w", zipfile.ZIP_STORED) as zf:
        for p in sorted((official_dir / "Img" / "img_align_celeba").glob("*.jpg")):
            zf.write(p, f"img_align_celeba/{p.name}")
    return dest


# ----------------------------------------------------------------------------- shapes


def _check_celeba(src, attrs: dict[str, str], parts: dict[str, int]) -> None:
    assert src.attribute_names == ATTRIBUTE_NAMES
    assert len(src.samples) == 60 == len(attrs)
    for s in src.samples:
        image_id = s.key + ".jpg"
        assert s.attrs == attrs[image_id]
        assert s.partition == parts[image_id]
    assert [s.key for s in src.samples] == sorted(s.key for s in src.samples)
    assert {s.partition for s in src.samples} == {0, 1, 2}


def test_kaggle_zip(synth_kaggle_zip):
    src = open_source(synth_kaggle_zip)
    assert src.kind == "kaggle-zip" and src.is_celeba
    with zipfile.ZipFile(synth_kaggle_zip) as zf, ImageReader(src.reader) as reader:
        tmp_attrs = zf.read("list_attr_celeba.csv").decode()
        first = src.samples[0]
        assert first.member == "img_align_celeba/img_align_celeba/000001.jpg"
        assert first.file == first.member
        assert reader.read(first.member) == zf.read(first.member)
    assert tmp_attrs.startswith("image_id,5_o_Clock_Shadow")


def test_kaggle_zip_attrs_match_csv(synth_kaggle_zip, synth_kaggle_dir):
    # The zip holds the same CSVs as the extracted folder (same seed/count).
    _check_celeba(open_source(synth_kaggle_zip), *kaggle_tables(synth_kaggle_dir))


def test_kaggle_dir(synth_kaggle_dir):
    src = open_source(synth_kaggle_dir)
    assert src.kind == "kaggle-dir"
    _check_celeba(src, *kaggle_tables(synth_kaggle_dir))
    assert src.samples[0].file == "img_align_celeba/img_align_celeba/000001.jpg"
    with ImageReader(src.reader) as reader:
        data = reader.read(src.samples[0].member)
    assert data == (synth_kaggle_dir / src.samples[0].file).read_bytes()


def test_official_dir(synth_official_dir):
    src = open_source(synth_official_dir)
    assert src.kind == "official-dir"
    _check_celeba(src, *official_tables(synth_official_dir))


def test_official_zip(synth_official_dir, tmp_path):
    root = make_official_zip(synth_official_dir, tmp_path / "celeba")
    src = open_source(root)
    assert src.kind == "official-zip"
    _check_celeba(src, *official_tables(synth_official_dir))
    first = src.samples[0]
    assert first.member == "img_align_celeba/000001.jpg"
    assert first.file == "Img/img_align_celeba.zip:img_align_celeba/000001.jpg"
    with ImageReader(src.reader) as reader:
        assert (
            reader.read(first.member)
            == (synth_official_dir / "Img" / "img_align_celeba" / "000001.jpg").read_bytes()
        )


def test_plain_folder(plain_image_folder):
    src = open_source(plain_image_folder)
    assert src.kind == "folder" and not src.is_celeba
    assert src.attribute_names == ()
    assert len(src.samples) == 20
    assert {s.partition for s in src.samples} == {0}
    assert all(s.attrs is None for s in src.samples)
    assert sorted(s.key for s in src.samples) == [f"face_{i:03d}" for i in range(20)]
    assert {s.member for s in src.samples if s.key == "face_001"} == {"sub/face_001.jpg"}


def test_folder_keys_collisions_and_dots(tmp_path, plain_image_folder):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    jpg = plain_image_folder / "face_000.jpg"
    shutil.copy(jpg, tmp_path / "a" / "x.jpg")
    shutil.copy(jpg, tmp_path / "b" / "x.JPG")
    shutil.copy(jpg, tmp_path / "my.photo.jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_text("ignored")
    keys = sorted(s.key for s in open_source(tmp_path).samples)
    assert keys == ["a_x", "b_x", "my_photo"]


def test_lenient_extra_top_level_folder_zip(synth_kaggle_zip, tmp_path):
    nested = tmp_path / "archive.zip"
    with zipfile.ZipFile(synth_kaggle_zip) as zin, zipfile.ZipFile(nested, "w") as zout:
        for info in zin.infolist():
            zout.writestr("archive/" + info.filename, zin.read(info))
    src = open_source(nested)
    assert src.kind == "kaggle-zip" and len(src.samples) == 60
    assert src.samples[0].member == "archive/img_align_celeba/img_align_celeba/000001.jpg"


def test_lenient_extra_top_level_folder_dir(synth_kaggle_dir, synth_official_dir, tmp_path):
    shutil.copytree(synth_kaggle_dir, tmp_path / "k" / "archive")
    src = open_source(tmp_path / "k")
    assert src.kind == "kaggle-dir" and len(src.samples) == 60
    assert src.samples[0].file == "archive/img_align_celeba/img_align_celeba/000001.jpg"
    # flat extraction (img_align_celeba/*.jpg without the doubled folder)
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("list_attr_celeba.csv", "list_eval_partition.csv"):
        shutil.copy(synth_kaggle_dir / name, flat / name)
    shutil.copytree(
        synth_kaggle_dir / "img_align_celeba" / "img_align_celeba", flat / "img_align_celeba"
    )
    assert open_source(flat).kind == "kaggle-dir"
    shutil.copytree(synth_official_dir, tmp_path / "o" / "CelebA")
    assert open_source(tmp_path / "o").kind == "official-dir"


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does-not-exist.*does not exist"):
        open_source(tmp_path / "does-not-exist")


def test_empty_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        open_source(tmp_path)


def test_not_a_zip_file(tmp_path):
    f = tmp_path / "archive.zip"
    f.write_text("not a zip")
    with pytest.raises(DataError, match="not a zip"):
        open_source(f)


def test_zip_without_annotations(tmp_path, plain_image_folder):
    z = tmp_path / "faces.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(plain_image_folder / "face_000.jpg", "face_000.jpg")
    with pytest.raises(DataError, match="list_attr_celeba.csv"):
        open_source(z)


def test_attr_rows_for_missing_images(synth_kaggle_dir, tmp_path):
    root = shutil.copytree(synth_kaggle_dir, tmp_path / "k")
    img_dir = root / "img_align_celeba" / "img_align_celeba"
    (img_dir / "000007.jpg").unlink()
    (img_dir / "000042.jpg").unlink()
    with pytest.raises(DataError) as exc:
        open_source(root)
    msg = str(exc.value)
    assert "list_attr_celeba.csv" in msg and "2 image(s)" in msg and "000007.jpg" in msg
    assert "\n" not in msg


def test_images_without_attr_rows(synth_kaggle_dir, tmp_path):
    root = shutil.copytree(synth_kaggle_dir, tmp_path / "k")
    img_dir = root / "img_align_celeba" / "img_align_celeba"
    shutil.copy(img_dir / "000001.jpg", img_dir / "999999.jpg")
    with pytest.raises(
        DataError, match=r"list_attr_celeba\.csv has no row for 1 image.*999999\.jpg"
    ):
        open_source(root)


def test_partition_mismatch(synth_kaggle_dir, tmp_path):
    root = shutil.copytree(synth_kaggle_dir, tmp_path / "k")
    lines = (root / "list_eval_partition.csv").read_text().splitlines()
    (root / "list_eval_partition.csv").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(DataError, match=r"list_eval_partition\.csv has no row for 3 image"):
        open_source(root)


def test_official_attr_mismatch_in_zip_source(synth_official_dir, tmp_path):
    root = make_official_zip(synth_official_dir, tmp_path / "celeba")
    anno = root / "Anno" / "list_attr_celeba.txt"
    lines = anno.read_text().splitlines()
    extra = "999998.jpg " + " ".join(["-1"] * 40)
    anno.write_text("\n".join([*lines, extra]) + "\n")
    with pytest.raises(DataError, match=r"list_attr_celeba\.txt lists 1 image.*999998\.jpg"):
        open_source(root)


def test_bad_attr_values_and_names(synth_kaggle_dir, tmp_path):
    root = shutil.copytree(synth_kaggle_dir, tmp_path / "k")
    path = root / "list_attr_celeba.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace(",1,", ",7,", 1), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"list_attr_celeba\.csv line 2"):
        open_source(root)
    path.write_text("\n".join([lines[0].replace("Young", "Old"), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match="'Old', expected 'Young'"):
        open_source(root)
