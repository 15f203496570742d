"""Read a face-image source as it lies on disk: detect its shape, list its images with their
CelebA attributes and partition, and hand out image bytes.

Shapes (`Source.kind`, the names docs/SHARDS.md uses):

- `kaggle-zip`   Kaggle `archive.zip`: `img_align_celeba/img_align_celeba/*.jpg` + `list_*.csv`
- `kaggle-dir`   the same archive extracted
- `official-dir` `Img/img_align_celeba/`, `Anno/list_attr_celeba.txt`,
                 `Eval/list_eval_partition.txt`
- `official-zip` the official layout with the images still in `Img/img_align_celeba.zip`
- `folder`       any folder of images (recursive; .jpg .jpeg .png .webp .bmp): no attributes,
                 every image is partition 0 ("train"). With `labels="subfolders"` each image's
                 first-level subfolder is its class: `attribute_names` are the sorted class names
                 and each image's `attrs` the one-hot string over them (`--labels subfolders`).

An extra top-level folder (`archive/img_align_celeba/...`) is tolerated: the annotation files are
searched for a couple of levels down. Zip members are read in place, never extracted; each worker
process opens its own `ImageReader` (a `ZipFile` handle cannot be shared across processes).
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from facegan_dist.data.attributes import ATTRIBUTE_NAMES
from facegan_dist.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SOURCE_KINDS = ("kaggle-zip", "kaggle-dir", "official-dir", "official-zip", "folder")
PARTITION_NAMES = {0: "train", 1: "val", 2: "test"}
SPLIT_PARTITIONS = {"train": 0, "val": 1, "test": 2}
LABEL_MODES = ("none", "subfolders")  # `--labels`: where a plain folder's class labels come from

_KAGGLE_ATTR = "list_attr_celeba.csv"
_KAGGLE_PART = "list_eval_partition.csv"
_OFFICIAL_ATTR = "list_attr_celeba.txt"
_OFFICIAL_PART = "list_eval_partition.txt"
_IMG_DIR = "img_align_celeba"
_SEARCH_DEPTH = 2  # how many folder levels below SRC the annotation files may sit


@dataclass(frozen=True)
class Sample:
    """One image of a source.

    key:       the WebDataset key: file name without extension, `.` -> `_` (docs/SHARDS.md)
    member:    how `ImageReader.read` finds it: a zip member name, or a path relative to the
               image root folder (posix separators)
    file:      the name to show the user (relative to SRC; `x.zip:member` inside a nested zip)
    partition: 0 train, 1 val, 2 test (always 0 for plain folders)
    attrs:     one `0`/`1` character per `Source.attribute_names` entry (40 for CelebA, one-hot
               over the classes for `--labels subfolders`), or None (unlabelled plain folders)
    stamp:     cheap content stamp (zip CRC + size, or file size + mtime) so a resumed run notices
               an image that changed under the same name
    """

    key: str
    member: str
    file: str
    partition: int
    attrs: str | None
    stamp: str


@dataclass(frozen=True)
class ReaderRef:
    """What a worker process needs to open its own `ImageReader` (small and picklable)."""

    root: str  # folder holding the images, or the zip file holding them
    is_zip: bool


@dataclass(frozen=True)
class Source:
    path: Path  # absolute SRC as given (the zip file or the folder)
    kind: str  # one of SOURCE_KINDS
    reader: ReaderRef
    attribute_names: tuple[str, ...]  # () for unlabelled plain folders
    samples: tuple[Sample, ...]  # sorted by key
    labels: str = "none"  # LABEL_MODES: "subfolders" when the attributes are folder classes

    @property
    def is_celeba(self) -> bool:
        return self.kind != "folder"

    def split_samples(self, split: str) -> list[Sample]:
        """Samples of one split name (train/val/test), in key order."""
        part = SPLIT_PARTITIONS[split]
        return [s for s in self.samples if s.partition == part]


class ImageReader:
    """Reads image bytes by `Sample.member`; opens a zip once and keeps it open."""

    def __init__(self, ref: ReaderRef):
        self.ref = ref
        self._zip = zipfile.ZipFile(ref.root) if ref.is_zip else None
        self._root = Path(ref.root)

    def read(self, member: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(member)
        with open(self._root / member, "rb") as f:
            return f.read()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: Path | str, labels: str = "none") -> Source:
    """Detect the shape of `path` and list its images (with attributes and partition).

    `labels` (LABEL_MODES) applies to plain folders only: "subfolders" labels each image by its
    first-level subfolder. Raises ConfigError for a bad `labels` or `labels` on a CelebA source,
    and DataError, naming the file, for a missing path, a folder without images, an image
    outside a class subfolder, or annotation files whose image ids do not match the images.
    """
    if labels not in LABEL_MODES:
        raise ConfigError(f"--labels {labels!r} must be one of {', '.join(LABEL_MODES)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"source {path} does not exist")
    path = path.resolve()
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(
                f"source {path} is a file but not a zip archive "
                "(pass the Kaggle archive.zip, a CelebA folder or a folder of images)"
            )
        _no_labels(labels, path, "kaggle-zip")
        return _open_kaggle_zip(path)
    if not path.is_dir():
        raise DataError(f"source {path} is neither a folder nor a zip archive")
    root = _find_up_to(path, lambda d: (d / _KAGGLE_ATTR).is_file())
    if root is not None:
        _no_labels(labels, path, "kaggle-dir")
        return _open_kaggle_dir(path, root)
    root = _find_up_to(path, lambda d: (d / "Anno" / _OFFICIAL_ATTR).is_file())
    if root is not None:
        _no_labels(labels, path, "official layout")
        return _open_official(path, root)
    return _open_folder(path, labels)


def _no_labels(labels: str, path: Path, kind: str) -> None:
    """`--labels` is for plain folders: a CelebA source brings its own 40 attributes."""
    if labels != "none":
        raise ConfigError(
            f"--labels {labels}: {path} is a CelebA source ({kind}) with its own 40 attributes; "
            "--labels applies to plain image folders only"
        )


# ----------------------------------------------------------------------------- layouts


def _open_kaggle_zip(path: Path) -> Source:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot open zip {path}: {exc}") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and not _junk(i.filename)]
        by_base: dict[str, list[str]] = {}
        for info in infos:
            by_base.setdefault(posixpath.basename(info.filename), []).append(info.filename)
        attr_member = _shortest(by_base.get(_KAGGLE_ATTR))
        if attr_member is None:
            raise DataError(
                f"{path} has no {_KAGGLE_ATTR}: not a Kaggle CelebA archive.zip "
                "(for a zip of plain images, extract it and pass the folder)"
            )
        part_member = _shortest(by_base.get(_KAGGLE_PART))
        if part_member is None:
            raise DataError(f"{path} has no {_KAGGLE_PART} next to {attr_member}")
        files = _zip_images(infos)
        if not files:
            raise DataError(f"{path} has no images ({' '.join(IMAGE_EXTENSIONS)})")
        names, attrs = _parse_attr_csv(_zip_text(zf, attr_member), f"{path.name}:{attr_member}")
        parts = _parse_partition(_zip_text(zf, part_member), f"{path.name}:{part_member}", ",")
    return _celeba_source(
        path,
        "kaggle-zip",
        ReaderRef(str(path), True),
        files,
        lambda member: member,
        names,
        attrs,
        f"{path.name}:{attr_member}",
        parts,
        f"{path.name}:{part_member}",
    )


def _open_kaggle_dir(src: Path, root: Path) -> Source:
    attr_file, part_file = root / _KAGGLE_ATTR, root / _KAGGLE_PART
    if not part_file.is_file():
        raise DataError(f"{part_file} is missing (needed next to {attr_file.name})")
    img_dir = _find_image_dir(root)
    if img_dir is None:
        raise DataError(f"no {_IMG_DIR}/ folder with images under {root}")
    files = _scan_flat(img_dir)
    names, attrs = _parse_attr_csv(_read_text(attr_file), str(attr_file))
    parts = _parse_partition(_read_text(part_file), str(part_file), ",")
    prefix = _rel_prefix(img_dir, src)
    return _celeba_source(
        src,
        "kaggle-dir",
        ReaderRef(str(img_dir), False),
        files,
        lambda member: prefix + member,
        names,
        attrs,
        str(attr_file),
        parts,
        str(part_file),
    )


def _open_official(src: Path, root: Path) -> Source:
    attr_file = root / "Anno" / _OFFICIAL_ATTR
    part_file = root / "Eval" / _OFFICIAL_PART
    if not part_file.is_file() and (root / "Anno" / _OFFICIAL_PART).is_file():
        part_file = root / "Anno" / _OFFICIAL_PART
    if not part_file.is_file():
        raise DataError(f"{root / 'Eval' / _OFFICIAL_PART} is missing")
    img_dir = _find_image_dir(root / "Img") if (root / "Img").is_dir() else None
    img_zip = root / "Img" / f"{_IMG_DIR}.zip"
    if img_dir is not None:
        kind, ref = "official-dir", ReaderRef(str(img_dir), False)
        files = _scan_flat(img_dir)
        prefix = _rel_prefix(img_dir, src)
    elif img_zip.is_file():
        kind, ref = "official-zip", ReaderRef(str(img_zip), True)
        try:
            with zipfile.ZipFile(img_zip) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir() and not _junk(i.filename)]
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot open zip {img_zip}: {exc}") from None
        files = _zip_images(infos)
        prefix = _rel_prefix(img_zip, src)[:-1] + ":"
    else:
        raise DataError(
            f"no {_IMG_DIR}/ folder with images and no {img_zip.name} in {root / 'Img'}"
        )
    names, attrs = _parse_attr_txt(_read_text(attr_file), str(attr_file))
    parts = _parse_partition(_read_text(part_file), str(part_file), None)
    return _celeba_source(
        src,
        kind,
        ref,
        files,
        lambda member: prefix + member,
        names,
        attrs,
        str(attr_file),
        parts,
        str(part_file),
    )


def _open_folder(src: Path, labels: str = "none") -> Source:
    found: list[tuple[str, str]] = []  # (relative posix path, stamp)
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not _is_image(name):
                continue
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            found.append((Path(full).relative_to(src).as_posix(), f"{st.st_size}:{st.st_mtime_ns}"))
    if not found:
        zips = sorted(p.name for p in src.glob("*.zip"))
        hint = f" (found {', '.join(zips)}: pass the zip itself)" if zips else ""
        raise DataError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) under {src}{hint}")
    found.sort()
    names, attrs = ((), {})
    if labels == "subfolders":
        names, attrs = _subfolder_labels(src, [rel for rel, _ in found])
    # Key = file stem; where two files share a stem (a/x.jpg, b/x.png) use the relative path.
    stems = Counter(_key(PurePosixPath(rel).name) for rel, _ in found)
    samples = []
    for rel, stamp in found:
        key = _key(PurePosixPath(rel).name)
        if stems[key] > 1:
            key = _key(rel.replace("/", "_"))
        samples.append(Sample(key, rel, rel, 0, attrs.get(rel), stamp))
    dup = [k for k, n in Counter(s.key for s in samples).items() if n > 1]
    if dup:
        raise DataError(f"two images in {src} map to the same key {dup[0]!r}; rename one")
    samples.sort(key=lambda s: s.key)
    return Source(src, "folder", ReaderRef(str(src), False), names, tuple(samples), labels)


def _subfolder_labels(src: Path, rels: list[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """(sorted class names, {relative path: one-hot `0`/`1` string}): an image's class is the
    first folder of its path below `src` (`cats/x.png` and `cats/old/y.png` are both `cats`)."""
    loose = next((rel for rel in rels if "/" not in rel), None)
    if loose is not None:
        raise DataError(
            f"{src / loose}: image directly in {src}, not in a class subfolder "
            "(--labels subfolders takes each image's first-level folder as its class)"
        )
    names = tuple(sorted({rel.split("/", 1)[0] for rel in rels}))
    index = {name: i for i, name in enumerate(names)}
    zeros = "0" * len(names)
    attrs = {}
    for rel in rels:
        i = index[rel.split("/", 1)[0]]
        attrs[rel] = zeros[:i] + "1" + zeros[i + 1 :]
    return names, attrs


def _celeba_source(
    src: Path,
    kind: str,
    ref: ReaderRef,
    files: dict[str, tuple[str, str]],  # file name -> (member, stamp)
    display,
    names: tuple[str, ...],
    attrs: dict[str, str],
    attr_label: str,
    parts: dict[str, int],
    part_label: str,
) -> Source:
    if not files:
        raise DataError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {src}")
    if names != ATTRIBUTE_NAMES:
        i = next(
            (i for i, (a, b) in enumerate(zip(names, ATTRIBUTE_NAMES, strict=False)) if a != b),
            None,
        )
        detail = (
            f"column {i + 1} is {names[i]!r}, expected {ATTRIBUTE_NAMES[i]!r}"
            if i is not None
            else f"{len(names)} names, expected {len(ATTRIBUTE_NAMES)}"
        )
        raise DataError(f"{attr_label}: not CelebA's 40 attribute names ({detail})")
    _check_ids(attrs.keys(), files.keys(), attr_label)
    _check_ids(parts.keys(), files.keys(), part_label)
    samples = []
    for name in sorted(files):
        member, stamp = files[name]
        samples.append(Sample(_key(name), member, display(member), parts[name], attrs[name], stamp))
    dup = [k for k, n in Counter(s.key for s in samples).items() if n > 1]
    if dup:
        raise DataError(f"two images in {src} map to the same key {dup[0]!r}")
    samples.sort(key=lambda s: s.key)
    return Source(src, kind, ref, names, tuple(samples))


# ----------------------------------------------------------------------------- annotation files


def _parse_attr_csv(text: str, label: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """Kaggle `list_attr_celeba.csv`: header `image_id,<40 names>`, rows `000001.jpg,-1,1,...`."""
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if not header or len(header) < 2:
        raise DataError(f"{label}: missing header line `image_id,<attribute names>`")
    names = tuple(h.strip() for h in header[1:])
    attrs: dict[str, str] = {}
    for lineno, row in enumerate(rows, start=2):
        if not row:
            continue
        _add_attr_row(attrs, row[0].strip(), row[1:], len(names), label, lineno)
    return names, attrs


def _parse_attr_txt(text: str, label: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """Official `list_attr_celeba.txt`: count, the names, then `000001.jpg  -1  1 ...` rows."""
    lines = text.splitlines()
    if len(lines) < 2:
        raise DataError(f"{label}: expected a count line and an attribute-names line")
    names = tuple(lines[1].split())
    if not names:
        raise DataError(f"{label}: line 2 must list the attribute names")
    attrs: dict[str, str] = {}
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if parts:
            _add_attr_row(attrs, parts[0], parts[1:], len(names), label, lineno)
    return names, attrs


def _add_attr_row(
    attrs: dict[str, str], image_id: str, values: list[str], n: int, label: str, lineno: int
) -> None:
    # Values are `-1`/`1` (some copies use 0 for negative): join, then map -1 -> 0 in one pass.
    bits = "".join(values).replace("-1", "0")
    if len(bits) != n and len(values) == n:  # padded fields (" 1"): the slow path
        bits = "".join(v.strip() for v in values).replace("-1", "0")
    if len(values) != n or len(bits) != n or bits.strip("01"):
        raise DataError(
            f"{label} line {lineno}: expected {n} values of -1/1 for {image_id}, "
            f"got {' '.join(values[:3])}{' ...' if len(values) > 3 else ''}"
        )
    if image_id in attrs:
        raise DataError(f"{label} line {lineno}: duplicate row for {image_id}")
    attrs[image_id] = bits


def _parse_partition(text: str, label: str, sep: str | None) -> dict[str, int]:
    """`list_eval_partition.csv` (`image_id,partition` header) or `.txt` (`000001.jpg 0`)."""
    parts: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = [f.strip() for f in (line.split(sep) if sep else line.split())]
        if not fields or fields == [""]:
            continue
        if lineno == 1 and fields[0] == "image_id":
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"{label} line {lineno}: expected `<image> <0|1|2>`, got {line!r}")
        if fields[0] in parts:
            raise DataError(f"{label} line {lineno}: duplicate row for {fields[0]}")
        parts[fields[0]] = int(fields[1])
    return parts


def _check_ids(listed: Iterable[str], images: Iterable[str], label: str) -> None:
    listed, images = set(listed), set(images)
    orphans = sorted(listed - images)
    if orphans:
        raise DataError(
            f"{label} lists {len(orphans)} image(s) that do not exist (first: {orphans[0]}); "
            "is the image folder incomplete?"
        )
    missing = sorted(images - listed)
    if missing:
        raise DataError(f"{label} has no row for {len(missing)} image(s) (first: {missing[0]})")


# ----------------------------------------------------------------------------- helpers


def _key(filename: str) -> str:
    """Image id -> WebDataset key: drop the extension, `.` -> `_` (keys split at the first dot)."""
    stem = filename.rsplit(".", 1)[0] if "." in filename else filename
    return stem.replace(".", "_")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _junk(member: str) -> bool:
    return member.startswith("__MACOSX/") or posixpath.basename(member).startswith("._")


def _shortest(members: list[str] | None) -> str | None:
    return min(members, key=lambda m: (m.count("/"), m)) if members else None


def _zip_images(infos: list[zipfile.ZipInfo]) -> dict[str, tuple[str, str]]:
    """{file name: (member, stamp)} of the images in the zip's image folder."""
    split = [posixpath.split(i.filename) + (i,) for i in infos if _is_image(i.filename)]
    chosen = _pick_image_dir([d for d, _, _ in split])
    return {n: (i.filename, f"{i.CRC:08x}:{i.file_size}") for d, n, i in split if d == chosen}


