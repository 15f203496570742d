"""Reading a shard folder back outside training, in a fixed order: every sample of a split
exactly once (evaluation's real images, the attribute classifier's held-out accuracy), and the
manifest's fingerprint that keys what is cached beside the shards (the classifier, FID's real
statistics), and where that cache lives (`derived_dir`).
"""

from __future__ import annotations

from pathlib import Path

from facegan_dist.data.remote import Remote


def manifest_sha256(shard_dir: Path | Remote) -> str:
    """sha256 of `manifest.json` (validated; one fetch for a URL): it lists every shard's sha,
    so it changes with the data."""
    from facegan_dist.data.stream import Manifest

    return Manifest.read(shard_dir).sha256


def derived_dir(shard_dir: Path | Remote) -> Path:
    """The folder for what readers derive from the shards and keep (the attribute classifier in
    classifier/, FID's real statistics in stats/): the shard folder itself, or for a URL its
    --cache-dir, in `manifest-<sha256[:16]>/` (keyed by the manifest, so the same shards under
    another URL share it). A URL without a --cache-dir has nowhere to keep them: ConfigError."""
    from facegan_dist.errors import ConfigError

    if not isinstance(shard_dir, Remote):
        return Path(shard_dir)
    if shard_dir.cache_dir is None:
        raise ConfigError(
            f"--data {shard_dir} is a URL: give --cache-dir DIR, where the attribute classifier "
            "and FID's real statistics are kept (beside the shards for a local folder)"
        )
    return Path(shard_dir.cache_dir) / f"manifest-{manifest_sha256(shard_dir)[:16]}"


def iter_split_once(shard_dir: Path | Remote, split: str, batch: int, limit: int | None = None):
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
