"""`--data-cache device`: a split decoded once into a uint8 tensor on each device.

CelebA at 64 px is 202,599 x 3 x 64 x 64 bytes = 2.5 GB: it fits on any training GPU, and then a
batch is one `index_select` on the device instead of JPEG decoding in loader processes (which
caps a GPU step at the decode rate of the CPU cores). The streaming reader (`stream.py`) stays
the default for data that does not fit.

One epoch, as the stream defines it (`stream.DataSource`): every sample of the split at least
once, and the same number of batches on every rank. With N samples, W ranks and B images per
batch, every rank has b = ceil(N / (W * B)) batches per epoch. The split's samples in manifest
order (a random order: shards are shuffled at write time) are laid end to end and wrapped around
(position p is sample p mod N) to the length W * B * b >= N; rank r's share is positions
[r * B * b, (r + 1) * B * b). So the union of the shares is every sample, the last shares end
with the first samples again, and an epoch draws fewer than W * B duplicates over all
ranks (fewer than one batch per rank). The N % W remainder needs no special case: it is part of
that wrap-around. A rank keeps its share every epoch (the samples are decoded once, only the
order changes). Epoch e of rank r is a permutation of its share drawn from a generator seeded
by (seed, e, r) on the device; resuming at batch k replays the same permutations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from facegan_dist.data.stream import Manifest, ShardStream

DECODE_CHUNK = 1024  # samples decoded per collate call while building the cache


class DeviceCache:
    """A `stream.DataSource` whose samples sit decoded on the device (see the module docstring).

    Args as for `ShardStream` (`shard_dir` may be the folder's `Manifest`), plus `device`.
    """

    def __init__(
        self,
        shard_dir: Path | Manifest,
        *,
        split: str = "train",
        batch_per_device: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        # The stream knows the split's shards, the decoder and the attribute parsing.
        reader = ShardStream(shard_dir, split=split, batch_per_device=1, shuffle_buffer=1)
        N = self.num_samples = reader.num_samples  # >= 1 (the stream refuses an empty split)
        self.attribute_names = reader.attribute_names
        self.image_size = reader.image_size
        self.batches_per_epoch = math.ceil(N / (world_size * batch_per_device))  # b
        share = self.batches_per_epoch * batch_per_device  # B * b positions per rank
        self.share, self.batch_per_device = share, batch_per_device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)

        # Positions [first, first + share) read samples p mod N: one run of the split, or two
        # when it wraps past the end; a share longer than the split (a tiny one) holds it once.
        first = (rank * share) % N
        rows = None  # share position -> stored row; None: stored in position order
        if share >= N:
            runs, rows = [(0, N)], (torch.arange(share) + first) % N
        elif first + share <= N:
            runs = [(first, first + share)]
        else:
            runs = [(first, N), (0, first + share - N)]
        images, attrs, keys = [], [], []
        for lo, hi in runs:
            for imgs, att, k in reader.samples(lo, hi, DECODE_CHUNK):
                images.append(imgs)
                attrs.append(att)
                keys.extend(k)
        self.keys: list[str] = keys  # the stored samples' keys, row by row
        self.images = torch.cat(images).to(self.device)  # [min(share, N), 3, S, S] uint8
        self.attrs = torch.cat(attrs).to(self.device)  # [min(share, N), A] uint8
        self._rows = rows.to(self.device) if rows is not None else None

    @property
    def nbytes(self) -> int:
        return self.images.numel() + self.attrs.numel()

    @property
    def images_per_epoch(self) -> int:
        """Images one epoch draws over all ranks (>= num_samples: the wrapped duplicates)."""
        return self.batches_per_epoch * self.batch_per_device * self.world_size

    @property
    def bad_samples_total(self) -> None:
        return None  # decoded once, strictly: an undecodable sample raises while building

    def layout(self) -> dict:
        return {"cache": "device", "num_samples": self.num_samples, "share": self.share,
                "batch_per_device": self.batch_per_device, "seed": self.seed}  # fmt: skip

    def batches(
        self, start_batch: int = 0, *, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite (images uint8 [B, 3, S, S], attrs uint8 [B, A]) on the device, from
        rank-batch `start_batch` on (epochs follow each other). `pin_memory` does not apply:
        the batches are on the device already. Draws nothing from the torch RNG."""
        return self._batches(start_batch)

    iterate = batches  # the earlier name

    def _batches(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device)
        B, bpe = self.batch_per_device, self.batches_per_epoch
        total = start_batch
        while True:
            epoch, first = divmod(total, bpe)
            gen.manual_seed((self.seed * 1_000_003 + epoch) * 4096 + self.rank)
            perm = torch.randperm(self.share, generator=gen, device=self.device)
            if self._rows is not None:
                perm = self._rows[perm]
            for j in range(first, bpe):
                idx = perm[j * B : (j + 1) * B]
                yield self.images.index_select(0, idx), self.attrs.index_select(0, idx)
                total += 1