def _pick_image_dir(dirs: list[str]) -> str | None:
    """The folder holding the images: the `img_align_celeba` folder with most images, else the
    folder with most images (a zip or tree may hold stray images elsewhere)."""
    if not dirs:
        return None
    counts = Counter(dirs)
    named = {d: n for d, n in counts.items() if posixpath.basename(d) == _IMG_DIR}
    pool = named or counts
    return max(sorted(pool), key=lambda d: pool[d])


def _find_image_dir(root: Path) -> Path | None:
    """`img_align_celeba/` (or nested `img_align_celeba/img_align_celeba/`) below `root`."""
    best, best_n = None, 0
    for depth_dirs in (
        [root / _IMG_DIR],
        [root / _IMG_DIR / _IMG_DIR],
        sorted(root.glob(f"*/{_IMG_DIR}")),
        sorted(root.glob(f"*/{_IMG_DIR}/{_IMG_DIR}")),
    ):
        for d in depth_dirs:
            if d.is_dir():
                n = sum(1 for e in os.scandir(d) if e.is_file() and _is_image(e.name))
                if n > best_n:
                    best, best_n = d, n
    return best


def _scan_flat(img_dir: Path) -> dict[str, tuple[str, str]]:
    files = {}
    for entry in os.scandir(img_dir):
        if entry.is_file() and _is_image(entry.name) and not entry.name.startswith("."):
            st = entry.stat()
            files[entry.name] = (entry.name, f"{st.st_size}:{st.st_mtime_ns}")
    return files


def _find_up_to(path: Path, pred) -> Path | None:
    """`path` itself or a folder up to _SEARCH_DEPTH levels below it satisfying `pred`."""
    level = [path]
    for _ in range(_SEARCH_DEPTH + 1):
        for d in level:
            if pred(d):
                return d
        nxt = []
        for d in level:
            try:
                nxt += sorted(
                    Path(e.path)
                    for e in os.scandir(d)
                    if e.is_dir() and not e.name.startswith(".") and e.name != _IMG_DIR
                )
            except OSError:
                continue
        level = nxt
    return None


def _rel_prefix(target: Path, src: Path) -> str:
    rel = target.relative_to(src).as_posix()
    return "" if rel == "." else rel + "/"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _zip_text(zf: zipfile.ZipFile, member: str) -> str:
    try:
        return zf.read(member).decode("utf-8-sig")
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {member} in {zf.filename}: {exc}") from None
