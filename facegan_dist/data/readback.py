"""Reading a shard folder back outside training, in a fixed order: every sample of a split
exactly once (evaluation's real images, the attribute classifier's held-out accuracy), and the
manifest's fingerprint that keys what is cached beside the shards (the classifier, FID's real
statistics).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def manifest_sha256(shard_dir: Path) -> str:
    """sha256 of `manifest.json`: it lists every shard's sha, so it changes with the data."""
    from facegan_dist.data.stream import Manifest

    path = Manifest.read(shard_dir).path  # validates, with one-line errors
    return hashlib.sha256(path.read_bytes()).hexdigest()


def iter_split_once(shard_dir: Path, split: str, batch: int, limit: int | None = None):
    """(uint8 images, uint8 attrs, keys) batches covering each sample of `split` exactly once,
    in a fixed order (epoch 0 of a 1-process, unshuffled ShardStream), at most `limit` images."""
    from facegan_dist.data.stream import ShardStream

    stream = ShardStream(
        shard_dir, split=split, batch_per_device=batch, shuffle_buffer=0, return_keys=True
    )
    total = stream.num_samples if limit is None else min(limit, stream.num_samples)
    seen = 0
    for images, attrs, keys in stream:
        take = min(total - seen, images.shape[0])
        yield images[:take], attrs[:take], keys[:take]
        seen += take
        if seen >= total:
            return
