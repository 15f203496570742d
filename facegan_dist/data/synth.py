"""`facegan synth`: a deterministic cartoon-face dataset laid out exactly like CelebA.

Why: every other command (shard, train, sample, evaluate) can be demonstrated and tested in
seconds without the 1.4 GB download, and the files are laid out like the real ones, so the
readers exercised by tests are the same code that reads real CelebA.

What one image is. A 178x218 RGB JPEG (quality 90), like `img_align_celeba`: a cartoon face drawn
with PIL at 2x and box-downsampled (anti-aliased), centred near (89, 121) with the eyes, nose
and mouth corners at CelebA's mean aligned landmarks ((69,111) (108,111) (88,136) (72,152)
(105,152)), so the 128x128 "celeba" crop centred at (89,121) frames it like a real face. Small
per-image variation (position +-3.5 px, scale +-7%, background, skin tone, clothes) gives a GAN
something to learn. Image `n` is a pure function of (seed, n): it draws from its own
`random.Random` seeded with both, never from global RNG state, so the bytes do not depend on
--workers, chunking or --count (a 60-image set is the prefix of a 2000-image set).

Attributes drawn so that the labels can be seen (and are checked from pixels in the tests):
Smiling (upturned mouth; closed = curved line, open = D-shaped grin) vs straight mouth / round
"o"; Mouth_Slightly_Open (dark open mouth); Eyeglasses (thick dark rims + bridge; a fifth are
sunglasses); Male (short hair, squarer jaw, possible facial hair) vs long hair falling beside the
face; Black_Hair / Blond_Hair / Brown_Hair / Gray_Hair (exactly one hair colour is labelled, also
for the bald, whose side fringe shows it); Wearing_Hat (a saturated `HAT_COLORS` crown covering
the top of the head); Pale_Skin (very light skin vs a range of tan to dark tones). Also drawn:
Bald, Bangs, Receding_Hairline, 5_o_Clock_Shadow (jaw shadow), Goatee, Mustache, No_Beard,
Sideburns, Wearing_Lipstick, Heavy_Makeup (eye shadow), Rosy_Cheeks, Bags_Under_Eyes,
Narrow_Eyes, Bushy_Eyebrows, Arched_Eyebrows, Big_Lips, Big_Nose, Chubby, Double_Chin,
Oval_Face, Young (no age lines), Wavy_Hair / Straight_Hair (long hair outline),
Wearing_Earrings, Wearing_Necklace, Wearing_Necktie, Blurry (Gaussian blur). Attractive,
High_Cheekbones (tied to Smiling) and Pointy_Nose are labels with little or no drawing.

Prevalence is roughly CelebA's (Smiling ~48%, Male ~42%, Young ~77%, No_Beard ~85%, Blond ~16%,
Black ~26%) except three rare attributes raised so that a 30-60 image demo set contains them:
Eyeglasses 15% (CelebA 6.5%), Wearing_Hat 15% (4.8%), Pale_Skin 15% (4.3%).

Files (see `make_dataset`): the Kaggle layout (`img_align_celeba/img_align_celeba/*.jpg` + 4 CSVs,
or the same tree in `archive.zip`) or the official one (`Img/img_align_celeba[.zip]`, `Anno/*.txt`,
`Eval/list_eval_partition.txt`). Partitions follow CelebA's proportions in id order (first 80.3%
train, then 9.8% val, then test). `list_bbox_celeba` holds the drawn head's box in aligned-image
coordinates (the real file's boxes refer to the unaligned in-the-wild images, which we don't draw).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import shutil
import time
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from facegan_dist.config import SynthConfig
from facegan_dist.data.attributes import (
    ATTRIBUTE_NAMES,
    BBOX_COLUMNS,
    LANDMARK_COLUMNS,
    PARTITION_NAMES,
    partition_by_order,
)
from facegan_dist.errors import DataError
from facegan_dist.paths import atomic_write_text
from facegan_dist.progress import track

__all__ = [
    "ATTRIBUTE_NAMES",
    "DRAWN_ATTRIBUTES",
    "HAT_COLORS",
    "IMAGE_SIZE",
    "Record",
    "make_dataset",
    "render_image",
]

SYNTH_VERSION = 1  # bump when the drawing changes: a stamp of another version is not "the same"
IMAGE_SIZE = (178, 218)  # (width, height) of CelebA's aligned images
JPEG_QUALITY = 90
STAMP_NAME = ".facegan-synth.json"  # written last: its presence means the dataset is complete
PARTIAL_NAME = (
    ".facegan-synth.partial"  # staging folder inside --out, renamed into place at the end
)
ZIP_DATE = (2015, 9, 28, 0, 0, 0)  # fixed member timestamps -> byte-identical zips across runs
CHUNK_IMAGES = 64  # ids per worker task

# The attributes whose drawing agrees with the label (others are labels with light or no drawing).
DRAWN_ATTRIBUTES: tuple[str, ...] = (
    "Smiling",
    "Mouth_Slightly_Open",
    "Eyeglasses",
    "Male",
    "Black_Hair",
    "Blond_Hair",
    "Brown_Hair",
    "Gray_Hair",
    "Wearing_Hat",
    "Pale_Skin",
    "Bald",
    "Bangs",
    "No_Beard",
    "Wearing_Lipstick",
    "Young",
)

RGB = tuple[int, int, int]
# Saturated hat crowns, far from every hair colour and skin tone (the tests rely on that).
HAT_COLORS: tuple[RGB, ...] = (
    (205, 30, 45),  # red
    (35, 70, 205),  # blue
    (30, 145, 65),  # green
    (125, 45, 170),  # purple
    (0, 150, 160),  # teal
    (245, 205, 0),  # yellow
)
_HAIR: dict[str, RGB] = {
    "black": (28, 24, 24),
    "blond": (232, 200, 118),
    "brown": (112, 70, 40),
    "gray": (168, 168, 170),
}
_HAIR_LABEL = {
    "black": "Black_Hair",
    "blond": "Blond_Hair",
    "brown": "Brown_Hair",
    "gray": "Gray_Hair",
}
_PALE_SKIN: RGB = (250, 237, 227)
_SKIN_LIGHT: RGB = (226, 186, 152)  # lightest non-pale tone
_SKIN_DARK: RGB = (112, 74, 50)  # darkest tone
_IRIS: tuple[RGB, ...] = ((70, 45, 25), (40, 90, 150), (60, 110, 60), (30, 25, 20))
_LIPSTICK: tuple[RGB, ...] = ((200, 25, 50), (180, 20, 80), (215, 60, 90), (150, 20, 40))
_EYESHADOW: tuple[RGB, ...] = ((120, 70, 150), (70, 100, 170), (150, 90, 60), (60, 60, 70))
_TIE: tuple[RGB, ...] = ((150, 20, 30), (20, 40, 110), (30, 90, 50), (60, 60, 60))
_METAL: tuple[RGB, ...] = ((230, 190, 50), (205, 205, 215))

_K = 2  # draw at 2x, then box-downsample: cheap anti-aliasing

# One image's annotation row: (id number, 40 labels in {-1, 1}, bbox (x, y, w, h),
# landmarks (10 ints, LANDMARK_COLUMNS order), JPEG bytes).
Record = tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...], bytes]


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _sample_labels(rng: random.Random) -> dict[str, bool]:
    """40 attributes with CelebA-like prevalence and the obvious dependencies between them."""
    p = rng.random
    male = p() < 0.42
    young = p() < 0.77
    lab = dict.fromkeys(ATTRIBUTE_NAMES, False)
    lab["Male"], lab["Young"] = male, young
    lab["Bald"] = male and p() < (0.03 if young else 0.14)
    lab["Receding_Hairline"] = not lab["Bald"] and p() < (0.06 if young else 0.2)
    lab["Wearing_Hat"] = p() < 0.15
    lab["Eyeglasses"] = p() < (0.12 if young else 0.25)
    lab["Pale_Skin"] = p() < 0.15

    # Exactly one hair colour label per image.
    if lab["Bald"]:
        weights = {"black": 0.25, "blond": 0.0, "brown": 0.35, "gray": 0.4}
    elif male:
        weights = {"black": 0.32, "blond": 0.05, "brown": 0.5, "gray": 0.05 if young else 0.35}
    else:
        weights = {"black": 0.23, "blond": 0.25, "brown": 0.5, "gray": 0.01 if young else 0.2}
    hair = rng.choices(list(weights), weights=list(weights.values()))[0]
    lab[_HAIR_LABEL[hair]] = True

    lab["Bangs"] = not lab["Bald"] and p() < (0.06 if male else 0.23)
    if male:
        lab["Straight_Hair"] = not lab["Bald"] and p() < 0.25
        lab["Wavy_Hair"] = not lab["Bald"] and not lab["Straight_Hair"] and p() < 0.15
    else:
        lab["Wavy_Hair"] = p() < 0.5
        lab["Straight_Hair"] = not lab["Wavy_Hair"] and p() < 0.6

    lab["Smiling"] = p() < 0.48
    lab["Mouth_Slightly_Open"] = p() < (0.7 if lab["Smiling"] else 0.25)
    lab["High_Cheekbones"] = p() < (0.8 if lab["Smiling"] else 0.12)

    beard = "none"
    if male:
        beard = rng.choices(
            ["none", "stubble", "goatee", "mustache", "goatee+mustache"],
            weights=[0.6, 0.2, 0.09, 0.04, 0.07],
        )[0]
    lab["5_o_Clock_Shadow"] = beard == "stubble"
    lab["Goatee"] = "goatee" in beard
    lab["Mustache"] = "mustache" in beard
    lab["No_Beard"] = beard == "none"
    lab["Sideburns"] = male and not lab["Bald"] and p() < 0.13

    lab["Wearing_Lipstick"] = not male and p() < 0.8
    lab["Heavy_Makeup"] = lab["Wearing_Lipstick"] and p() < 0.8
    lab["Arched_Eyebrows"] = p() < (0.05 if male else 0.42)
    lab["Bushy_Eyebrows"] = p() < (0.25 if male else 0.06)
    lab["Narrow_Eyes"] = p() < 0.115
    lab["Bags_Under_Eyes"] = p() < (0.14 if young else 0.45)
    lab["Big_Lips"] = p() < 0.24
    lab["Big_Nose"] = p() < (0.4 if male else 0.11)
    lab["Pointy_Nose"] = not lab["Big_Nose"] and p() < 0.33
    lab["Chubby"] = p() < (0.1 if male else 0.025)
    lab["Double_Chin"] = p() < (0.025 if young else 0.12)
    lab["Oval_Face"] = not lab["Chubby"] and p() < 0.28
    lab["Rosy_Cheeks"] = not male and p() < 0.11
    lab["Wearing_Earrings"] = not male and p() < 0.32
    lab["Wearing_Necklace"] = not male and p() < 0.2
    lab["Wearing_Necktie"] = male and p() < 0.17
    lab["Blurry"] = p() < 0.05
    lab["Attractive"] = p() < ((0.4 if male else 0.72) if young else 0.2)
    return lab


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def _shade(c: RGB, f: float) -> RGB:
    return (min(255, round(c[0] * f)), min(255, round(c[1] * f)), min(255, round(c[2] * f)))


def _jitter(rng: random.Random, c: RGB, amount: int) -> RGB:
    return (
        max(0, min(255, c[0] + rng.randint(-amount, amount))),
        max(0, min(255, c[1] + rng.randint(-amount, amount))),
        max(0, min(255, c[2] + rng.randint(-amount, amount))),
    )


class _Canvas:
    """ImageDraw in final-image coordinates, rendered at `_K`x."""

    def __init__(self, bg: RGB) -> None:
        self.img = Image.new("RGB", (IMAGE_SIZE[0] * _K, IMAGE_SIZE[1] * _K), bg)
        self.d = ImageDraw.Draw(self.img)

    @staticmethod
    def _xy(*v: float) -> list[float]:
        return [x * _K for x in v]

    @staticmethod
    def _w(width: float) -> int:
        return max(1, round(width * _K))

    def ellipse(self, box, fill=None, outline=None, width=1.0) -> None:
        self.d.ellipse(self._xy(*box), fill=fill, outline=outline, width=self._w(width))

    def chord(self, box, start, end, fill) -> None:
        self.d.chord(self._xy(*box), start, end, fill=fill)

    def arc(self, box, start, end, fill, width=1.0) -> None:
        self.d.arc(self._xy(*box), start, end, fill=fill, width=self._w(width))

    def rect(self, box, fill, radius=0.0) -> None:
        self.d.rounded_rectangle(self._xy(*box), radius=radius * _K, fill=fill)

    def polygon(self, pts, fill) -> None:
        self.d.polygon([(x * _K, y * _K) for x, y in pts], fill=fill)

    def line(self, pts, fill, width=1.0) -> None:
        self.d.line(
            [(x * _K, y * _K) for x, y in pts], fill=fill, width=self._w(width), joint="curve"
        )

    def circle(self, x, y, r, fill) -> None:
        self.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    def image(self) -> Image.Image:
        return self.img.reduce(_K)


def _background(rng: random.Random, avoid: tuple[RGB, ...]) -> RGB:
    """A muted, clearly coloured backdrop (saturation >= 0.3 keeps it apart from gray hair),
    redrawn until it is far from the hair and skin colours so the head outline stays visible."""
    import colorsys

    for _ in range(50):
        h, sat, v = rng.random(), rng.uniform(0.3, 0.55), rng.uniform(0.55, 0.92)
        bg = tuple(round(x * 255) for x in colorsys.hsv_to_rgb(h, sat, v))
        if all(math.dist(bg, c) > 90 for c in avoid):
            break
    return bg  # type: ignore[return-value]


def _draw(rng: random.Random, lab: dict[str, bool]) -> tuple[Image.Image, list[int], list[int]]:
    """Draw one face for labels `lab`; returns (image, bbox, landmarks) in final coordinates."""
    male = lab["Male"]
    s = rng.uniform(0.93, 1.07)  # overall scale
    cx = 89 + rng.uniform(-3.5, 3.5)  # face centre (CelebA aligned: ~(89, 121))
    cy = 121 + rng.uniform(-3.5, 3.5)
    a = 44 * s  # face half-width
    b = 58 * s  # face half-height
    if lab["Chubby"]:
        a *= 1.1
    if lab["Oval_Face"]:
        a, b = a * 0.95, b * 1.04
    if not male:
        a *= 0.96
    ey = cy - 10 * s  # eye line
    ex_l, ex_r = cx - 19 * s, cx + 19 * s  # eye centres
    nose_y = cy + 15 * s  # nose tip
    my = cy + 31 * s  # mouth line
    hw = 16.5 * s  # mouth half-width
    brow_y = ey - 11 * s
    top = cy - b  # top of the skull

    # Colours.
    if lab["Pale_Skin"]:
        skin = _jitter(rng, _PALE_SKIN, 4)
    else:
        skin = _jitter(rng, _mix(_SKIN_LIGHT, _SKIN_DARK, rng.random() ** 0.8), 6)
    hair_name = next(n for n, label in _HAIR_LABEL.items() if lab[label])
    hair = _jitter(rng, _HAIR[hair_name], 12)
    brow = _shade(hair, 0.7) if hair_name in ("blond", "gray") else _shade(hair, 0.9)
    bg = _background(rng, (hair, skin))
    clothes = _jitter(
        rng,
        rng.choice(
            (
                (40, 40, 60),
                (200, 200, 205),
                (90, 30, 40),
                (30, 80, 120),
                (70, 110, 70),
                (150, 120, 90),
            )
        ),
        15,
    )
    skin_dark = _shade(skin, 0.8)
    lip = (
        _jitter(rng, rng.choice(_LIPSTICK), 10)
        if lab["Wearing_Lipstick"]
        else _shade(_mix(skin, (120, 30, 45), 0.55), 0.68)
    )
    mouth_dark = (55, 15, 22)
    c = _Canvas(bg)

    # Long hair behind the head (women): straight, wavy or plain outline.
    if not male:
        hx0, hx1 = cx - a - 14 * s, cx + a + 14 * s
        hy0, hy1 = top - 13 * s, cy + b * rng.uniform(0.75, 1.15)
        if lab["Wavy_Hair"]:
            c.rect((hx0 + 4, hy0, hx1 - 4, hy1), hair, radius=30 * s)
            for t in range(7):
                y = hy0 + 40 * s + t * (hy1 - hy0 - 40 * s) / 6
                r = 7 * s
                off = (t % 2) * 4 * s
                c.circle(hx0 + 3 + off, y, r, hair)
                c.circle(hx1 - 3 - off, y, r, hair)
        else:
            c.rect((hx0, hy0, hx1, hy1), hair, radius=(34 if lab["Straight_Hair"] else 24) * s)

    # Neck, shoulders, tie / necklace.
    c.rect((cx - 17 * s, cy + 0.5 * b, cx + 17 * s, IMAGE_SIZE[1] + 2), _shade(skin, 0.88))
    c.ellipse((cx - 95, cy + b + 10 * s, cx + 95, cy + b + 150), fill=clothes)
    if lab["Wearing_Necktie"]:
        yc = cy + b + 10 * s
        c.polygon([(cx - 17 * s, yc), (cx, yc + 16 * s), (cx + 17 * s, yc)], (245, 245, 245))
        tie = _jitter(rng, rng.choice(_TIE), 10)
        c.polygon(
            [
                (cx - 5 * s, yc + 8 * s),
                (cx + 5 * s, yc + 8 * s),
                (cx + 3 * s, yc + 15 * s),
                (cx - 3 * s, yc + 15 * s),
            ],
            tie,
        )
        c.polygon(
            [
                (cx - 3 * s, yc + 15 * s),
                (cx + 3 * s, yc + 15 * s),
                (cx + 9 * s, IMAGE_SIZE[1] + 2),
                (cx - 9 * s, IMAGE_SIZE[1] + 2),
            ],
            tie,
        )
    if lab["Wearing_Necklace"]:
        c.arc(
            (cx - 21 * s, cy + b - 12 * s, cx + 21 * s, cy + b + 16 * s),
            15,
            165,
            rng.choice(_METAL),
            width=2.5,
        )

    # Ears (+ earrings), then the face; men get a squarer jaw.
    for side in (-1, 1):
        ear_x = cx + side * a
        c.ellipse(
            (ear_x - 6 * s, ey - 3 * s, ear_x + 6 * s, nose_y + 3 * s), fill=_shade(skin, 0.92)
        )
        if lab["Wearing_Earrings"]:
            c.circle(ear_x + side * 1 * s, nose_y + 7 * s, 3.2 * s, rng.choice(_METAL))
    c.ellipse((cx - a, top, cx + a, cy + b), fill=skin)
    if male:
        c.rect((cx - 0.9 * a, cy - 0.1 * b, cx + 0.9 * a, cy + b), skin, radius=0.42 * a)

    # Jaw shadow (5 o'clock) and double chin sit on the skin, below everything else.
    if lab["5_o_Clock_Shadow"]:
        shadow = _mix(skin, (70, 70, 80), 0.28)
        c.chord((cx - a, top, cx + a, cy + b), 20, 160, shadow)
        c.rect((cx - 0.9 * a, my - 4 * s, cx + 0.9 * a, cy + b), shadow, radius=0.42 * a)
    if lab["Double_Chin"]:
        c.arc((cx - 15 * s, cy + b - 9 * s, cx + 15 * s, cy + b + 1 * s), 20, 160, skin_dark, 2)

    # Hair on the head: a cap down to the temples, the forehead cut out unless there are bangs;
    # the bald keep a fringe over the ears.
    temple_y = brow_y - 4 * s
    if lab["Bald"]:
        for side in (-1, 1):
            x = cx + side * a
            c.chord((x - 9 * s, ey - 22 * s, x + 9 * s, ey + 6 * s), 0, 360, hair)
    else:
        cap_top = top - 12 * s
        c.chord((cx - a - 5 * s, cap_top, cx + a + 5 * s, 2 * temple_y - cap_top), 180, 360, hair)
        if not lab["Bangs"]:
            hairline = cy - (0.78 if lab["Receding_Hairline"] else 0.6) * b
            fw = (0.66 if lab["Receding_Hairline"] else 0.72) * a
            c.ellipse((cx - fw, hairline, cx + fw, cy + 0.35 * b), fill=skin)
        if male:
            low = (my - 6 * s) if lab["Sideburns"] else (ey - 2 * s)
            for side in (-1, 1):
                x0, x1 = sorted((cx + side * (a + 2 * s), cx + side * (a - 7 * s)))
                c.rect((x0, temple_y - 4 * s, x1, low), hair, radius=3 * s)

    # Rosy cheeks, age lines.
    if lab["Rosy_Cheeks"]:
        for ex in (ex_l, ex_r):
            c.circle(ex + (ex - cx) * 0.15, cy + 16 * s, 7.5 * s, _mix(skin, (235, 90, 110), 0.45))
    if not lab["Young"]:
        for side in (-1, 1):
            c.line(
                [(cx + side * 10 * s, nose_y - 4 * s), (cx + side * (hw + 4 * s), my + 3 * s)],
                skin_dark,
                1.5,
            )

    # Eyes: eye shadow, whites, iris, lid, bags.
    ry = 2.8 * s if lab["Narrow_Eyes"] else 5 * s
    iris = rng.choice(_IRIS)
    shadow_col = rng.choice(_EYESHADOW)
    for ex in (ex_l, ex_r):
        if lab["Heavy_Makeup"]:
            c.ellipse((ex - 10 * s, ey - ry - 6 * s, ex + 10 * s, ey + 1 * s), fill=shadow_col)
        c.ellipse((ex - 8.5 * s, ey - ry, ex + 8.5 * s, ey + ry), fill=(246, 246, 240))
        ir = min(4.3 * s, ry + 0.5)
        c.ellipse((ex - 4.3 * s, ey - ir, ex + 4.3 * s, ey + ir), fill=iris)
        c.circle(ex, ey, min(2.1 * s, ir * 0.6), (10, 10, 10))
        c.circle(ex + 1.4 * s, ey - 1.2 * s, 0.9 * s, (255, 255, 255))
        c.arc(
            (ex - 8.5 * s, ey - ry, ex + 8.5 * s, ey + ry),
            190,
            350,
            (35, 25, 25),
            2.0 if not male else 1.4,
        )
        if lab["Bags_Under_Eyes"]:
            c.arc(
                (ex - 7 * s, ey + ry - 3 * s, ex + 7 * s, ey + ry + 4 * s), 20, 160, skin_dark, 1.5
            )

    # Eyebrows.
    bw = 6.0 if lab["Bushy_Eyebrows"] else (4.0 if male else 3.0)
    for ex in (ex_l, ex_r):
        out = -1 if ex < cx else 1
        peak = 4.5 * s if lab["Arched_Eyebrows"] else 1.5 * s
        c.line(
            [
                (ex - out * 9 * s, brow_y + 1 * s),
                (ex + out * 1 * s, brow_y - peak),
                (ex + out * 10 * s, brow_y + 1.5 * s),
            ],
            brow,
            bw * s,
        )

    # Nose.
    nose_col = _shade(skin, 0.72)
    nw = 7 * s if lab["Big_Nose"] else 4.5 * s
    nx = cx
    c.line([(nx + 1 * s, ey + 5 * s), (nx - 2 * s, nose_y - 2 * s)], nose_col, 1.6)
    tip = 3 * s if lab["Pointy_Nose"] else 0
    c.arc((nx - nw, nose_y - 4 * s - tip, nx + nw, nose_y + 3 * s), 0, 180, nose_col, 2)

    # Mouth. Smiling: corners above the centre; otherwise level. Open: dark inside.
    lw = (6.0 if lab["Big_Lips"] else 4.0) * s
    smile, open_ = lab["Smiling"], lab["Mouth_Slightly_Open"]
    ts = [i / 8 - 1 for i in range(17)]
    if smile and not open_:
        pts = [(cx + t * hw, my - 3 * s + 7 * s * (1 - t * t)) for t in ts]
        c.line(pts, lip, lw)
        corners = (cx - hw, my - 3 * s, cx + hw, my - 3 * s)
    elif smile and open_:
        upper = [(cx + t * hw, my - 3 * s + 2 * s * (1 - t * t)) for t in ts]
        lower = [(cx + t * hw, my - 3 * s + 13 * s * (1 - t * t)) for t in reversed(ts)]
        c.polygon(upper + lower, mouth_dark)
        teeth = [(x, y + 3.5 * s * (1 - abs(t) ** 2)) for (x, y), t in zip(upper, ts, strict=True)]
        c.polygon(upper + list(reversed(teeth)), (240, 238, 228))
        c.line(upper, lip, lw * 0.6)
        c.line(lower, lip, lw * 0.8)
        corners = (cx - hw, my - 3 * s, cx + hw, my - 3 * s)
    elif open_:
        ow = 0.62 * hw
        c.ellipse(
            (cx - ow, my - 5.5 * s, cx + ow, my + 6.5 * s),
            fill=mouth_dark,
            outline=lip,
            width=lw * 0.75,
        )
        corners = (cx - ow, my, cx + ow, my)
    else:
        c.line([(cx - hw, my), (cx + hw, my)], lip, lw)
        corners = (cx - hw, my, cx + hw, my)

    # Facial hair over the mouth area.
    beard = _shade(hair, 0.85) if hair_name != "blond" else _shade(hair, 0.7)
    if lab["Mustache"]:
        c.polygon(
            [
                (cx - hw - 2 * s, my - 7.5 * s),
                (cx - 3 * s, my - 14 * s),
                (cx + 3 * s, my - 14 * s),
                (cx + hw + 2 * s, my - 7.5 * s),
                (cx, my - 10 * s),
            ],
            beard,
        )
    if lab["Goatee"]:
        # A tuft from under the lower lip to the chin, flat on top.
        c.chord((cx - 11 * s, my - 8 * s, cx + 11 * s, cy + b + 1 * s), 20, 160, beard)

    # Hat over the head: a saturated crown, sometimes with a brim.
    if lab["Wearing_Hat"]:
        hat = _jitter(rng, rng.choice(HAT_COLORS), 8)
        brim_y = cy - 0.58 * b
        crown_top = top - 26 * s
        c.chord((cx - a - 6 * s, crown_top, cx + a + 6 * s, 2 * brim_y - crown_top), 180, 360, hat)
        if rng.random() < 0.6:
            c.rect(
                (cx - a - 15 * s, brim_y - 4 * s, cx + a + 15 * s, brim_y + 4 * s),
                _shade(hat, 0.7),
                radius=3 * s,
            )
        else:
            c.rect(
                (cx - a - 6 * s, brim_y - 7 * s, cx + a + 6 * s, brim_y + 1 * s),
                _shade(hat, 0.8),
                radius=3 * s,
            )

    # Glasses last: thick dark rims, bridge and temples; a fifth are sunglasses.
    if lab["Eyeglasses"]:
        rim = _jitter(rng, (25, 22, 25), 8)
        lens = (20, 20, 30) if rng.random() < 0.2 else None
        for ex in (ex_l, ex_r):
            c.ellipse(
                (ex - 13 * s, ey - 10 * s, ex + 13 * s, ey + 9 * s),
                fill=lens,
                outline=rim,
                width=3.2 * s,
            )
            out = -1 if ex < cx else 1
            c.line(
                [(ex + out * 12.5 * s, ey - 3 * s), (cx + out * (a + 1 * s), ey - 5 * s)], rim, 2.5
            )
        c.line([(ex_l + 12.5 * s, ey - 2 * s), (ex_r - 12.5 * s, ey - 2 * s)], rim, 3.2 * s)

    img = c.image()
    if lab["Blurry"]:
        img = img.filter(ImageFilter.GaussianBlur(1.3))

    bbox_top = top - (26 * s if lab["Wearing_Hat"] else 0 if lab["Bald"] else 12 * s)
    bbox = [round(cx - a - 6 * s), round(bbox_top), round(2 * a + 12 * s), round(cy + b - bbox_top)]
    landmarks = [
        ex_l,
        ey,
        ex_r,
        ey,
        cx - 1 * s,
        nose_y,
        corners[0],
        corners[1],
        corners[2],
        corners[3],
    ]
    return img, bbox, [round(v) for v in landmarks]


def render_image(
    seed: int, number: int
) -> tuple[Image.Image, dict[str, bool], list[int], list[int]]:
    """Image `number` (1-based id) of dataset `seed`: (PIL image, labels, bbox, landmarks).

    A pure function of (seed, number): its own RNG, seeded from both, draws labels then geometry.
    """
    rng = random.Random(f"facegan-synth/v{SYNTH_VERSION}/{seed}/{number}")
    lab = _sample_labels(rng)
    img, bbox, landmarks = _draw(rng, lab)
    return img, lab, bbox, landmarks


def _render_record(seed: int, number: int) -> Record:
    img, lab, bbox, landmarks = render_image(seed, number)
    buf = BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    labels = tuple(1 if lab[n] else -1 for n in ATTRIBUTE_NAMES)
    return number, labels, tuple(bbox), tuple(landmarks), buf.getvalue()


def _render_chunk(job: tuple[int, int, int]) -> list[Record]:
    """Worker task: ids first..last (inclusive) of dataset `seed`."""
    seed, first, last = job
    return [_render_record(seed, n) for n in range(first, last + 1)]


def _records(cfg: SynthConfig) -> Iterator[Record]:
    """All records in id order, rendered by `cfg.workers` processes in chunks of ids."""
    per_chunk = max(1, min(CHUNK_IMAGES, math.ceil(cfg.count / (cfg.workers * 4))))
    jobs = [
        (cfg.seed, first, min(first + per_chunk - 1, cfg.count))
        for first in range(1, cfg.count + 1, per_chunk)
    ]
    workers = min(cfg.workers, len(jobs))
    if workers == 1:
        for job in jobs:
            yield from _render_chunk(job)
        return
    # spawn: same behaviour on Linux/macOS, and safe when the parent already imported torch.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for chunk in pool.imap(_render_chunk, jobs):
            yield from chunk


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _name(number: int) -> str:
    return f"{number:06d}.jpg"


def _layout_paths(layout: str, zipped: bool) -> dict[str, str]:
    """Relative paths of what a layout holds (`images` is a folder or a zip)."""
    if layout == "kaggle":
        if zipped:
            return {"images": "archive.zip"}
        return {
            "images": "img_align_celeba/img_align_celeba",
            "attributes": "list_attr_celeba.csv",
            "partition": "list_eval_partition.csv",
            "bbox": "list_bbox_celeba.csv",
            "landmarks": "list_landmarks_align_celeba.csv",
        }
    return {
        "images": "Img/img_align_celeba.zip" if zipped else "Img/img_align_celeba",
        "attributes": "Anno/list_attr_celeba.txt",
        "partition": "Eval/list_eval_partition.txt",
        "bbox": "Anno/list_bbox_celeba.txt",
        "landmarks": "Anno/list_landmarks_align_celeba.txt",
    }


def _csv(header: tuple[str, ...], rows: list[tuple[str, tuple[int, ...]]]) -> str:
    lines = [",".join(("image_id", *header))]
    lines += [name + "," + ",".join(map(str, vals)) for name, vals in rows]
    return "\n".join(lines) + "\n"


def _txt(
    header: tuple[str, ...] | None, rows: list[tuple[str, tuple[int, ...]]], fmt: str, sep: str
) -> str:
    """Official style: the count, the column names, then `name value value ...` rows."""
    lines = [] if header is None else [str(len(rows)), " ".join(header)]
    lines += [name + " " + sep.join(format(v, fmt) for v in vals) for name, vals in rows]
    return "\n".join(lines) + "\n"


def _annotations(layout: str, table: dict[str, list]) -> dict[str, str]:
    """Annotation file texts keyed like `_layout_paths` (without `images`)."""
    attrs, part, bbox, lms = table["attrs"], table["partition"], table["bbox"], table["landmarks"]
    if layout == "kaggle":
        return {
            "attributes": _csv(ATTRIBUTE_NAMES, attrs),
            "partition": _csv(("partition",), part),
            "bbox": _csv(BBOX_COLUMNS, bbox),
            "landmarks": _csv(LANDMARK_COLUMNS, lms),
        }
    return {
        # Spacing as in the real files: "000001.jpg -1  1  1 -1 ..." (values padded to 2),
        # "000001.jpg    69  109  106 ..." (right-aligned in 5), "000001.jpg 0".
        "attributes": _txt(ATTRIBUTE_NAMES, attrs, "2d", " "),
        "partition": _txt(None, part, "d", " "),
        # Unlike the other two, the real bbox header line starts with `image_id`.
        "bbox": _txt(("image_id", *BBOX_COLUMNS), bbox, "5d", ""),
        "landmarks": _txt(LANDMARK_COLUMNS, lms, "5d", ""),
    }


def _zip_info(name: str, compress: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    return info


def _stamp_key(cfg: SynthConfig) -> dict[str, Any]:
    return {
        "generator": "facegan synth",
        "version": SYNTH_VERSION,
        "count": cfg.count,
        "seed": cfg.seed,
        "layout": cfg.layout,
        "zip": cfg.zip,
    }


def _check_out(cfg: SynthConfig) -> dict[str, Any] | None:
    """Refuse a non-empty --out unless it holds this very dataset (then return its summary)."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder; choose a new folder")
    if not out.is_dir():
        return None
    try:
        entries = [p.name for p in out.iterdir() if p.name != PARTIAL_NAME]
    except OSError as exc:
        raise DataError(f"--out {out} cannot be read ({exc.strerror})") from None
    if not entries:
        return None
    stamp = out / STAMP_NAME
    if stamp.is_file():
        try:
            data = json.loads(stamp.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("key") == _stamp_key(cfg):
            return data["summary"]
        old = data.get("key", {})
        if old:
            raise DataError(
                f"--out {out} already holds a different synthetic dataset "
                f"(count={old.get('count')} seed={old.get('seed')} layout={old.get('layout')} "
                f"zip={old.get('zip')}); choose a new folder"
            )
    raise DataError(f"--out {out} already exists and is not empty; choose a new folder")


def _with_abs_paths(summary: dict[str, Any], out: Path, reused: bool) -> dict[str, Any]:
    result = dict(summary)
    result["out"] = str(out)
    result["paths"] = {k: str(out / v) for k, v in summary["paths"].items()}
    result["reused"] = reused
    return result


def make_dataset(cfg: SynthConfig, progress: bool = False) -> dict[str, Any]:
    """Draw `cfg.count` faces and write them in `cfg.layout` under `cfg.out`.

    Returns a summary: out, count, seed, layout, zip; paths (absolute: the images folder or zip
    and the annotation files; for a Kaggle zip only `images`, as the CSVs are members of it);
    partition (split sizes); prevalence (fraction of +1 per attribute); drawn (the visibly drawn
    attributes); seconds; reused (True when --out already held exactly this dataset, in which
    case nothing is written).

    Everything is written into a staging folder inside `cfg.out` and renamed into place; the
    `.facegan-synth.json` stamp is written last, so a folder with a stamp is complete.
    """
    start = time.perf_counter()
    out = cfg.out
    existing = _check_out(cfg)
    if existing is not None:
        result = _with_abs_paths(existing, out, reused=True)
        result["seconds"] = round(time.perf_counter() - start, 2)
        return result

    stage = out / PARTIAL_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        if stage.exists():  # left over from an interrupted run
            shutil.rmtree(stage)
        stage.mkdir()
    except OSError as exc:
        raise DataError(f"--out {out} cannot be written ({exc.strerror})") from None

    rel = _layout_paths(cfg.layout, cfg.zip)
    partitions = partition_by_order(cfg.count)
    table: dict[str, list] = {"attrs": [], "partition": [], "bbox": [], "landmarks": []}
    positives = [0] * len(ATTRIBUTE_NAMES)

    # Where images go: a folder, or members of a zip (kaggle: the whole tree is in archive.zip).
    zf: zipfile.ZipFile | None = None
    if cfg.zip:
        zip_path = stage / rel["images"]
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        zf = zipfile.ZipFile(zip_path, "w")
        member_dir = (
            "img_align_celeba/img_align_celeba/" if cfg.layout == "kaggle" else "img_align_celeba/"
        )
    else:
        image_dir = stage / rel["images"]
        image_dir.mkdir(parents=True)

    try:
        records = track(
            _records(cfg), total=cfg.count, description="synth", unit="img", enabled=progress
        )
        for number, labels, bbox, landmarks, jpeg in records:
            name = _name(number)
            if zf is not None:
                zf.writestr(_zip_info(member_dir + name, zipfile.ZIP_STORED), jpeg)
            else:
                (image_dir / name).write_bytes(jpeg)
            table["attrs"].append((name, labels))
            table["partition"].append((name, (partitions[number - 1],)))
            table["bbox"].append((name, bbox))
            table["landmarks"].append((name, landmarks))
            for i, v in enumerate(labels):
                positives[i] += v > 0

        texts = _annotations(cfg.layout, table)
        if cfg.layout == "kaggle" and zf is not None:
            for key in ("attributes", "bbox", "partition", "landmarks"):
                name = _layout_paths("kaggle", False)[key]
                zf.writestr(_zip_info(name, zipfile.ZIP_DEFLATED), texts[key])
        else:
            for key, text in texts.items():
                path = stage / rel[key]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        if zf is not None:
            zf.close()
            zf = None

        # Move the finished top-level entries into place, then stamp.
        for entry in sorted(stage.iterdir()):
            os.replace(entry, out / entry.name)
        stage.rmdir()
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise DataError(f"--out {out} cannot be written ({exc.strerror or exc}{where})") from None
    finally:
        if zf is not None:
            zf.close()

    summary: dict[str, Any] = {
        "count": cfg.count,
        "seed": cfg.seed,
        "layout": cfg.layout,
        "zip": cfg.zip,
        "paths": rel,
        "partition": {name: partitions.count(code) for code, name in enumerate(PARTITION_NAMES)},
        "prevalence": {
            name: round(n / cfg.count, 4)
            for name, n in zip(ATTRIBUTE_NAMES, positives, strict=True)
        },
        "drawn": list(DRAWN_ATTRIBUTES),
    }
    stamp = json.dumps({"key": _stamp_key(cfg), "summary": summary}, indent=2) + "\n"
    atomic_write_text(out / STAMP_NAME, stamp)

    result = _with_abs_paths(summary, out, reused=False)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result
