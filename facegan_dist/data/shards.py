"""Write and verify WebDataset shards (format: docs/SHARDS.md).

`write_shards(cfg)` crops and resizes every image of a source once, writes one shard set per split
(`{split}-{index:06d}.tar`) with worker processes, and writes `manifest.json` last and atomically.
`verify_shards(out)` re-hashes and re-counts what a manifest describes, and checks that every
sample's `attrs.txt` has one `0`/`1` per manifest `attribute_names` entry (none when it is empty).

Work split: the main process lists the source, plans the shards and sends each worker chunks of
128 image ids; a worker (which opened the source once, zip included) decodes, crops, resizes,
encodes and appends the samples to an in-memory `wds.TarWriter`, returning the tar members'
bytes. The main process appends them to the shard file in plan order and ends the tar, so shard
bytes do not depend on --workers or on which worker finished first.

Image pipeline (`process_image`, the unit a benchmark times): decode -> crop box -> one
high-quality resize -> encode. For JPEG the decoder is asked (`Image.draft`) to downscale by
2/4/8 in the DCT while the crop box stays >= 2x the target side, so big images decode fast and the
final LANCZOS resize still has at least 2x oversampling. The crop is applied through `resize(box=)`
so no intermediate image is made.

Resume: each shard is written to `name.tmp`, fsynced and renamed; then a record goes to
`OUT/.state/name.json` (settings fingerprint, hash of its sample list, sha256, bytes, count,
skipped). A re-run keeps a shard whose record matches and whose file still hashes to the record,
and redoes the others, so an interrupted run resumed gives the same bytes and the same manifest as
an uninterrupted one. The manifest has no timestamps for that reason.

Invariant: if `manifest.json` exists, every shard it names is complete and matches it. A re-run that
must rewrite anything removes the old manifest first; output written with different settings is
refused before anything is touched. A damaged manifest (what `stream.read_manifest` rejects) is
rebuilt from the .state records when `.state/run.json` says the settings match, which is what the
readers' error message tells the user to do.

Failures: a write that fails (disk full, file size limit) is one DataError naming the file; Ctrl-C
(the pool workers ignore SIGINT, the main process stops them) and errors alike delete the partial
shards and temp files, and keep the finished shards and their records, so the same command resumes.
A source none of whose images decode is an error, not a 0-image manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from facegan_dist import __version__
from facegan_dist.config import ShardConfig
from facegan_dist.data.celeba import (
    ImageReader,
    ReaderRef,
    Sample,
    Source,
    open_source,
)
from facegan_dist.data.remote import Remote, is_url, sha256_file
from facegan_dist.errors import ConfigError, DataError
from facegan_dist.paths import out_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = ".state"
RUN_RECORD = "run.json"
SPLIT_ORDER = ("train", "val", "test")
SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar$")

# Aligned CelebA is 178x218; the standard face box is 128x128 centred at (x=89, y=121)
# (progressive_growing_of_gans dataset_tool.py create_celeba: img[cy-64:cy+64, cx-64:cx+64]).
CELEBA_SIZE = (178, 218)
CELEBA_BOX = (25, 57, 153, 185)  # left, top, right, bottom
MIN_OVERSAMPLE = 2  # JPEG draft keeps the crop box at >= 2x the target side
REDUCING_GAP = 3.0  # PIL: box-reduce first only when shrinking >= 6x; then LANCZOS
RESAMPLE = Image.Resampling.LANCZOS

# Tar member metadata is fixed so a shard's bytes depend only on (source, settings).
TAR_MTIME = 0
TAR_USER = TAR_GROUP = "facegan"
TAR_MODE = 0o444

_FLAGS = {
    "size": "--size",
    "crop": "--crop",
    "format": "--format",
    "quality": "--quality",
    "limit": "--limit",
    "split": "--split",
    "shard_size": "--shard-size",
    "seed": "--seed",
    "labels": "--labels",
}


class BadImageError(DataError):
    """One image could not be decoded; the message is the reason (skipped unless --strict)."""


# ----------------------------------------------------------------------------- image pipeline


def resolve_crop(crop: str, is_celeba: bool) -> str:
    """`auto` -> `celeba` for CelebA sources, `center` for plain folders."""
    if crop == "auto":
        return "celeba" if is_celeba else "center"
    return crop


def crop_box(width: int, height: int, crop: str) -> tuple[float, float, float, float]:
    """The source rectangle (left, top, right, bottom) that becomes the square output.

    celeba: the 128x128 aligned-face box, scaled proportionally for images that are not 178x218;
    center: the largest centred square; none: the whole image (squashed to a square).
    """
    if crop == "celeba":
        sx, sy = width / CELEBA_SIZE[0], height / CELEBA_SIZE[1]
        left, top, right, bottom = CELEBA_BOX
        return (left * sx, top * sy, right * sx, bottom * sy)
    if crop == "center":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (float(left), float(top), float(left + side), float(top + side))
    if crop == "none":
        return (0.0, 0.0, float(width), float(height))
    raise ValueError(f"unknown crop {crop!r}")


def draft_scale(box_w: float, box_h: float, size: int) -> int:
    """Largest JPEG DCT downscale (8, 4, 2, 1) that keeps the crop box >= 2x `size` per side."""
    for s in (8, 4, 2):
        if box_w / s >= MIN_OVERSAMPLE * size and box_h / s >= MIN_OVERSAMPLE * size:
            return s
    return 1


def load_face(data: bytes, size: int, crop: str) -> Image.Image:
    """Decode `data`, crop (`celeba`/`center`/`none`) and resize to an RGB `size`x`size` image.

    Raises BadImageError (with a one-line reason) for anything PIL cannot decode, truncated
    JPEGs included: `load()` runs inside the try, with PIL's LOAD_TRUNCATED_IMAGES left off.
    """
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        box = crop_box(width, height, crop)
        if im.format == "JPEG":
            s = draft_scale(box[2] - box[0], box[3] - box[1], size)
            if s > 1:
                # Request (w//s, h//s): PIL then picks exactly scale s (w // (w//s) is in [s, 2s)).
                got = im.draft("RGB", (width // s, height // s))
                if got is not None:
                    scale = round(width / got[1][2])
                    box = (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
        return im.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    except Exception as exc:  # PIL raises many types on corrupt data; all mean "skip this image"
        raise BadImageError(_reason(exc)) from None


def encode_image(im: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode for the shard: jpg (4:4:4 chroma: at 64 px 4:2:0 visibly bleeds colour), png
    (lossless; quality ignored) or webp (lossy at `quality`)."""
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, "JPEG", quality=quality, subsampling=0)
    elif fmt == "png":
        im.save(buf, "PNG", compress_level=6)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buf.getvalue()


