"""Does a conditional generator draw what is asked? For 64 seeds, with the other attributes taken
from 64 real images, switch one attribute off then on and report the attribute classifier's mean
probability (docs/VARIANTS.md).

    python scripts/check_conditional.py RUN_DIR SHARD_DIR [ATTR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from facegan_dist.artifacts import load_any_generator
from facegan_dist.classifier import get_classifier, predict
from facegan_dist.data.stream import ShardStream
from facegan_dist.latent import seed_z

DEFAULT = ["Smiling", "Eyeglasses", "Male", "Blond_Hair", "Black_Hair", "Wearing_Hat",
           "Pale_Skin", "Mouth_Slightly_Open"]  # fmt: skip


def main(run: Path, shards: Path, attrs: list[str]) -> None:
    clf, meta = get_classifier(shards)
    G, gmeta, _ = load_any_generator(run)
    cond = gmeta["condition"]
    if not cond:
        sys.exit(f"error: {run} is not a conditional model")
    stream = ShardStream(shards, batch_per_device=64, shuffle_buffer=1)
    real = next(iter(stream))[1]
    base = real[:, [stream.attribute_names.index(a) for a in cond]].float()
    z = seed_z(range(64), gmeta["z_dim"])
    print(f"{'attribute':22s} asked 0   asked 1   (mean classifier probability, 64 seeds)")
    for a in attrs:
        probs = []
        for v in (0.0, 1.0):
            c = base.clone()
            c[:, cond.index(a)] = v
            with torch.no_grad():
                p = predict(clf, G(z, c))[0]
            probs.append(p[:, meta["attribute_names"].index(a)].mean().item())
        print(f"{a:22s} {probs[0]:.2f}      {probs[1]:.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or DEFAULT)
