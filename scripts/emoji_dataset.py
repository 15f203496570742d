"""Build a small, real, labelled colour image set from emoji graphics on a package registry.

Source: the npm packages `emoji-datasource-twitter@16.0.0` and `emoji-datasource-google@16.0.0`
(https://github.com/iamcal/emoji-data). Each tarball holds `package/img/<set>/64/*.png` (64x64
RGBA) and `package/emoji.json` (each emoji's image file, category and skin-tone variations; a
variation inherits its parent's category).

Licences: Twemoji graphics (twitter) CC-BY 4.0, Noto Emoji graphics (google) Apache 2.0; the
package code and metadata (emoji.json) MIT, Copyright (c) 2013 Cal Henderson. OUT/LICENSES.txt
repeats this with links, and says what was changed (composited onto a background).

    python scripts/emoji_dataset.py OUT [--sets twitter,google] [--tarball-dir DIR]
                                        [--background black]

writes OUT/<category-slug>/<set>-<image>.png (64x64 RGB) for every emoji image except the
"Component" category (bare skin-tone and hair swatches), OUT/LICENSES.txt and OUT/dataset.json
(counts per category and per set). Missing tarballs are fetched with `npm pack` into
--tarball-dir. The tarballs are read in place; the output is a pure function of the tarballs and
the flags. Then, e.g.:

    facegan shard OUT --out shards/emoji64 --size 64 --crop none --labels subfolders --format png
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image, ImageColor

VERSION = "16.0.0"
SIDE = 64
SKIP_CATEGORIES = {"Component"}
IMAGE_LICENCES = {
    "twitter": "Twemoji graphics, Copyright Twitter, Inc and other contributors: CC-BY 4.0, "
    "https://creativecommons.org/licenses/by/4.0/ (https://github.com/jdecked/twemoji)",
    "google": "Noto Emoji graphics, Copyright Google Inc.: Apache License 2.0, "
    "https://www.apache.org/licenses/LICENSE-2.0 (https://github.com/googlefonts/noto-emoji)",
}
LICENSE = "package/LICENSE"  # the package's MIT licence, copied into OUT/LICENSES.txt
DEFAULT_TARBALL_DIR = Path.home() / ".cache" / "facegan" / "emoji"


class Failure(Exception):
    """A one-line reason to stop (printed as `error: ...`, exit 1)."""


def package(emoji_set: str) -> str:
    return f"emoji-datasource-{emoji_set}"


def slug(category: str) -> str:
    """'Smileys & Emotion' -> 'smileys-emotion'."""
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")


def tarball(emoji_set: str, folder: Path) -> Path:
    """The npm tarball of one set in `folder`, fetched with `npm pack` when it is not there."""
    path = folder / f"{package(emoji_set)}-{VERSION}.tgz"
    if path.is_file():
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise Failure(f"{path} is missing and npm is not installed to fetch it (npm pack)")
    folder.mkdir(parents=True, exist_ok=True)
    spec = f"{package(emoji_set)}@{VERSION}"
    print(f"fetching {spec} into {folder} (npm pack)", flush=True)
    done = subprocess.run([npm, "pack", spec], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Failure(f"npm pack {spec} failed in {folder}: {last}")
    return path


def read_set(emoji_set: str, path: Path) -> tuple[dict[str, tuple[str, bytes]], str]:
    """({image file name: (category, PNG bytes)}, package LICENSE text) of one tarball, read in a
    single pass."""
    prefix = f"package/img/{emoji_set}/{SIDE}/"
    pngs: dict[str, bytes] = {}
    meta: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                if member.name.startswith(prefix) and member.name.endswith(".png"):
                    pngs[member.name[len(prefix) :]] = tf.extractfile(member).read()
                elif member.name in ("package/emoji.json", "package/package.json", LICENSE):
                    meta[member.name] = tf.extractfile(member).read()
        info = json.loads(meta["package/package.json"])
        emoji = json.loads(meta["package/emoji.json"])
        licence = meta[LICENSE].decode()
    except (OSError, tarfile.TarError, EOFError, KeyError, ValueError) as exc:
        raise Failure(f"{path}: not a readable {package(emoji_set)} tarball ({exc})") from None
    if (info.get("name"), info.get("version")) != (package(emoji_set), VERSION):
        raise Failure(f"{path}: holds {info.get('name')}@{info.get('version')}, expected "
                      f"{package(emoji_set)}@{VERSION}")  # fmt: skip
    has = f"has_img_{emoji_set}"
    images: dict[str, tuple[str, bytes]] = {}
    for entry in emoji:
        for item in [entry, *(entry.get("skin_variations") or {}).values()]:
            if item.get(has) and entry["category"] not in SKIP_CATEGORIES:
                if item["image"] not in pngs:
                    raise Failure(f"{path}: emoji.json lists {item['image']}, not in {prefix}")
                images[item["image"]] = (entry["category"], pngs[item["image"]])
    return images, licence


def flatten(png: bytes, background: tuple[int, int, int]) -> Image.Image:
    """RGBA (or palette + transparency) emoji -> RGB, alpha-composited onto `background`."""
    im = Image.open(io.BytesIO(png)).convert("RGBA")
    if im.size != (SIDE, SIDE):
        im = im.resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    return Image.alpha_composite(Image.new("RGBA", im.size, (*background, 255)), im).convert("RGB")


def write_licences(out: Path, sets: list[str], package_licence: str) -> None:
    lines = [
        f"Emoji images from the npm packages emoji-datasource-<set>@{VERSION}",
        "(https://github.com/iamcal/emoji-data), alpha-composited onto a solid background",
        "and saved as RGB PNG by facegan_dist scripts/emoji_dataset.py.",
        "",
        "Image licences (as the package README states):",
        *(f"- {s}: {IMAGE_LICENCES[s]}" for s in sets),
        "",
        "Package code and metadata (emoji.json, used for the category labels): MIT.",
        "",
        package_licence.strip(),
        "",
    ]
    (out / "LICENSES.txt").write_text("\n".join(lines), encoding="utf-8")


def build(out: Path, sets: list[str], tarball_dir: Path, background: str) -> dict:
    try:
        rgb = ImageColor.getrgb(background)[:3]
    except ValueError:
        raise Failure(f"--background {background!r} is not a colour name or #rrggbb") from None
    paths = {s: tarball(s, tarball_dir) for s in sets}
    by_category: Counter[str] = Counter()
    by_set: Counter[str] = Counter()
    for s in sets:
        images, package_licence = read_set(s, paths[s])
        for name, (category, png) in sorted(images.items()):
            folder = out / slug(category)
            folder.mkdir(parents=True, exist_ok=True)
            flatten(png, rgb).save(folder / f"{s}-{name}", "PNG", compress_level=6)
            by_category[slug(category)] += 1
            by_set[s] += 1
    write_licences(out, sets, package_licence)
    summary = {
        "source": {s: f"{package(s)}@{VERSION}" for s in sets},
        "size": SIDE,
        "background": background,
        "total": sum(by_set.values()),
        "per_set": dict(sorted(by_set.items())),
        "per_category": dict(sorted(by_category.items())),
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (one subfolder per category)")
    p.add_argument("--sets", default="twitter,google", help="comma-separated: twitter, google")
    p.add_argument(
        "--tarball-dir",
        type=Path,
        default=DEFAULT_TARBALL_DIR,
        help=f"npm tarballs are read (or fetched) here; default {DEFAULT_TARBALL_DIR}",
    )
    p.add_argument("--background", default="black", help="colour under the transparent pixels")
    args = p.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    try:
        unknown = [s for s in sets if s not in IMAGE_LICENCES]
        if unknown or not sets:
            raise Failure(f"--sets {args.sets!r}: choose from {', '.join(IMAGE_LICENCES)}")
        summary = build(args.out, sets, args.tarball_dir.expanduser(), args.background)
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for category, n in summary["per_category"].items():
        print(f"  {category:<18} {n:>6}")
    per_set = ", ".join(f"{s} {n}" for s, n in summary["per_set"].items())
    print(f"{summary['total']} images ({per_set}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
