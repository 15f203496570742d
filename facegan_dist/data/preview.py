"""A contact sheet of a shard folder: the first images of an epoch as one PNG grid."""

from __future__ import annotations

from pathlib import Path

from facegan_dist.data.remote import Remote
from facegan_dist.data.stream import ShardStream
from facegan_dist.images import grid_uint8, save_png


def contact_sheet(
    shard_dir: Path | Remote, out: Path, n: int = 64, split: str = "all", seed: int = 0
):
    """Write `n` images (or all, if fewer) of `split` as a square grid to `out`; returns the
    number of images and the attribute names of the shards. A bad `out` (a folder, a path under
    a file, an unwritable place) is one ConfigError naming --out, before any image is read."""
    from facegan_dist.paths import out_file

    probe = ShardStream(shard_dir, split=split, batch_per_device=1)  # reads the manifest only
    out_file(Path(out), "--out")
    n = max(1, min(n, probe.num_samples))
    stream = ShardStream(shard_dir, split=split, batch_per_device=n, seed=seed, shuffle_buffer=1)
    images, _attrs = next(iter(stream))
    save_png(grid_uint8(images), out)
    return n, stream.attribute_names