def process_image(
    data: bytes, size: int, crop: str, fmt: str, quality: int, is_celeba: bool = True
) -> bytes:
    """Source image bytes -> encoded shard image bytes (decode + crop + resize + encode)."""
    return encode_image(load_face(data, size, resolve_crop(crop, is_celeba)), fmt, quality)


def _reason(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if isinstance(exc, OSError) and "truncated" in msg:
        return f"truncated image ({msg})"
    return f"cannot decode ({type(exc).__name__}: {msg})" if msg else type(exc).__name__


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ShardPlan:
    name: str  # {split}-{index:06d}.tar
    split: str
    index: int
    samples: tuple[Sample, ...]
    samples_sha256: str  # hash of (key, member, stamp, partition, attrs) of every sample, in order


def shard_settings(cfg: ShardConfig, source: Source) -> dict[str, Any]:
    """The manifest `settings` block: everything the shard bytes depend on (crop resolved).

    `labels` appears only when it is not "none", so unlabelled output (manifest, fingerprint,
    resume) is byte for byte what it was before `--labels` existed.
    """
    labels = {"labels": source.labels} if source.labels != "none" else {}
    return {
        "size": cfg.size,
        "crop": resolve_crop(cfg.crop, source.is_celeba),
        "format": cfg.format,
        "quality": cfg.quality,
        "limit": cfg.limit,
        "split": cfg.split,
        "shard_size": cfg.shard_size,
        "seed": cfg.seed,
        **labels,
    }


def plan_shards(cfg: ShardConfig, source: Source) -> list[ShardPlan]:
    """Select each split's samples, shuffle them by seed (then `--limit`), cut into shards."""
    if cfg.split == "all":
        splits = [s for s in SPLIT_ORDER if source.split_samples(s)]
    else:
        splits = [cfg.split]
        if not source.split_samples(cfg.split):
            hint = " (a plain image folder is all 'train')" if not source.is_celeba else ""
            raise ConfigError(f"--split {cfg.split}: {source.path} has no {cfg.split} images{hint}")
    plans = []
    for split in splits:
        samples = source.split_samples(split)  # key order: a stable start for the shuffle
        random.Random(f"facegan-shard:{cfg.seed}:{split}").shuffle(samples)
        if cfg.limit is not None:
            samples = samples[: cfg.limit]
        for index, start in enumerate(range(0, len(samples), cfg.shard_size)):
            chunk = tuple(samples[start : start + cfg.shard_size])
            h = hashlib.sha256()
            for s in chunk:
                h.update(f"{s.key}\t{s.member}\t{s.stamp}\t{s.partition}\t{s.attrs}\n".encode())
            plans.append(ShardPlan(f"{split}-{index:06d}.tar", split, index, chunk, h.hexdigest()))
    return plans


# ----------------------------------------------------------------------------- workers and writer

CHUNK_IMAGES = 128  # images per worker task: one IPC round trip per chunk, not per image
INFLIGHT_PER_WORKER = 4  # chunks queued per worker: keeps workers busy, bounds memory


@dataclass(frozen=True)
class _Encode:
    size: int
    crop: str  # resolved: celeba | center | none
    fmt: str
    quality: int


_WORKER: dict[str, ImageReader] = {}  # per process: the open source ("reader")


def _init_worker(ref: ReaderRef) -> None:
    """Process-pool initializer: open the source once per worker (a zip's directory too).

    Ctrl-C reaches the whole foreground process group; the workers ignore it so that only the
    main process stops (it cancels the pool and deletes the partial shards), instead of each
    idle worker dying with a KeyboardInterrupt traceback of its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["reader"] = ImageReader(ref)


def _tar_writer(fileobj: Any) -> Any:
    import webdataset as wds

    return wds.TarWriter(
        fileobj,
        user=TAR_USER,
        group=TAR_GROUP,
        mode=TAR_MODE,
        mtime=TAR_MTIME,
        encoder=False,
        format="PAX_FORMAT",  # ustar headers for short ASCII names; long/non-ASCII keys still work
    )


_Item = tuple[str, str, "str | None", int]  # key, member, attrs, partition


def _encode_chunk(enc: _Encode, items: tuple[_Item, ...]) -> tuple[bytes, list[tuple[int, str]]]:
    """Worker task: read + crop + resize + encode each image and append it as tar members.

    Returns the members' bytes (a tar without its end-of-archive blocks, written by
    `wds.TarWriter`: plain tars concatenate member by member) and the (index, reason) of the
    images that were skipped. Building the members here keeps the main process to plain writes.
    """
    reader = _WORKER["reader"]
    buf = io.BytesIO()
    tar = _tar_writer(buf)
    bad: list[tuple[int, str]] = []
    for i, (key, member, attrs, partition) in enumerate(items):
        try:
            data = reader.read(member)
        except Exception as exc:  # vanished file, bad zip member CRC, ...
            bad.append((i, f"cannot read ({' '.join(str(exc).split())})"))
            continue
        try:
            img = encode_image(load_face(data, enc.size, enc.crop), enc.fmt, enc.quality)
        except BadImageError as exc:
            bad.append((i, str(exc)))
            continue
        sample = {"__key__": key, enc.fmt: img, "partition.cls": b"%d" % partition}
        if attrs is not None:
            sample["attrs.txt"] = attrs.encode("ascii")
        tar.write(sample)
    members_end = tar.tarstream.offset  # close() appends the end-of-archive blocks after this
    tar.close()
    return buf.getbuffer()[:members_end].tobytes(), bad


def _tar_trailer(members_bytes: int) -> bytes:
    """What tarfile's close() appends: two zero blocks, then zeros up to a whole record."""
    end = members_bytes + 2 * tarfile.BLOCKSIZE
    return bytes(2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE)


