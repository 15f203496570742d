"""Read shards for training: exact, replayable epochs with equal batch counts on every rank.

This module owns the training reader. `ShardStream` is an infinite `IterableDataset` that yields
`(images, attrs)` batches (uint8 [B, 3, S, S] CHW RGB and uint8 [B, A]) from a shard folder written
by `facegan shard` (format: docs/SHARDS.md). It knows nothing of torch.distributed: the caller
passes `rank` and `world_size` as ints. It must not go through `accelerator.prepare` (STACK-NOTES
section 3): each rank reads its own share.

Why not WebDataset's resampled shards (`resampled=True` + `with_epoch`)? Resampling draws shards
with replacement from pid/time-seeded RNGs, so an "epoch" does not visit every sample, a stream
cannot be replayed, and a run cannot resume mid-epoch where it stopped. `split_by_node` instead is
uneven (ranks get different counts and DDP hangs). This reader plans every epoch from the manifest
alone, so it gets all three properties: exact epochs, exact resume, equal counts.

Epoch plan (no file is opened to plan it)
    K = max(1, num_workers) loader workers per rank; slots = world_size * K; slot s = rank * K + k.
    Epoch e: permute the split's shards with an RNG seeded from (seed, e) and concatenate them
    into a virtual sequence of the N samples. Every slot gets the same number of batches
    b = ceil(N / (slots * B)); the virtual length L = slots * B * b >= N wraps around (index mod N)
    and slot s owns positions [s*B*b, (s+1)*B*b). So every sample appears at least once per epoch
    (at most slots*B - 1 duplicates) and every rank yields exactly K * b = `batches_per_epoch`.
    A slot reads its positions sequentially: it opens the shard(s) it needs, skips the samples
    before its start without reading them, passes the raw (still encoded) samples through a
    shuffle buffer driven by `random.Random` seeded from (seed, epoch, slot), groups them B at a
    time and only then decodes them (torchvision.io.decode_image: about 2x faster than PIL for
    64x64 JPEG, 1.2x for PNG).

Reading
    Python's tarfile parses a shard's headers once per process (cached, `_shard_index`); after
    that a run of samples is one large read sliced by offset. Header parsing is pure Python and
    costs about 20 us per member (40 with the PAX header that a float mtime forces), which is why
    a process's first pass over a shard is 2-3x slower than later epochs. Truncated tars and
    sample counts that disagree with the manifest raise DataError naming the shard.

Workers and resume
    torch's DataLoader takes batches from its workers strictly round-robin, so rank-batch i of an
    epoch comes from worker i % K. To start at rank-batch `start_batch` of `start_epoch`, worker w
    plays slot rank*K + (start_batch + w) % K and first skips (start_batch + w) // K of that slot's
    batches by pushing raw samples through the same shuffle buffer without decoding them, so the
    RNG stream is the same. As every epoch has K*b batches (a multiple of K), worker w keeps its
    slot in later epochs, and the stream from (start_epoch, start_batch) is exactly the tail of the
    stream from (start_epoch, 0). Iterating the stream directly in the main process with
    num_workers > 0 plays the K workers round-robin itself, giving the same batches as the loader.

    Exact resume needs the same manifest, world_size, num_workers, batch_per_device, seed and
    shuffle_buffer: `layout()` returns them for a checkpoint to store and compare.
"""

from __future__ import annotations

import array
import atexit
import bisect
import collections
import copy
import functools
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import random
import signal
import tarfile
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from facegan_dist.data.remote import Remote, TransferError, is_url
from facegan_dist.errors import ConfigError, DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image member suffixes, in order of preference
ATTRS_EXT = "attrs.txt"
_READ_CHUNK = 256  # samples per read() call
_TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"
SUPPORTED_FORMAT_VERSIONS = (1,)


class ManifestError(DataError):
    """manifest.json is damaged or malformed: `problem` (naming the file and the field) + `fix`.

    `repairable`: `facegan shard` may rebuild it from the .state records (not so for a manifest
    of another format version, which a newer facegan wrote).
    """

    def __init__(self, problem: str, fix: str = "", repairable: bool = True) -> None:
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem, self.repairable = problem, repairable


def read_manifest(shard_dir: Path | str | Remote, *, full: bool = False) -> dict:
    """Load and check `shard_dir/manifest.json` (written last by `facegan shard`: "complete").

    The one place that checks a manifest's structure, for every reader (`train`, `evaluate`,
    `verify`, ...): each field the readers use must be there with its type, so a damaged or
    hand-edited manifest is one line naming the file and the field, never a KeyError later.
    `full` also requires what `facegan verify` compares (`total`, each shard's bytes and sha256).
    Values that merely disagree (counts that do not add up, a wrong hash) are verify's business.
    `shard_dir` may be a URL (`remote.is_url`) or a `Remote`: the manifest is fetched first.
    """
    return _load_manifest(shard_dir, full)[0]


def _load_manifest(shard_dir: Path | str | Remote, full: bool) -> tuple[dict, bytes]:
    """`read_manifest`, with the bytes it checked (hashed by `Manifest.sha256`: one fetch of a
    URL manifest, and the hash is of the very bytes that were validated)."""
    if isinstance(shard_dir, Remote) or is_url(shard_dir):
        remote = shard_dir if isinstance(shard_dir, Remote) else Remote(str(shard_dir))
        data = remote.fetch("manifest.json")
        fix = "upload the shard folder's manifest.json again (`facegan verify` it locally first)"
        return _parse_manifest(data, remote.where("manifest.json"), fix, full), data
    shard_dir = Path(shard_dir)
    path = shard_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"{shard_dir} has no manifest.json; run `facegan shard` first")
    fix = _manifest_fix(shard_dir)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path} is unreadable ({e})", fix) from None
    return _parse_manifest(data, path, fix, full), data


