"""`--data-cache device`: a split decoded once into a uint8 tensor on each device.

CelebA at 64 px is 202,599 x 3 x 64 x 64 bytes = 2.5 GB: it fits on any training GPU, and then a
batch is one `index_select` on the device instead of JPEG decoding in loader processes (which
caps a GPU step at the decode rate of the CPU cores). The streaming reader (`stream.py`) stays
the default for data that does not fit.

Each rank holds its own share: the split's samples in manifest order (a random order: shards are
shuffled at write time) are cut into `world_size` contiguous ranges of N // world_size samples
(the last N % world_size samples are left out), so every rank has the same number of batches per
epoch. Epoch e of rank r is a permutation of its share drawn from a generator seeded by
(seed, e, r) on the device; resuming at batch k replays the same permutations.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from facegan_dist.errors import DataError

DECODE_CHUNK = 1024  # samples decoded per collate call while building the cache


class DeviceCache:
    def __init__(
        self,
        shard_dir: Path,
        *,
        split: str = "train",
        batch_per_device: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        from facegan_dist.data.stream import ShardStream, _read_samples

        # The stream knows the split's shards, the decoder and the attribute parsing.
        probe = ShardStream(shard_dir, split=split, batch_per_device=1, shuffle_buffer=1)
        self.num_samples = probe.num_samples
        self.attribute_names = probe.attribute_names
        self.image_size = probe.image_size
        share = self.num_samples // world_size
        self.batches_per_epoch = share // batch_per_device
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{shard_dir}: split '{split}' has {self.num_samples} samples, fewer than one "
                f"batch of {batch_per_device} per process for {world_size} processes"
            )
        self.share, self.batch_per_device = share, batch_per_device
        self.rank, self.seed = rank, seed
        self.device = torch.device(device)
        lo, hi = rank * share, (rank + 1) * share

        images, attrs, keys = [], [], []
        chunk: list = []
        start = 0
        for shard in probe.shards:
            first, stop = max(lo - start, 0), min(hi - start, shard.count)
            if first < stop:
                for raw in _read_samples(shard, first, stop):
                    chunk.append(raw)
                    if len(chunk) == DECODE_CHUNK:
                        self._decode(probe, chunk, images, attrs, keys)
            start += shard.count
        if chunk:
            self._decode(probe, chunk, images, attrs, keys)
        self.keys: list[str] = keys
        self.images = torch.cat(images).to(self.device)  # [share, 3, S, S] uint8
        self.attrs = torch.cat(attrs).to(self.device)  # [share, A] uint8

    @staticmethod
    def _decode(probe, chunk: list, images: list, attrs: list, keys: list) -> None:
        probe.return_keys = True
        imgs, att, k = probe._collate(chunk)
        images.append(imgs)
        attrs.append(att)
        keys.extend(k)
        chunk.clear()

    @property
    def nbytes(self) -> int:
        return self.images.numel() + self.attrs.numel()

    def layout(self) -> dict:
        return {"cache": "device", "num_samples": self.num_samples, "share": self.share,
                "batch_per_device": self.batch_per_device, "seed": self.seed}  # fmt: skip

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite (images uint8 [B, 3, S, S], attrs uint8 [B, A]) on the device, from
        rank-batch `start_batch` on (epochs follow each other)."""
        gen = torch.Generator(device=self.device)
        B, bpe = self.batch_per_device, self.batches_per_epoch
        total = start_batch
        while True:
            epoch, first = divmod(total, bpe)
            gen.manual_seed((self.seed * 1_000_003 + epoch) * 4096 + self.rank)
            perm = torch.randperm(self.share, generator=gen, device=self.device)
            for j in range(first, bpe):
                idx = perm[j * B : (j + 1) * B]
                yield self.images.index_select(0, idx), self.attrs.index_select(0, idx)
                total += 1