class _HashingFile:
    """Write-through file wrapper that hashes and counts the bytes."""

    def __init__(self, raw: io.BufferedWriter):
        self.raw, self.sha, self.nbytes = raw, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        return self.raw.write(b)


class _ShardFile:
    """One shard being written (main process): `name.tmp` <- chunks in order -> fsync -> rename."""

    def __init__(self, out: Path, plan: ShardPlan, strict: bool):
        self.out, self.plan, self.strict = out, plan, strict
        self.final, self.tmp = out / plan.name, out / (plan.name + ".tmp")
        try:
            self.raw = open(self.tmp, "wb")  # closed in finish() or abort()
        except OSError as exc:
            raise _write_error(self.tmp, exc) from None
        self.file = _HashingFile(self.raw)
        self.count = 0
        self.skipped: list[dict[str, str]] = []

    def add(self, samples: tuple[Sample, ...], members: bytes, bad: list[tuple[int, str]]) -> None:
        for i, reason in bad:
            if self.strict:
                raise BadImageError(f"{samples[i].file}: {reason} (--strict)")
            self.skipped.append({"file": samples[i].file, "reason": reason})
        try:
            self.file.write(members)
        except OSError as exc:  # disk full, file size limit, I/O error
            raise _write_error(self.tmp, exc) from None
        self.count += len(samples) - len(bad)

    def finish(self, fingerprint: str) -> dict[str, Any]:
        """End the tar, fsync and rename it, then write its .state record (returned)."""
        try:
            self.file.write(_tar_trailer(self.file.nbytes))
            self.raw.flush()
            os.fsync(self.raw.fileno())
            self.raw.close()
            os.replace(self.tmp, self.final)
        except OSError as exc:
            raise _write_error(self.tmp, exc) from None
        record = {
            "fingerprint": fingerprint,
            "name": self.plan.name,
            "split": self.plan.split,
            "index": self.plan.index,
            "samples_sha256": self.plan.samples_sha256,
            "count": self.count,
            "bytes": self.file.nbytes,
            "sha256": self.file.sha.hexdigest(),
            "skipped": self.skipped,
        }
        _write_json_atomic(self.out / STATE_DIR / (self.plan.name + ".json"), record)
        # Test hook: a pause after each finished shard, so a test's Ctrl-C lands mid-run.
        if delay_s := float(os.environ.get("FACEGAN_TEST_SHARD_DELAY_S", "0")):
            time.sleep(delay_s)
        return record

    def abort(self) -> None:
        """Drop the partial shard. Closing flushes buffered bytes, which fails again on a full
        disk: that error must not replace the one being reported."""
        try:
            self.raw.close()
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