def _parse_manifest(data: bytes, path: Path | str, fix: str, full: bool) -> dict:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path} is unreadable ({e})", fix) from None
    if not text.strip():
        raise ManifestError(f"{path} is empty", fix)
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e})", fix) from None
    _check_manifest(manifest, path, fix, full)
    return manifest


def _manifest_fix(shard_dir: Path) -> str:
    """What repairs a damaged manifest: `facegan shard` rebuilds it from OUT/.state when run.json
    there says how the shards were written (shards.write_shards), else the folder is lost."""
    if (shard_dir / ".state" / "run.json").is_file():
        return "re-run the `facegan shard` command that wrote it: it rewrites the manifest"
    return "shard the source again into a new folder (no .state/run.json to rebuild it from)"


def _check_manifest(m: object, path: Path | str, fix: str, full: bool) -> None:
    def bad(what: str) -> ManifestError:
        return ManifestError(f"{path}: {what}", fix)

    def need(obj: dict, key: str, where: str, kind: str, required: bool = True) -> Any:
        """obj[key] if it has the type `kind` names (a key of _KINDS); None if absent and
        not required."""
        if key not in obj:
            if required:
                raise bad(f"{where or 'the manifest'} has no {key!r}")
            return None
        value = obj[key]
        test, want = _KINDS[kind]
        if not test(value):
            raise bad(f"{where + '.' if where else ''}{key} is {_show(value)}, expected {want}")
        return value

    if not isinstance(m, dict):
        raise bad(f"not a JSON object (it holds {_show(m)})")
    version = need(m, "format_version", "", "count")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_FORMAT_VERSIONS))
        raise ManifestError(
            f"{path} has format_version {version!r}; this reader supports {supported}",
            repairable=False,
        )
    need(need(m, "settings", "", "object"), "size", "settings", "size")
    names = need(m, "attribute_names", "", "list", required=False) or []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise bad(f"attribute_names[{i}] is {_show(name)}, expected a string")
    need(m, "total", "", "count", required=full)
    for split, entry in need(m, "splits", "", "object").items():
        where = f"splits.{split}"
        if not isinstance(entry, dict):
            raise bad(f"{where} is {_show(entry)}, expected an object")
        need(entry, "count", where, "count")
        for i, shard in enumerate(need(entry, "shards", where, "list")):
            at = f"{where}.shards[{i}]"
            if not isinstance(shard, dict):
                raise bad(f"{at} is {_show(shard)}, expected an object")
            name = need(shard, "name", at, "str")
            if _unsafe_name(name):
                raise ManifestError(f"{path} names a shard outside its folder: {name!r} (refused)")
            need(shard, "count", at, "count")
            need(shard, "bytes", at, "count", required=full)
            need(shard, "sha256", at, "str", required=full)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a count


_KINDS = {  # manifest field types: (test, what the message says is expected)
    "count": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
               int: "an integer", float: "a number"}  # fmt: skip


def _show(v: object) -> str:
    """A JSON value for a one-line message: its JSON type and (shortened) text."""
    if v is None:
        return "null"
    text = json.dumps(v)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{_JSON_TYPES.get(type(v), type(v).__name__)} {text}"


def _unsafe_name(name: str) -> bool:
    return name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name


@dataclass(frozen=True)
class Manifest:
    """A shard folder's manifest.json, read and checked once (`read_manifest`), with what the
    readers ask of it: the image size, the attribute names, a split's shards and counts.

    `raw` is the JSON object as written (what `facegan shard` and `verify` compare field by
    field); everything else reads the typed accessors.
    """

    shard_dir: Path | Remote  # a local folder, or a URL prefix (data/remote.py)
    raw: dict
    sha256: str  # of manifest.json's bytes as read (it lists every shard's sha256)

    @classmethod
    def read(cls, shard_dir: Path | str | Remote, *, full: bool = False) -> Manifest:
        """`shard_dir`: a folder, a URL (`remote.is_url`) or a `Remote` (its retry policy)."""
        if not isinstance(shard_dir, Remote):
            shard_dir = Remote(str(shard_dir)) if is_url(shard_dir) else Path(shard_dir)
        raw, data = _load_manifest(shard_dir, full)
        return cls(shard_dir, raw, hashlib.sha256(data).hexdigest())

    @property
    def path(self) -> Path | str:
        if isinstance(self.shard_dir, Remote):
            return self.shard_dir.where("manifest.json")
        return self.shard_dir / "manifest.json"

    @property
    def image_size(self) -> int:
        """S: every image is S x S pixels."""
        return int(self.raw["settings"]["size"])

    @property
    def attribute_names(self) -> list[str]:
        return list(self.raw.get("attribute_names") or [])

    @property
    def split_names(self) -> list[str]:
        """The splits present, as written."""
        return list(self.raw["splits"])

    def resolve_split(self, split: str) -> list[str]:
        """The manifest splits that `split` reads: itself, or for "all" every split present
        (train, val, test first, then any other in name order)."""
        splits = self.raw["splits"]
        if split == "all":
            names = [s for s in ("train", "val", "test") if s in splits]
            return names + sorted(s for s in splits if s not in names)
        if split in splits:
            return [split]
        available = ", ".join(sorted(splits)) or "none"
        raise DataError(f"split '{split}' is not in {self.path} (available: {available}, or 'all')")

    def count(self, split: str) -> int:
        """Samples of `split` ("all": of every split), as the manifest counts them."""
        return sum(int(self.raw["splits"][name]["count"]) for name in self.resolve_split(split))

    def shards(self, split: str) -> list[_Shard]:
        """The non-empty shards of `split` in manifest order; a listed file that is missing is
        one line naming it."""
        shards = []
        remote = self.shard_dir if isinstance(self.shard_dir, Remote) else None
        for name in self.resolve_split(split):
            for entry in self.raw["splits"][name]["shards"]:  # types checked by read_manifest
                if remote is not None:  # a missing one is a transfer error when it is read
                    path: Path | str = remote.where(entry["name"])
                else:
                    path = self.shard_dir / entry["name"]
                    if not path.is_file():
                        raise DataError(f"{path} is listed in manifest.json but missing")
                if entry["count"] > 0:
                    shards.append(
                        _Shard(entry["name"], path, entry["count"], remote, entry.get("sha256"))
                    )
        return shards


