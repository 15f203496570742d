"""CelebA's annotation vocabulary: the 40 attribute names, the annotation column names and the
official train/val/test partition. The one place the synthetic generator (`synth.py`) and the shard
writer take them from, so both agree with the real `list_*_celeba` files.
"""

from __future__ import annotations

# The 40 binary attributes in the official column order of `list_attr_celeba.{txt,csv}`.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)
assert len(ATTRIBUTE_NAMES) == 40

# Columns after `image_id` in `list_bbox_celeba` and `list_landmarks_align_celeba`.
BBOX_COLUMNS: tuple[str, ...] = ("x_1", "y_1", "width", "height")
LANDMARK_COLUMNS: tuple[str, ...] = (
    "lefteye_x",
    "lefteye_y",
    "righteye_x",
    "righteye_y",
    "nose_x",
    "nose_y",
    "leftmouth_x",
    "leftmouth_y",
    "rightmouth_x",
    "rightmouth_y",
)

# `list_eval_partition`: code 0 = train, 1 = val, 2 = test, assigned by image id ranges.
PARTITION_NAMES: tuple[str, ...] = ("train", "val", "test")
CELEBA_TOTAL = 202_599  # images in img_align_celeba (ids 000001..202599)
PARTITION_LAST_ID: tuple[int, ...] = (162_770, 182_637, 202_599)  # inclusive last id per code
PARTITION_COUNTS: tuple[int, ...] = (162_770, 19_867, 19_962)  # train, val, test


def official_partition(image_id: int) -> int:
    """The official partition code (0/1/2) of a real CelebA image id (1-based)."""
    if not 1 <= image_id <= CELEBA_TOTAL:
        raise ValueError(f"CelebA image id {image_id} is outside 1..{CELEBA_TOTAL}")
    for code, last in enumerate(PARTITION_LAST_ID):
        if image_id <= last:
            return code
    raise AssertionError("unreachable")


def scaled_partition_counts(count: int) -> tuple[int, int, int]:
    """(train, val, test) sizes for a `count`-image set in CelebA's proportions (80.3/9.8/9.9%).

    Rounded, then nudged so every split is non-empty once there are at least 3 images (the
    proportions alone already give that from 10 up); `count == CELEBA_TOTAL` gives the official
    counts exactly.
    """
    if count < 1:
        raise ValueError(f"count {count} must be at least 1")
    train = round(count * PARTITION_COUNTS[0] / CELEBA_TOTAL)
    val = round(count * PARTITION_COUNTS[1] / CELEBA_TOTAL)
    if count >= 3:
        val = max(val, 1)
        train = min(max(train, 1), count - val - 1)
    else:
        train, val = count, 0
    return train, val, count - train - val


def partition_by_order(count: int) -> list[int]:
    """Partition codes for ids 1..count: the first `train` ids are 0, then val (1), test (2)."""
    train, val, test = scaled_partition_counts(count)
    return [0] * train + [1] * val + [2] * test