class _Runner:
    """Encodes the planned shards' images in chunks (worker processes, or in-process for one
    worker) and writes each shard as its chunks come back, in plan order.

    Workers decode, encode and build tar members; the main process owns every file and only
    appends bytes, so it is not the bottleneck however many workers there are. A shard's chunks
    arrive roughly in order (FIFO pool, bounded window), so only a few shards are open at a time.
    """

    def __init__(
        self,
        todo: list[ShardPlan],
        ref: ReaderRef,
        enc: _Encode,
        workers: int,
        out: Path,
        fingerprint: str,
        strict: bool,
    ):
        self.todo, self.ref, self.enc, self.out = todo, ref, enc, out
        self.fingerprint, self.strict = fingerprint, strict
        self.jobs = [
            (si, ci, plan.samples[start : start + CHUNK_IMAGES])
            for si, plan in enumerate(todo)
            for ci, start in enumerate(range(0, len(plan.samples), CHUNK_IMAGES))
        ]
        self.n_chunks = [math.ceil(len(p.samples) / CHUNK_IMAGES) for p in todo]
        self.next_chunk = [0] * len(todo)
        self.waiting: dict[tuple[int, int], tuple[bytes, list[tuple[int, str]]]] = {}
        self.files: dict[int, _ShardFile] = {}
        self.workers = max(1, min(workers, len(self.jobs)))
        self.pool: cf.ProcessPoolExecutor | None = None
        self.inflight: dict[cf.Future, tuple[int, int, int]] = {}
        self.job_iter = iter(self.jobs)

    def start(self) -> None:
        """Start the worker processes (before any thread exists: they are forked)."""
        if self.workers == 1 or not self.jobs:
            return
        # fork on Linux: workers start in milliseconds with PIL already imported (macOS and
        # Windows keep their default, spawn: forking there is unsafe or unavailable).
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else None)
        self.pool = cf.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.ref,)
        )
        self._submit_more()

    def _submit_more(self) -> None:
        assert self.pool is not None
        while len(self.inflight) < self.workers * INFLIGHT_PER_WORKER:
            job = next(self.job_iter, None)
            if job is None:
                return
            si, ci, samples = job
            fut = self.pool.submit(_encode_chunk, self.enc, _items(samples))
            self.inflight[fut] = (si, ci, len(samples))

    def records(self, on_images: Callable[[int], None]) -> Iterator[dict[str, Any]]:
        """Yield each shard's .state record as the shard is finished."""
        if self.pool is None:
            _WORKER["reader"] = ImageReader(self.ref)
            try:
                for si, ci, samples in self.jobs:
                    results = _encode_chunk(self.enc, _items(samples))
                    yield from self._deliver(si, ci, results)
                    on_images(len(samples))
            finally:
                _WORKER.pop("reader").close()
            return
        while self.inflight:
            done, _ = cf.wait(self.inflight, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                si, ci, n = self.inflight.pop(fut)
                results = fut.result()
                yield from self._deliver(si, ci, results)
                on_images(n)
            self._submit_more()

    def _deliver(
        self, si: int, ci: int, results: tuple[bytes, list[tuple[int, str]]]
    ) -> Iterator[dict[str, Any]]:
        self.waiting[(si, ci)] = results
        while (si, self.next_chunk[si]) in self.waiting:
            c = self.next_chunk[si]
            members, bad = self.waiting.pop((si, c))
            shard = self.files.get(si)
            if shard is None:
                shard = self.files[si] = _ShardFile(self.out, self.todo[si], self.strict)
            shard.add(
                self.todo[si].samples[c * CHUNK_IMAGES : (c + 1) * CHUNK_IMAGES], members, bad
            )
            self.next_chunk[si] = c + 1
            if self.next_chunk[si] == self.n_chunks[si]:
                record = shard.finish(self.fingerprint)
                del self.files[si]
                yield record

    def close(self, failed: bool) -> None:
        """Stop the workers; on failure also delete the partial shards (records stay valid)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=failed)
            self.pool = None
        for shard in self.files.values():
            shard.abort()
        self.files.clear()


def _items(samples: tuple[Sample, ...]) -> tuple[_Item, ...]:
    return tuple((s.key, s.member, s.attrs, s.partition) for s in samples)


# ----------------------------------------------------------------------------- write_shards


@dataclass
class ShardResult:
    out: Path
    manifest: dict[str, Any]
    kept: int  # shards reused from an earlier (interrupted or identical) run
    written: int  # shards written by this run
    images_processed: int  # images decoded by this run (kept shards excluded)
    seconds: float  # wall time of the writing phase
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images_processed / self.seconds if self.seconds > 0 else 0.0


def write_shards(
    cfg: ShardConfig,
    *,
    labels: str = "none",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> ShardResult:
    """Shard `cfg.src` into `cfg.out` (resuming a matching earlier run); return what was done.

    `labels` is `--labels` (celeba.LABEL_MODES): "subfolders" makes a plain folder's first-level
    subfolders the classes, stored as one-hot attributes. (It belongs in ShardConfig; it is a
    keyword here until config.py grows the field.)
    Raises ConfigError/DataError (one line, naming the file or flag) for bad input, an unwritable
    output, or an output written with different settings (refused before touching it).
    """
    from facegan_dist.progress import make_progress

    cfg.validate()
    say = log or (lambda _msg: None)
    source = open_source(cfg.src, labels)
    settings = shard_settings(cfg, source)
    source_info = {"path": str(source.path), "kind": source.kind}
    plans = plan_shards(cfg, source)
    # After the source is read (a bad source creates no folder), before any shard is written.
    out = out_dir(Path(cfg.out).expanduser().absolute(), "--out")
    manifest_damaged = _check_existing_output(out, settings, source_info)
    _prepare_output(out)
    # Slow (torch): after the checks, so bad input fails fast; before timing and the workers'
    # fork, so they inherit it.
    import webdataset  # noqa: F401

    run_record = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "source": source_info,
        "settings": settings,
    }
    fingerprint = hashlib.sha256(json.dumps(run_record, sort_keys=True).encode()).hexdigest()

    records: dict[str, dict[str, Any]] = {}
    todo: list[ShardPlan] = []
    for plan in plans:
        rec = _kept_record(out, plan, fingerprint)
        if rec is not None:
            records[plan.name] = rec
        else:
            todo.append(plan)
    planned = {p.name for p in plans}
    strays = [p for p in out.iterdir() if SHARD_RE.match(p.name) and p.name not in planned]
    if todo or strays or manifest_damaged:
        # The old manifest (same settings) is about to stop describing the folder, or describes
        # nothing (damaged, rebuilt below from the .state records): drop it first.
        (out / MANIFEST).unlink(missing_ok=True)
    _remove_leftovers(out, planned)
    _write_json_atomic(out / STATE_DIR / RUN_RECORD, run_record)

    counts = {s: sum(len(p.samples) for p in plans if p.split == s) for s in SPLIT_ORDER}
    say(
        f"{source.kind} {source.path}: {len(source.samples)} images; writing "
        + ", ".join(f"{s} {n}" for s, n in counts.items() if n)
        + f" as {settings['size']}px {settings['format']} (crop {settings['crop']}) -> {out}"
    )
    if source.labels != "none":
        names = source.attribute_names
        more = f", ... ({len(names)})" if len(names) > 12 else ""
        say(f"labels from {source.labels}: {', '.join(names[:12])}{more}")
    if records:
        say(f"kept {len(records)} finished shard(s) from an earlier run")

    enc = _Encode(settings["size"], settings["crop"], settings["format"], settings["quality"])
    runner = _Runner(todo, source.reader, enc, cfg.workers, out, fingerprint, cfg.strict)
    total_images = sum(len(p.samples) for p in todo)
    done_images = 0
    start = time.perf_counter()
    failed = True
    try:
        runner.start()  # fork the workers before the progress bar starts its thread
        with make_progress(progress) as bar:
            bar_task = bar.add_task("shard", total=total_images, rate="")

            def on_images(n: int) -> None:
                nonlocal done_images
                done_images += n
                rate = done_images / max(time.perf_counter() - start, 1e-9)
                bar.update(bar_task, completed=done_images, rate=f"{rate:,.0f} img/s")

            for rec in _guard(out, runner.records(on_images)):
                records[rec["name"]] = rec
        failed = False
    finally:
        runner.close(failed)
    seconds = time.perf_counter() - start

    manifest = _build_manifest(source_info, settings, source.attribute_names, plans, records)
    if not manifest["total"]:
        _refuse_empty(out, source.path, plans, manifest["skipped"])
    _write_json_atomic(out / MANIFEST, manifest)
    return ShardResult(
        out=out,
        manifest=manifest,
        kept=len(plans) - len(todo),
        written=len(todo),
        images_processed=total_images,
        seconds=seconds,
        skipped=manifest["skipped"],
    )


def _guard(out: Path, records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pass records through, turning worker/disk failures into one-line domain errors."""
    try:
        yield from records
    except DataError:
        raise
    except BrokenProcessPool:
        raise DataError(
            f"a worker process died while writing shards to {out} (out of memory?); "
            "re-run the same command to resume"
        ) from None
    except OSError as exc:
        raise _write_error(Path(exc.filename) if exc.filename else out, exc) from None


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _write_error(path: Path, exc: OSError) -> DataError:
    """A failed write as one line. The folder stays resumable: finished shards and their records
    are kept, partial files are deleted by the caller (or by the next run), no manifest is left
    that names an unfinished shard."""
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    todo = "free some space and " if exc.errno in _NO_SPACE else ""
    return DataError(
        f"cannot write {path}: {reason}; finished shards are kept: "
        f"{todo}re-run the same command to resume"
    )


def _refuse_empty(out: Path, src: Path, plans: list[ShardPlan], skipped: list[dict]) -> None:
    """Every image was unreadable: no 0-image manifest. The empty shards go too, so the folder
    holds no output (only .state/run.json, which makes a re-run compare its settings)."""
    for plan in plans:
        (out / plan.name).unlink(missing_ok=True)
        (out / STATE_DIR / (plan.name + ".json")).unlink(missing_ok=True)
    first = f"{skipped[0]['file']}: {skipped[0]['reason']}" if skipped else "none listed"
    raise DataError(
        f"no readable image in {src}: all {len(skipped)} image file(s) are unreadable "
        f"(first: {first}); nothing written to {out}"
    )


def _kept_record(out: Path, plan: ShardPlan, fingerprint: str) -> dict[str, Any] | None:
    """The .state record of `plan` if it matches and the shard file still hashes to it."""
    rec = _read_json(out / STATE_DIR / (plan.name + ".json"))
    if (
        not isinstance(rec, dict)
        or rec.get("fingerprint") != fingerprint
        or rec.get("samples_sha256") != plan.samples_sha256
    ):
        return None
    path = out / plan.name
    try:
        if path.stat().st_size != rec.get("bytes") or sha256_file(path) != rec.get("sha256"):
            return None
    except OSError:
        return None
    return rec


def _check_existing_output(out: Path, settings: dict[str, Any], source: dict[str, str]) -> bool:
    """Refuse (touching nothing) an output written with other settings or from another source.

    The settings come from manifest.json, or from .state/run.json (written first) when there is
    no manifest (an interrupted run) or it is damaged. A damaged manifest with a readable run.json
    is rebuilt by this run from the .state records (what the readers' error message tells the
    user to do); the return value says so. Without either file nothing can be compared: refused.
    """
    from facegan_dist.data.stream import ManifestError, read_manifest

    manifest_path, run_path = out / MANIFEST, out / STATE_DIR / RUN_RECORD
    prev, label, damaged = None, None, None
    if manifest_path.is_file():
        try:
            prev, label = read_manifest(out), manifest_path
        except ManifestError as exc:
            if not exc.repairable:
                raise DataError(f"{exc}; use a new --out") from None
            damaged = exc.problem  # the reader's diagnosis, without its advice
    if prev is None and run_path.is_file():
        prev, label = _read_json(run_path), run_path
        if not isinstance(prev, dict) or not isinstance(prev.get("settings"), dict):
            also = f" ({damaged})" if damaged else ""
            raise DataError(
                f"{run_path} is unreadable{also}, so the settings of the shards in {out} are "
                f"unknown; delete {out} or use a new --out"
            )
    if prev is None:
        if damaged:
            raise DataError(
                f"{damaged}, and {run_path} is missing, so the settings of the shards in {out} "
                f"are unknown; delete {out} or use a new --out"
            )
        return False
    old_src = prev.get("source") or {}
    if old_src != source:
        raise ConfigError(
            f"{out} was written from {old_src.get('path')} ({old_src.get('kind')}), "
            f"not {source['path']}; use a new --out"
        )
    old = prev["settings"]
    # Keys present on one side only count too: `labels` is absent when it is "none".
    keys = [*settings, *(k for k in old if k in _FLAGS and k not in settings)]
    diffs = [k for k in keys if old.get(k) != settings.get(k)]
    if diffs:
        was = " ".join(f"{_FLAGS[k]} {_flag_value(old.get(k))}" for k in diffs)
        now = " ".join(f"{_FLAGS[k]} {_flag_value(settings.get(k))}" for k in diffs)
        raise ConfigError(
            f"{out} was written with {was} (this run: {now}, see {label.name}); use a new --out"
        )
    return damaged is not None


def _prepare_output(out: Path) -> None:
    """Create OUT/.state and check that a file can be made in it (out_dir checked OUT itself)."""
    try:
        (out / STATE_DIR).mkdir(exist_ok=True)
        test = out / STATE_DIR / f".write-test-{os.getpid()}"
        test.write_bytes(b"")
        test.unlink()
    except OSError as exc:
        raise DataError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def _remove_leftovers(out: Path, planned: set[str]) -> None:
    """Delete temp files of killed runs, and shards/records this plan no longer contains."""
    for path in out.iterdir():
        if path.name.endswith(".tmp") or (SHARD_RE.match(path.name) and path.name not in planned):
            path.unlink(missing_ok=True)
    for path in (out / STATE_DIR).iterdir():
        stale_record = path.suffix == ".json" and path.name[:-5] not in planned
        if path.name.endswith(".tmp") or (stale_record and path.name != RUN_RECORD):
            path.unlink(missing_ok=True)


def _build_manifest(
    source: dict[str, str],
    settings: dict[str, Any],
    attribute_names: tuple[str, ...],
    plans: list[ShardPlan],
    records: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    for plan in plans:
        rec = records[plan.name]
        entry = splits.setdefault(plan.split, {"count": 0, "shards": []})
        entry["count"] += rec["count"]
        entry["shards"].append(
            {
                "name": plan.name,
                "count": rec["count"],
                "bytes": rec["bytes"],
                "sha256": rec["sha256"],
            }
        )
        skipped += rec["skipped"]
    splits = {s: splits[s] for s in SPLIT_ORDER if s in splits}
    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "source": source,
        "settings": settings,
        "attribute_names": list(attribute_names),
        "splits": splits,
        "total": sum(e["count"] for e in splits.values()),
        "skipped": sorted(skipped, key=lambda s: (s["file"], s["reason"])),
    }


# ----------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    out: Path | str  # the folder, or its URL
    shards: int  # shards the manifest names
    samples: int  # samples counted in the shards that were readable
    problems: list[tuple[str, str]]  # (shard name or "manifest.json", what is wrong)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(out: Path | str | Remote) -> VerifyReport:
    """Re-hash, re-size and re-count every shard named by `out/manifest.json`; report strays.

    `out` may be a URL prefix (data/remote.py): each shard is then downloaded (with the
    transfer retries) into a temporary folder, checked there and deleted, or with a cache
    (`Remote.cache_dir`) into the cache, where it stays once its sha256 matches (a mismatch is
    retried, then reported); a shard that cannot be fetched is a problem naming the cause; strays
    cannot be listed over a URL.
    Raises DataError only when there is no readable manifest; shard problems are returned.
    """
    import tempfile
    from contextlib import nullcontext

    from facegan_dist.data.stream import read_manifest

    remote = out if isinstance(out, Remote) else Remote(str(out)) if is_url(out) else None
    if remote is None:
        out = Path(out).expanduser()
        path = out / MANIFEST
        if not path.is_file():
            raise DataError(
                f"{out} has no {MANIFEST} (not a shard folder, or sharding never finished)"
            )
    # Every field this function reads is there with its type (one line naming it otherwise).
    manifest = read_manifest(remote or out, full=True)
    n_attrs = len(manifest.get("attribute_names") or [])
    problems: list[tuple[str, str]] = []
    names: set[str] = set()
    n_shards = n_samples = 0
    grand = 0
    with tempfile.TemporaryDirectory() if remote else nullcontext() as tmp:
        for split, entry in manifest["splits"].items():
            split_count = 0
            for shard in entry["shards"]:
                name = shard["name"]
                names.add(name)
                n_shards += 1
                split_count += shard["count"]
                if remote is None:
                    problem = _check_shard(out / name, shard, n_attrs)
                elif remote.cache_dir is not None:  # kept in the cache once it matches
                    try:
                        problem = _check_shard(remote.cached(name, shard["sha256"]), shard, n_attrs)
                    except DataError as exc:
                        problem = f"cannot be fetched: {exc}"
                else:
                    copy = Path(tmp) / name
                    try:
                        remote.download(name, copy)
                        problem = _check_shard(copy, shard, n_attrs)
                    except DataError as exc:
                        problem = f"cannot be fetched: {exc}"
                    copy.unlink(missing_ok=True)
                if isinstance(problem, str):
                    problems.append((name, problem))
                else:
                    n_samples += problem
            if split_count != entry["count"]:
                problems.append(
                    (MANIFEST, f"{split} count {entry['count']} != sum of its shards {split_count}")
                )
            grand += split_count
    if manifest["total"] != grand:
        problems.append((MANIFEST, f"total {manifest['total']} != sum of splits {grand}"))
    if remote is not None:
        return VerifyReport(out=remote.spec, shards=n_shards, samples=n_samples, problems=problems)
    for stray in sorted(p.name for p in out.glob("*.tar") if p.name not in names):
        problems.append((stray, "stray shard not listed in the manifest"))
    return VerifyReport(out=out, shards=n_shards, samples=n_samples, problems=problems)


def _check_shard(path: Path, shard: dict[str, Any], n_attrs: int) -> str | int:
    """A problem description, or the sample count when the shard matches its manifest entry
    and every sample carries `n_attrs` attribute characters (no attrs.txt when 0)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"size {size} bytes != manifest {shard['bytes']}"
    if sha256_file(path) != shard["sha256"]:
        return "sha256 does not match the manifest (corrupted)"
    try:
        count, attrs_problem = _scan_tar(path, n_attrs)
    except (tarfile.TarError, OSError) as exc:
        return f"not a readable tar ({exc})"
    if count != shard["count"]:
        return f"{count} samples != manifest {shard['count']}"
    return attrs_problem or count


def _scan_tar(path: Path | str, n_attrs: int | None) -> tuple[int, str | None]:
    """(sample count, first attrs problem or None) in one pass over the tar's headers.

    With `n_attrs` None attrs are not looked at; with 0 no sample may have an attrs.txt; else
    each sample needs one of `n_attrs` `0`/`1` characters (what the stream's collate accepts).
    """
    count, last, has_attrs, problem = 0, None, True, None

    def missing() -> str | None:
        return None if has_attrs or not n_attrs else f"sample {last} has no attrs.txt"

    with tarfile.open(path, "r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            head, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = head + "/" + stem if head else stem
            if key != last:
                problem = problem or missing()
                count, last, has_attrs = count + 1, key, False
            if n_attrs is None or ext != "attrs.txt" or problem:
                continue
            has_attrs = True
            bits = tf.extractfile(member).read().strip()
            if not n_attrs:
                problem = f"sample {key} has attrs.txt but the manifest has no attribute_names"
            elif len(bits) != n_attrs or bits.strip(b"01"):
                problem = (
                    f"sample {key} attrs.txt is {bits[:50].decode(errors='replace')!r}, "
                    f"expected {n_attrs} characters 0/1 (manifest attribute_names)"
                )
    return count, problem or (missing() if count else None)


# ----------------------------------------------------------------------------- small helpers


def _flag_value(v: Any) -> str:
    return "none" if v is None else str(v)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    """tmp + fsync + rename; on failure the tmp file is removed and the error names `path`."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # Ctrl-C included: no temp file is left behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