@dataclass(frozen=True)
class _Shard:
    name: str  # file name inside the shard folder, e.g. "train-000003.tar"
    path: Path | str  # the local file, or its URL (as messages name it)
    count: int  # samples, from the manifest
    remote: Remote | None = None  # where a URL shard is fetched from
    sha256: str | None = None  # from the manifest (what the --cache-dir copy is checked against)


@dataclass(frozen=True)
class _Raw:
    """One still-encoded sample, as it travels through the shuffle buffer."""

    key: str
    image: bytes | None  # None: no image member (an error at decode time)
    attrs: bytes | None  # the attrs.txt bytes, None when absent
    shard: Path | str  # its shard's file or URL


def _seed(*parts: object) -> int:
    """A 64-bit seed from labelled parts; stable across processes and Python versions."""
    text = "/".join(str(p) for p in ("facegan-stream", *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _split_key(name: str) -> tuple[str | None, str]:
    """WebDataset's rule: the key ends at the first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return None, ""
    return name[:dot], name[dot + 1 :].lower()


def _sample_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of a tar's sample files in order: regular files only, without
    WebDataset's `__*__` metadata members. The one grouping rule of the local and URL readers."""
    for info in tar:
        if not info.isreg():
            continue
        name_key, ext = _split_key(info.name)
        if name_key is None or name_key.startswith("__"):
            continue  # WebDataset metadata members
        yield name_key, ext, info


@dataclass(frozen=True)
class _Index:
    """Where each sample's members lie in a shard tar (byte offsets of their data)."""

    keys: list[str]
    # int64 [n, 6]: image offset, image size (-1: none), attrs offset, attrs size (-1: none),
    # first data byte and end of the last data byte of the sample's members
    spans: np.ndarray


_LO, _HI = 4, 5  # columns of _Index.spans


@functools.lru_cache(maxsize=1024)
def _shard_index(path: Path, size: int, mtime_ns: int) -> _Index:
    """Index one shard by reading its tar headers with tarfile (cached per process).

    Parsing headers is the costly part of reading 64x64 samples (tarfile is pure Python), so
    each process does it once per shard; later reads seek straight to the data. `size` and
    `mtime_ns` are part of the cache key so a rewritten shard is indexed again.
    """
    keys: list[str] = []
    rows: list[list[int]] = []
    key = None
    row: list[int] = []
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for name_key, ext, info in _sample_members(tar):
            if name_key != key:
                key, row = name_key, [-1, -1, -1, -1, info.offset_data, 0]
                keys.append(key)
                rows.append(row)
            if ext in IMAGE_EXTS and row[1] < 0:  # one image per sample; keep the first
                row[0], row[1] = info.offset_data, info.size
            elif ext == ATTRS_EXT:
                row[2], row[3] = info.offset_data, info.size
            row[_HI] = max(row[_HI], info.offset_data + info.size)
        tar.members = []
    spans = np.asarray(rows, dtype=np.int64).reshape(len(rows), 6)
    return _Index(keys, spans)


def _read_samples(shard: _Shard, start: int, stop: int) -> Iterator[_Raw]:
    """Samples [start, stop) of one shard; skipped samples are never read.

    The shard's index (tar headers, parsed once per process) gives each sample's byte span; the
    samples of a run are contiguous, so they are read in a few large reads and sliced. A URL
    shard is streamed instead (`_read_remote_samples`), yielding the same samples, or, with a
    cache (`Remote.cache_dir`), read here from its verified local copy.
    """
    if shard.remote is not None:
        if shard.remote.cache_dir is None:
            yield from _read_remote_samples(shard, start, stop)
            return
        shard = _Shard(shard.name, shard.remote.cached(shard.name, shard.sha256), shard.count)
    try:
        st = shard.path.stat()
        index = _shard_index(shard.path, st.st_size, st.st_mtime_ns)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{shard.path} is unreadable or truncated: {e}") from e
    if len(index.keys) != shard.count:
        raise DataError(
            f"{shard.path} holds {len(index.keys)} samples but manifest.json says "
            f"{shard.count}; it is truncated or stale: run `facegan shard` again"
        )
    spans = index.spans
    try:
        with open(shard.path, "rb") as f:
            for first in range(start, stop, _READ_CHUNK):
                last = min(first + _READ_CHUNK, stop)
                lo, hi = int(spans[first, _LO]), int(spans[last - 1, _HI])
                f.seek(lo)
                slab = f.read(hi - lo)
                if len(slab) != hi - lo:
                    raise EOFError(f"unexpected end of data at byte {lo + len(slab)}")
                yield from _slice(slab, lo, index.keys, spans, first, last, shard.path)
    except (OSError, EOFError) as e:
        raise DataError(f"{shard.path} is unreadable or truncated: {e}") from e


def _slice(slab, lo: int, keys, spans: np.ndarray, first: int, last: int, where) -> Iterator[_Raw]:
    """Samples [first, last) cut out of `slab`, the bytes of their shard from offset `lo` on."""
    for i, (img_at, img_n, attrs_at, attrs_n, _, _) in enumerate(
        spans[first:last].tolist(), start=first
    ):
        img_at, attrs_at = img_at - lo, attrs_at - lo
        image = slab[img_at : img_at + img_n] if img_n >= 0 else None
        attrs = slab[attrs_at : attrs_at + attrs_n] if attrs_n >= 0 else None
        yield _Raw(keys[i], image, attrs, where)


def _read_remote_samples(shard: _Shard, start: int, stop: int) -> Iterator[_Raw]:
    """Samples [start, stop) of a URL shard, read in order from its stream (data/remote.py).

    A stream cannot seek: the samples before `start` are read past, and the transfer ends once
    `stop` is reached. A failed attempt (remote.TransferError) is retried from the first sample
    not yet yielded, so a retry never repeats or drops one; after the last attempt it is one
    DataError line naming the URL and the cause.
    """
    remote = shard.remote
    pos, err = start, None
    for _ in remote.attempts():
        samples = _stream_tar(shard, pos, stop)
        try:
            for raw in samples:
                yield raw
                pos += 1
            return
        except TransferError as e:
            err = e
        finally:
            samples.close()
    raise DataError(remote.failed(shard.name, err))


class _StreamIndex:
    """What this process learnt of a URL shard's layout while tarfile read it: the first `len(keys)`
    samples' spans (the columns of `_Index.spans`, flat), and `boundary`, the byte offset of the
    header of the first member after them; `complete` once a read reached the end of the tar."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.flat = array.array("q")
        self.boundary = 0
        self.complete = False

    def spans(self, n: int) -> np.ndarray:
        """The first `n` samples' spans, a copy (`flat` cannot grow while a view of it lives)."""
        return np.frombuffer(self.flat, dtype=np.int64, count=6 * n).reshape(n, 6).copy()

    def learn(self, index: int, key: str, row: list[int], boundary: int) -> None:
        """Sample `index` is complete and the next member starts at byte `boundary`. Several
        reads of one shard can be under way in a process (the main process plays its loader
        workers round-robin); each sample is recorded once, by the first read to finish it."""
        if len(self.keys) == index:
            self.keys.append(key)
            self.flat.extend(row)
            self.boundary = boundary


_stream_indexes: collections.OrderedDict[str, _StreamIndex] = collections.OrderedDict()
_STREAM_INDEXES = 1024  # URL shards whose layout a process remembers (least recently used go)


def _stream_index(url: str) -> _StreamIndex:
    index = _stream_indexes.pop(url, None) or _StreamIndex()
    _stream_indexes[url] = index
    while len(_stream_indexes) > _STREAM_INDEXES:
        _stream_indexes.popitem(last=False)
    return index


def _read_exactly(reader, n: int, keep: bool = True) -> bytes:
    """`n` bytes of the stream (`keep=False`: read past and dropped); EOFError if it ends."""
    parts, left = [], n
    while left > 0:
        block = reader.read(min(left, 1 << 20))
        if not block:
            raise EOFError(f"the stream ended {left} bytes early")
        left -= len(block)
        if keep:
            parts.append(block)
    return b"".join(parts)


def _stream_tar(shard: _Shard, start: int, stop: int) -> Iterator[_Raw]:
    """One attempt at samples [start, stop) of a URL shard, read in order from its stream.

    Python's tarfile parses the headers (about 40 us per member, three members per sample), and
    the samples are grouped by the rules `_shard_index` applies to local shards (same keys, same
    first image, same attrs), so both readers yield identical samples. What tarfile found is
    kept per process (`_StreamIndex`, like the local reader's `_shard_index`): a later read of
    the same shard (the next epoch) skips to its first sample and cuts the samples out of large
    reads by offset, without parsing, and hands over to tarfile where the known part ends. Each
    cut sample's tar header is checked to name its key, so a shard replaced at its URL is noticed
    (the index is dropped and the attempt fails, to be retried with tarfile)."""

    def mismatch(n: str) -> DataError:
        return DataError(
            f"{shard.path} holds {n} samples but manifest.json says {shard.count}; "
            "it is truncated or stale: upload the shard folder again"
        )

    url = str(shard.path)
    known = _stream_index(url)
    transfer = shard.remote.open(shard.name)
    reader = transfer.buffered()
    try:
        try:
            pos = 0  # bytes of the stream read so far
            # read together, before the first yield: another read of this shard in the process
            # may learn more samples while this one is suspended, and `boundary` must stay the
            # end of sample n_known - 1 (else phase 2 would number later samples from n_known)
            n_known, base, complete = len(known.keys), known.boundary, known.complete
            if start < n_known:  # 1. the known part: large reads, cut by offset
                last_known = min(stop, n_known)
                spans = known.spans(last_known)
                for first in range(start, last_known, _READ_CHUNK):
                    last = min(first + _READ_CHUNK, last_known)
                    # from the first sample's header (checked below) to the last one's data end
                    lo, hi = int(spans[first, _LO]) - tarfile.BLOCKSIZE, int(spans[last - 1, _HI])
                    _read_exactly(reader, lo - pos, keep=False)
                    slab = _read_exactly(reader, hi - lo)
                    pos = hi
                    _check_headers(slab, lo, known.keys, spans, first, last, url)
                    yield from _slice(slab, lo, known.keys, spans, first, last, url)
                if stop <= n_known:
                    return  # enough: closing the reader ends the transfer
            if complete:
                raise mismatch(str(n_known))
            # 2. the rest of the tar through tarfile, from the first member not yet known
            _read_exactly(reader, base - pos, keep=False)
            tar = tarfile.open(fileobj=reader, mode="r|", bufsize=tarfile.RECORDSIZE)
            index, key, image, attrs = n_known - 1, None, None, None
            row: list[int] = []
            for name_key, ext, info in _sample_members(tar):
                if name_key != key:
                    if key is not None:
                        known.learn(index, key, row, base + info.offset)
                        if index >= start:
                            yield _Raw(key, image, attrs, shard.path)
                    index, key, image, attrs = index + 1, name_key, None, None
                    row = [-1, -1, -1, -1, base + info.offset_data, 0]
                    if index >= stop:
                        if stop >= shard.count:
                            raise mismatch(f"more than {shard.count}")
                        return  # enough: closing the reader ends the transfer
                at = base + info.offset_data
                if ext in IMAGE_EXTS and row[1] < 0:  # one image per sample; keep the first
                    row[0], row[1] = at, info.size
                    if index >= start:  # samples before start are read past, never extracted
                        image = tar.extractfile(info).read()
                elif ext == ATTRS_EXT:
                    row[2], row[3] = at, info.size
                    if index >= start:
                        attrs = tar.extractfile(info).read()
                row[_HI] = max(row[_HI], at + info.size)
        except (tarfile.TarError, EOFError) as e:
            # the remembered offsets may be what is wrong (the file changed at its URL and this
            # read began at one): the retry reads the tar anew from its start
            _stream_indexes.pop(url, None)
            raise TransferError(f"the stream is not a readable tar ({e})") from None
        if key is not None:
            known.learn(index, key, row, -1)
            if start <= index < stop:
                yield _Raw(key, image, attrs, shard.path)
        if index + 1 != shard.count:
            _stream_indexes.pop(url, None)
            raise mismatch(str(index + 1))
        known.complete = True
    finally:
        transfer.close()


def _check_headers(slab: bytes, lo: int, keys, spans, first: int, last: int, url: str) -> None:
    """Each sample's first tar header (just before its first data byte) names its key, as when
    tarfile read this shard (names too long for the header's name field are not checked)."""
    for i in range(first, last):
        head = (keys[i] + ".").encode("utf-8", "surrogateescape")
        at = int(spans[i, _LO]) - tarfile.BLOCKSIZE - lo
        if len(head) < 100 and head.isascii() and slab[at : at + len(head)] != head:
            _stream_indexes.pop(url, None)
            raise TransferError(
                f"the file changed since this process last read it (sample {keys[i]} moved)"
            )


def _torchvision_decoder():
    """torchvision.io.decode_image, or None where this torchvision has no image ops."""
    try:
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.io.image import _has_image_ops

        if not _has_image_ops():
            return None
    except ImportError:
        return None

    def decode(data: bytes) -> torch.Tensor:
        # bytearray: torch.frombuffer warns on read-only buffers such as bytes
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)

    return decode


def _pil_decode(data: bytes) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        hwc = np.array(img.convert("RGB"))  # a writable copy
    return torch.from_numpy(hwc).permute(2, 0, 1)


@functools.cache
def _decoder():
    """Encoded JPEG/PNG/WebP bytes -> uint8 [3, H, W] RGB.

    torchvision's decoder took 43 us per 64x64 JPEG vs 91 us for PIL (PNG: 117 vs 144 us), so it
    is preferred; torchvision 0.29 deprecates it in favour of TorchCodec (a DeprecationWarning on
    every call, silenced around our batch decode), and PIL takes over where it is gone.
    """
    return _torchvision_decoder() or _pil_decode


@runtime_checkable
class DataSource(Protocol):
    """What training reads real batches from: `ShardStream` (decode while training) or
    `cache.DeviceCache` (decoded once into device memory). The trainer uses nothing else.

    One definition of an epoch for both: an epoch is `batches_per_epoch` batches of
    `batch_per_device` images on EVERY rank (the same count on each, so no rank runs out first
    and hangs a collective), i.e. `images_per_epoch` images over all ranks. Progress is counted
    in rank-batches drawn (`batches_seen`, saved in checkpoints), and the epoch of a run is
    batches_seen / batches_per_epoch. Both sources fill their equal epochs from N samples the
    same way: they wrap around, so an epoch holds every sample at least once, with fewer than
    one batch of duplicates per reading slot (slots = ranks x loader workers for the stream,
    ranks for the cache); see their docstrings.

    Exact resume: `batches(start_batch)` is exactly the tail, from rank-batch `start_batch`, of
    `batches(0)`, given an equal `layout()` (what the order depends on, stored in checkpoints).
    """

    num_samples: int  # N: samples of the split
    batch_per_device: int
    batches_per_epoch: int  # per rank, equal on every rank
    image_size: int
    attribute_names: list[str]

    @property
    def images_per_epoch(self) -> int: ...

    @property
    def bad_samples_total(self) -> int | None:
        """Undecodable samples replaced so far (None: such a sample raises)."""
        ...

    def layout(self) -> dict: ...

    def batches(self, start_batch: int = 0, *, pin_memory: bool = False) -> Iterator:
        """Infinite `(images uint8 [B, 3, S, S], attrs uint8 [B, A])` from rank-batch
        `start_batch` on (epochs follow each other; a restart is a new call)."""
        ...


class ShardStream(IterableDataset):
    """Infinite stream of `(images, attrs)` batches for one rank; see the module docstring.

    Args:
        shard_dir: folder with manifest.json and the shard tars (or its `Manifest`, read once).
        split: a split of the manifest ("train", "val", "test") or "all" (union of those present).
        batch_per_device: B, samples per yielded batch.
        rank, world_size: this process's rank and the number of ranks (plain ints).
        num_workers: DataLoader workers per rank that will read this stream (0 = main process).
            Part of the epoch plan: `make_loader` uses exactly this many.
        seed: seeds the per-epoch shard order and the shuffle buffers.
        shuffle_buffer: raw samples held for shuffling per worker (<= 1: no shuffling).
        start_epoch, start_batch: resume at rank-batch `start_batch` (may exceed an epoch) of
            `start_epoch`; the stream is then exactly the tail of the stream from (start_epoch, 0).
        decode: False yields `(list of encoded image bytes, attrs)` instead, e.g. to decode on GPU.
        return_keys: debug aid; batches become `(images, attrs, keys)` with the sample keys.
        skip_bad_samples: an undecodable image is replaced by another image of its batch (so
            shapes and the plan stay intact), warned about and counted in `bad_samples` (per
            process: a worker's count stays in the worker). A truncated tar always raises.
    """

    def __init__(
        self,
        shard_dir: Path | Manifest,
        *,
        split: str = "train",
        batch_per_device: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        start_epoch: int = 0,
        start_batch: int = 0,
        decode: bool = True,
        return_keys: bool = False,
        skip_bad_samples: bool = False,
    ) -> None:
        super().__init__()
        if batch_per_device < 1:
            raise ConfigError(f"batch per device must be >= 1 (got {batch_per_device})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 (got {num_workers})")
        if start_epoch < 0 or start_batch < 0:
            raise ConfigError(f"cannot start at epoch {start_epoch}, batch {start_batch}")
        self.manifest = shard_dir if isinstance(shard_dir, Manifest) else Manifest.read(shard_dir)
        self.shard_dir = self.manifest.shard_dir
        self.shards: list[_Shard] = self.manifest.shards(split)
        self.num_samples = sum(s.count for s in self.shards)  # N
        if self.num_samples < 1:
            raise DataError(f"split '{split}' of {self.shard_dir} has no samples")

        self.split = split
        self.image_size: int = self.manifest.image_size  # S
        self.attribute_names: list[str] = self.manifest.attribute_names
        self.batch_per_device = batch_per_device
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.decode, self.return_keys = decode, return_keys
        self.skip_bad_samples = skip_bad_samples
        self.bad_samples = 0  # replaced samples seen by this process
        # ... and by every process reading this stream (its loader workers included): a shared
        # counter created here, inherited by the workers, read by the trainer at log time
        self._bad_total = multiprocessing.Value("q", 0) if skip_bad_samples else None

        self.workers_per_rank = max(1, num_workers)  # K
        self.slots = world_size * self.workers_per_rank
        # b: batches per slot per epoch, the same for every slot
        self.batches_per_slot = math.ceil(self.num_samples / (self.slots * batch_per_device))
        self.batches_per_epoch: int = self.workers_per_rank * self.batches_per_slot  # per rank

    # ---- plan (pure functions of the manifest and the settings) ----

    @property
    def bad_samples_total(self) -> int | None:
        """Samples replaced so far by every process reading this stream; None without
        skip_bad_samples (an undecodable sample raises instead)."""
        return int(self._bad_total.value) if self._bad_total is not None else None

    @property
    def images_per_epoch(self) -> int:
        """Images one epoch draws over all ranks (>= num_samples: the wrapped duplicates)."""
        return self.batches_per_epoch * self.batch_per_device * self.world_size

    def batches(self, start_batch: int = 0, *, pin_memory: bool = False) -> Iterator:
        """Infinite `(images, attrs)` batches of this rank from rank-batch `start_batch` of
        epoch `start_epoch` on, read by `make_loader` (its workers start now, see
        `_StreamLoader`). The stream itself is left as it is: a restart is a new call.

        Creating the loader's iterator draws its workers' base seed from the torch RNG (even
        without workers); the trainer relies on when that happens (`train.run.restore`)."""
        stream = copy.copy(self)  # shares the bad-sample counter
        stream.start_batch = start_batch
        return iter(make_loader(stream, pin_memory=pin_memory))

    def samples(self, lo: int, hi: int, chunk: int = 1024) -> Iterator:
        """Samples [lo, hi) of the split in manifest order (no shuffling, no epochs), decoded:
        `(images uint8 [n, 3, S, S], attrs uint8 [n, A], keys)` with n <= chunk (the device
        cache's reader)."""
        raws: list[_Raw] = []
        start = 0
        for shard in self.shards:
            first, stop = max(lo - start, 0), min(hi - start, shard.count)
            for raw in _read_samples(shard, first, stop) if first < stop else ():
                raws.append(raw)
                if len(raws) == chunk:
                    yield (*self._decode_batch(raws), [r.key for r in raws])
                    raws = []
            start += shard.count
        if raws:
            yield (*self._decode_batch(raws), [r.key for r in raws])

    def layout(self) -> dict:
        """What the stream's content depends on; store it with a checkpoint, compare on resume."""
        return {
            "split": self.split,
            "num_samples": self.num_samples,
            "shards": [s.name for s in self.shards],
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_per_device": self.batch_per_device,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def position(self, batches_done: int) -> tuple[int, int]:
        """(epoch, batch in epoch) of the next batch after `batches_done` batches of this stream."""
        total = self.start_epoch * self.batches_per_epoch + self.start_batch + batches_done
        return divmod(total, self.batches_per_epoch)

    def epoch_shards(self, epoch: int) -> list[_Shard]:
        order = list(self.shards)
        random.Random(_seed("shards", self.seed, epoch)).shuffle(order)
        return order

    def slot_segments(self, epoch: int, slot: int) -> list[tuple[_Shard, int, int]]:
        """(shard, first sample, stop sample) runs that slot `slot` reads in epoch `epoch`."""
        order = self.epoch_shards(epoch)
        starts = list(itertools.accumulate((s.count for s in order), initial=0))[:-1]
        per_slot = self.batch_per_device * self.batches_per_slot
        pos, end = slot * per_slot, (slot + 1) * per_slot
        segments = []
        while pos < end:
            q = pos % self.num_samples
            i = bisect.bisect_right(starts, q) - 1
            first = q - starts[i]
            take = min(order[i].count - first, end - pos)
            segments.append((order[i], first, first + take))
            pos += take
        return segments

    # ---- reading ----

    def _shuffled(self, epoch: int, slot: int) -> Iterator[_Raw]:
        """The slot's B*b raw samples of `epoch`, through its seeded shuffle buffer."""
        rng = random.Random(_seed("buffer", self.seed, epoch, slot))
        size = self.shuffle_buffer
        buf: list[_Raw] = []
        for shard, first, stop in self.slot_segments(epoch, slot):
            for raw in _read_samples(shard, first, stop):
                if size <= 1:
                    yield raw
                elif len(buf) < size:
                    buf.append(raw)
                else:
                    i = rng.randrange(size)
                    yield buf[i]
                    buf[i] = raw
        rng.shuffle(buf)
        yield from buf

    def _collate(self, raws: list[_Raw]):
        images, attrs = self._decode_batch(raws)
        if self.return_keys:
            return images, attrs, [r.key for r in raws]
        return images, attrs

    def _decode_batch(self, raws: list[_Raw]):
        B, A = len(raws), len(self.attribute_names)
        if A:
            for raw in raws:
                if raw.attrs is None or len(raw.attrs.strip()) != A:
                    raise DataError(
                        f"{raw.shard}: sample {raw.key} lacks {A} attribute characters "
                        f"in {raw.key}.{ATTRS_EXT}"
                    )
            codes = np.frombuffer(b"".join(r.attrs.strip() for r in raws), dtype=np.uint8)
            codes = codes.reshape(B, A) - ord("0")
            if codes.max(initial=0) > 1:  # uint8 wraps, so this also catches chars below '0'
                bad = raws[int(np.argmax(codes.max(axis=1) > 1))]
                raise DataError(f"{bad.shard}: {bad.key}.{ATTRS_EXT} is not 0/1 characters")
            attrs = torch.from_numpy(codes)
        else:
            attrs = torch.zeros((B, 0), dtype=torch.uint8)
        if not self.decode:
            images = [r.image for r in raws]
        else:
            S = self.image_size
            images = torch.empty((B, 3, S, S), dtype=torch.uint8)
            bad = []
            decode = _decoder()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _TORCHVISION_DEPRECATION, DeprecationWarning)
                for i, raw in enumerate(raws):
                    try:
                        if raw.image is None:
                            raise ValueError(f"no image member ({'/'.join(IMAGE_EXTS)})")
                        img = decode(raw.image)
                        if img.shape != (3, S, S):
                            got = "x".join(map(str, img.shape[1:]))
                            raise ValueError(f"image is {got}, manifest says {S}x{S}")
                        images[i] = img
                    except (RuntimeError, ValueError, OSError) as e:
                        msg = f"{raw.shard}: sample {raw.key} cannot be decoded ({e})"
                        if not self.skip_bad_samples:
                            raise DataError(msg) from e
                        warnings.warn(msg + "; replaced by another sample", stacklevel=2)
                        bad.append(i)
            if bad:
                self.bad_samples += len(bad)
                if self._bad_total is not None:
                    with self._bad_total.get_lock():
                        self._bad_total.value += len(bad)
                good = [i for i in range(B) if i not in bad]
                if not good:
                    raise DataError(f"{raws[0].shard}: a whole batch of samples is undecodable")
                for j, i in enumerate(bad):
                    images[i] = images[good[j % len(good)]]
        return images, attrs

    def _worker_batches(self, worker: int) -> Iterator:
        """Infinite batches of loader worker `worker` (0 <= worker < K) of this rank."""
        K, B, b = self.workers_per_rank, self.batch_per_device, self.batches_per_slot
        j = self.start_batch + worker
        slot = self.rank * K + j % K
        epoch, skip = divmod(j // K, b)
        epoch += self.start_epoch
        while True:
            raws = self._shuffled(epoch, slot)
            try:
                # skipped batches go through the buffer undecoded, so the RNG stream is unchanged
                for _ in itertools.islice(raws, skip * B):
                    pass
                for _ in range(b - skip):
                    yield self._collate(list(itertools.islice(raws, B)))
            finally:
                raws.close()
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        if info is not None:
            if info.num_workers != self.workers_per_rank:
                raise RuntimeError(
                    f"ShardStream planned for {self.num_workers} workers is read by a DataLoader "
                    f"with {info.num_workers}; build the loader with make_loader()"
                )
            yield from self._worker_batches(info.id)
            return
        # main process: play the K workers round-robin, as the DataLoader would
        gens = [self._worker_batches(w) for w in range(self.workers_per_rank)]
        try:
            while True:
                for g in gens:
                    yield next(g)
        finally:
            for g in gens:
                g.close()


class _StreamLoader(DataLoader):
    """A DataLoader that re-raises a worker's DataError as the original one-line message.

    torch re-raises worker exceptions with the worker's traceback folded into the message; the
    CLI prints DataError messages as-is, so they are cut back to the line naming the file.
    """

    def __iter__(self):
        # Not a generator: the workers must start (fork) when iter() is called, not at the first
        # next(). The training loop forks them before W&B starts its service; a worker forked
        # after wandb.init dies in wandb's import hook ("not valid in a forked process").
        it = super().__iter__()
        _track_workers(getattr(it, "_workers", ()))
        return _OneLineErrors(it)


class _OneLineErrors:
    def __init__(self, it) -> None:
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except DataError as e:
            last = str(e).strip().splitlines()[-1]
            prefix = f"{DataError.__module__}.{DataError.__name__}: "
            if "DataLoader worker" in str(e) and last.startswith(prefix):
                raise DataError(last[len(prefix) :]) from None
            raise


# ---- stop signals are for the trainer, not for its loader workers ----
#
# A preemption or Ctrl-C often reaches every process: SLURM signals all processes of a job step,
# torchrun's agent forwards SIGTERM with `os.killpg` to each trainer's process group, a terminal
# sends SIGINT to the foreground group. A loader worker killed by it makes torch raise
# "DataLoader worker (pid N) is killed by signal" in the trainer (from its SIGCHLD handler, at any
# point), so the trainer could not finish its step and write its checkpoint (docs/RELIABILITY.md).
# Workers therefore ignore SIGTERM and SIGINT. They still stop: torch's shutdown sends them a stop
# message, and a worker whose trainer died exits on its own (torch's watchdog). One path needs
# help: an interpreter that exits with live workers (e.g. after an uncaught exception) has
# multiprocessing terminate (SIGTERM, now ignored) and then join its daemonic children, which
# would hang; an exit hook kills our workers first (atexit runs hooks newest first, and
# multiprocessing registered its own when it was imported).

_workers: weakref.WeakSet = weakref.WeakSet()


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn (see above)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _track_workers(processes) -> None:
    if not processes:
        return
    if not _workers:
        atexit.unregister(_kill_workers_at_exit)
        atexit.register(_kill_workers_at_exit)
    _workers.update(processes)


def _kill_workers_at_exit() -> None:
    live = [p for p in list(_workers) if p.is_alive()]
    if not live:
        return
    # torch's SIGCHLD handler would report the killed workers as crashed; we are exiting anyway
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in live:
        p.kill()
    for p in live:
        p.join(timeout=5)


def make_loader(
    stream: ShardStream, *, pin_memory: bool = False, prefetch_factor: int = 4
) -> DataLoader:
    """A DataLoader over `stream` with exactly the workers its plan assumes (batches pass as-is)."""
    workers = stream.num_workers
    return _StreamLoader(
        stream,
        batch_size=None,  # the stream yields whole batches
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
    )


def forget_layouts() -> None:
    """Drop what this process remembers of shards (tar indexes, URL offsets, hashed cache
    files), so that the next read is a new process's first read (`facegan bench data`)."""
    from facegan_dist.data import remote

    _shard_index.cache_clear()
    _stream_indexes.clear()
    remote._hashed.clear()


def bench_read(
    shard_dir: Path | str | Remote,
    batch: int = 256,
    seconds: float = 5,
    num_workers: int = 0,
    split: str = "all",
    decode: bool = True,
    first_pass: bool = False,
) -> dict:
    """Images/s of the training reader on `shard_dir` (what `facegan bench data` reports).

    The first batch (worker start-up, first shard open) is timed apart as `first_batch_s`. Each
    process indexes a shard's tar headers the first time it reads it (a URL shard: as tarfile
    streams it), so a run shorter than an epoch per process measures the cold rate, and a longer
    one mostly the warm rate. `first_pass` separates them: one whole epoch is timed first
    (`first_pass_images_per_s`, from a process that has read nothing yet), then `seconds` of
    the epochs after it (`images_per_s`).
    """
    if first_pass:
        forget_layouts()
    stream = ShardStream(
        shard_dir, split=split, batch_per_device=batch, num_workers=num_workers, decode=decode
    )
    loader = make_loader(stream)
    t0, cpu0 = time.perf_counter(), time.process_time()
    it = iter(loader)
    next(it)
    first_batch_s = time.perf_counter() - t0
    first = {}
    if first_pass:
        for _ in range(stream.batches_per_epoch - 1):
            next(it)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        n = stream.batches_per_epoch * batch
        first = {
            "first_pass_images_per_s": n / wall,
            "first_pass_images_per_cpu_s": n / cpu if cpu > 0 else float("nan"),
            "first_pass_seconds": wall,
        }
    images, batches = 0, 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - t0) < seconds:
        out = next(it)
        images += len(out[0])
        batches += 1
    cpu = time.process_time() - cpu0
    del it
    return {
        "images_per_s": images / elapsed,
        # this process's CPU time: with num_workers=0 all reading happens here, so images per
        # CPU second is the per-process rate free of contention from other processes
        "images_per_cpu_s": images / cpu if cpu > 0 else float("nan"),
        **first,
        "images": images,
        "batches": batches,
        "seconds": elapsed,
        "first_batch_s": first_batch_s,
        "batch": batch,
        "num_workers": num_workers,
        "decode": decode,
        "image_size": stream.image_size,
        "num_samples": stream.num_samples,
    }
