"""Hand-written tiny shard folders (docs/SHARDS.md format), independent of `facegan shard`, so the
training tests do not depend on the shard writer's details."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np


def write_tiny_shards(
    root: Path,
    *,
    n: int = 96,
    size: int = 16,
    per_shard: int = 32,
    identical: bool = False,
    seed: int = 0,
    n_attrs: int = 40,
) -> Path:
    """`n` random (or all identical) PNG images of `size` px in train-*.tar + manifest.json."""
    import webdataset as wds
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    shards, idx = [], 0
    for s in range((n + per_shard - 1) // per_shard):
        name = f"train-{s:06d}.tar"
        count = 0
        with wds.TarWriter(str(root / name)) as w:
            for _ in range(min(per_shard, n - idx)):
                img = base if identical else (rng.random((size, size, 3)) * 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                attrs = "".join(str(b) for b in rng.integers(0, 2, n_attrs))
                w.write(
                    {"__key__": f"{idx + 1:06d}", "png": buf.getvalue(), "attrs.txt": attrs,
                     "partition.cls": "0"}
                )  # fmt: skip
                idx += 1
                count += 1
        data = (root / name).read_bytes()
        shards.append(
            {"name": name, "count": count, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}
        )  # fmt: skip
    manifest = {
        "format_version": 1,
        "package_version": "test",
        "source": {"path": "synthetic", "kind": "folder"},
        "settings": {"size": size, "crop": "none", "format": "png", "quality": 95, "limit": None,
                     "split": "train", "shard_size": per_shard, "seed": seed},
        "attribute_names": [f"attr_{i}" for i in range(n_attrs)],
        "splits": {"train": {"count": n, "shards": shards}},
        "total": n,
        "skipped": [],
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
