"""A small 40-attribute CNN trained on the real shards; cached next to them.

Two users: `facegan directions` (classify G(z) to find one latent direction per attribute) and
`facegan evaluate --features attributes` (its penultimate features give a FID/KID that needs no
download). The network is deliberately tiny (a few hundred thousand weights, seconds per epoch
at 32 px on a CPU): it only has to recognise the attributes well enough to split generated faces
into two groups.

    S=32, width 32      x [B, 3, 32, 32] in [-1, 1]
                        [B, 32, 16, 16]   conv 4x4/2 + BN + LeakyReLU   (no BN on the first)
                        [B, 64, 8, 8]
                        [B, 128, 4, 4]
                        [B, 128]          flatten + Linear + ReLU        = `features` (penultimate)
                        [B, 40]           Linear                         = logits (BCE with logits)

Cache (for a URL --data: under its --cache-dir, `readback.derived_dir`; rank 0 alone reads and
writes it and broadcasts the weights):
`SHARD_DIR/classifier/attributes.safetensors` (state_dict) + `attributes.json` (settings,
the sha256 of manifest.json, per-attribute accuracy on the held-out images and the majority-class
baseline). It is reused when the manifest sha and the network's code version (ARCH_VERSION)
match, whatever settings trained it and the files load; otherwise (a stale, damaged or missing
file, or --retrain-classifier) it is trained again. Held-out images: the `val` split when the
shards have one, else the training samples whose key hashes to 0 mod 10 (those are then left out
of training).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from facegan_dist.data.readback import derived_dir, iter_split_once, manifest_sha256
from facegan_dist.data.remote import Remote
from facegan_dist.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FaceganError,
    TrainingError,
)

CLASSIFIER_DIR = "classifier"
WEIGHTS_NAME = "attributes.safetensors"
META_NAME = "attributes.json"
ARCH_VERSION = 1  # bump when AttributeNet changes: old caches are then retrained
FEATURE_DIM = 128
HOLDOUT_MOD = 10  # without a val split, keys hashing to 0 mod 10 are held out


class AttributeNet(nn.Module):
    """x [B, 3, S, S] in [-1, 1] -> logits [B, A]; `features(x)` -> [B, 128]."""

    def __init__(self, *, resolution: int, n_attrs: int = 40, width: int = 32) -> None:
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise DataError(f"attribute classifier: resolution {resolution} is not a power of 2")
        self.resolution, self.n_attrs, self.width = resolution, n_attrs, width
        layers: list[nn.Module] = []
        c_in, size = 3, resolution
        for i in range(int(math.log2(resolution)) - 2):  # halve down to 4x4
            c_out = min(width * 2**i, 4 * width)
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=i == 0))
            if i > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in, size = c_out, size // 2
        self.body = nn.Sequential(*layers)  # [B, c_in, 4, 4]
        self.neck = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * 16, FEATURE_DIM), nn.ReLU(inplace=True)
        )  # [B, 128]
        self.head = nn.Linear(FEATURE_DIM, n_attrs)  # [B, A]

    def features(self, x: Tensor) -> Tensor:
        return self.neck(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def uint8_to_input(images: Tensor) -> Tensor:
    """uint8 [B, 3, S, S] -> float [-1, 1] (the range G produces)."""
    return images.float() / 127.5 - 1.0


def _held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % HOLDOUT_MOD == 0


@dataclass(frozen=True)
class ClassifierSettings:
    epochs: int = 3
    batch: int = 128
    lr: float = 2e-3
    width: int = 32
    seed: int = 0

    def key(self) -> dict:
        # What makes a cached classifier "matching": only the network's code version (plus the
        # manifest, checked apart). Training settings are not part of it, so `directions` and
        # `evaluate` share one classifier; --retrain-classifier applies new settings.
        return {"arch_version": ARCH_VERSION}


@torch.no_grad()
def accuracy(model: AttributeNet, batches, device) -> tuple[Tensor, Tensor, int]:
    """(per-attribute accuracy [A], positive rate [A], images) over uint8 batches."""
    model.eval()
    correct = pos = None
    n = 0
    for images, attrs, _ in batches:
        logits = model(uint8_to_input(images.to(device)))
        pred = (logits > 0).cpu()
        hit = (pred == attrs.bool()).sum(0)
        p = attrs.sum(0)
        correct = hit if correct is None else correct + hit
        pos = p if pos is None else pos + p
        n += images.shape[0]
    return correct.double() / n, pos.double() / n, n


def train_classifier(
    shard_dir: Path | Remote,
    settings: ClassifierSettings = ClassifierSettings(),
    device="cpu",
    log=None,
) -> tuple[AttributeNet, dict]:
    """Train on the `train` split (BCE with logits, Adam, random horizontal flips) and measure
    per-attribute accuracy on the held-out images -> (model in eval mode, meta)."""
    from facegan_dist.data.stream import Manifest, ShardStream

    log = log or (lambda *a: None)
    manifest = Manifest.read(shard_dir)
    names = manifest.attribute_names
    if not names:
        raise DataError(f"{shard_dir}: the shards have no attributes (manifest attribute_names)")
    S = manifest.image_size
    splits = manifest.split_names
    train_split = "train" if "train" in splits else "all"
    has_val = "val" in splits and train_split == "train"
    torch.manual_seed(settings.seed)
    model = AttributeNet(resolution=S, n_attrs=len(names), width=settings.width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.5, 0.999))
    loss_fn = nn.BCEWithLogitsLoss()
    stream = ShardStream(
        shard_dir,
        split=train_split,
        batch_per_device=min(settings.batch, max(1, manifest.count(train_split))),
        seed=settings.seed,
        shuffle_buffer=1000,
        return_keys=True,
    )
    steps = settings.epochs * stream.batches_per_epoch
    gen = torch.Generator().manual_seed(settings.seed)
    t0 = time.perf_counter()
    model.train()
    for step, (images, attrs, keys) in enumerate(stream):
        if step >= steps:
            break
        if not has_val:
            keep = torch.tensor([not _held_out(k) for k in keys])
            images, attrs = images[keep], attrs[keep]
            if images.shape[0] < 2:
                continue
        x = uint8_to_input(images.to(device))
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(3), x)
        loss = loss_fn(model(x), attrs.to(device).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, stream.batches_per_epoch) == 0:
            log(f"classifier epoch {(step + 1) // stream.batches_per_epoch}: loss {loss:.3f}")
    model.eval()
    if has_val:
        held = iter_split_once(shard_dir, "val", 256)
        held_name = "val split"
    else:
        held = (
            (im[m], at[m], [k for k, f in zip(ks, m.tolist(), strict=True) if f])
            for im, at, ks in iter_split_once(shard_dir, train_split, 256)
            for m in [torch.tensor([_held_out(k) for k in ks])]
        )
        held_name = f"{train_split} samples with sha256(key) % {HOLDOUT_MOD} == 0"
    acc, pos_rate, n_held = accuracy(model, held, device)
    if n_held == 0:
        raise DataError(f"{shard_dir}: no held-out images to measure the classifier on")
    baseline = torch.maximum(pos_rate, 1 - pos_rate)
    meta = {
        "format_version": 1,
        **settings.key(),
        "width": settings.width,
        "settings": settings.__dict__,
        "resolution": S,
        "attribute_names": names,
        "manifest_sha256": manifest_sha256(shard_dir),
        "train_split": train_split,
        "held_out": held_name,
        "held_out_images": n_held,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "mean_accuracy": round(float(acc.mean()), 4),
        "accuracy": {n: round(float(a), 4) for n, a in zip(names, acc, strict=True)},
        "majority_baseline": {n: round(float(b), 4) for n, b in zip(names, baseline, strict=True)},
    }
    return model, meta


def save_classifier(model: AttributeNet, meta: dict, folder: Path) -> Path:
    from safetensors.torch import save_file

    from facegan_dist.paths import atomic_path, atomic_write_text

    try:
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(sd, str(tmp))
        atomic_write_text(folder / META_NAME, json.dumps(meta, indent=2))
    except OSError as exc:
        raise DataError(f"{folder}: cannot write the attribute classifier ({exc})") from None
    return folder / WEIGHTS_NAME


def load_classifier(folder: Path, device="cpu") -> tuple[AttributeNet, dict]:
    """The cached classifier in `folder`; a damaged or unreadable file is a DataError naming it
    (one line: an empty or truncated safetensors file raises safetensors' own error type)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, weights = folder / META_NAME, folder / WEIGHTS_NAME
    path = meta_path
    try:
        meta = json.loads(meta_path.read_text())
        model = AttributeNet(
            resolution=meta["resolution"],
            n_attrs=len(meta["attribute_names"]),
            width=meta["width"],
        )
        path = weights
        model.load_state_dict(load_file(str(weights)))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot load the attribute classifier ({first})") from None
    return model.to(device).eval().requires_grad_(False), meta


def cached_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_matching(meta: dict | None, shard_dir: Path | Remote, settings: ClassifierSettings) -> bool:
    if not meta or not (classifier_dir(shard_dir) / WEIGHTS_NAME).is_file():
        return False
    want = {**settings.key(), "manifest_sha256": manifest_sha256(shard_dir)}
    return all(meta.get(k) == v for k, v in want.items())


def classifier_dir(shard_dir: Path | Remote) -> Path:
    """SHARD_DIR/classifier/, or for a URL --data its --cache-dir's (readback.derived_dir)."""
    return derived_dir(shard_dir) / CLASSIFIER_DIR


def get_classifier(
    shard_dir: Path | Remote,
    device="cpu",
    *,
    settings: ClassifierSettings = ClassifierSettings(),
    retrain: bool = False,
    state=None,
    log=None,
) -> tuple[AttributeNet, dict]:
    """The cached classifier of `shard_dir` if it matches and loads, else a freshly trained (and
    cached) one: the cache is only a cache, so a damaged file (empty, truncated) is trained again,
    with one log line naming it. Every rank calls this; rank 0 alone reads, trains and writes the
    cache and sends the weights to the others (a broadcast), so ranks on other machines, whose
    --cache-dir is not rank 0's, get the same network."""
    from facegan_dist import dist

    if dist.world(state)[1] == 1:
        return _cached_or_trained(shard_dir, settings, retrain, device, log)
    model = meta = failure = None
    if dist.is_main(state):
        try:
            model, meta = _cached_or_trained(shard_dir, settings, retrain, device, log)
        except Exception as exc:
            # The other ranks wait in the broadcast below: they must hear of the failure, or
            # they hang there until the launcher's (or NCCL's 30 min) timeout.
            failure = exc
    weights = {k: v.cpu() for k, v in model.state_dict().items()} if model is not None else None
    weights, meta, error = dist.broadcast_object(
        state, (weights, meta, None if failure is None else _portable(failure))
    )
    if failure is not None:
        raise failure
    if error is not None:
        raise error
    if model is None:
        model = AttributeNet(
            resolution=meta["resolution"], n_attrs=len(meta["attribute_names"]), width=meta["width"]
        )
        model.load_state_dict(weights)
    return model.to(device).eval().requires_grad_(False), meta


def _portable(exc: Exception) -> FaceganError:
    """`exc` as rank 0 sends it to the other ranks: our one-line errors as they are (the CLI
    prints them the same on every rank), anything else as a DataError saying where it came from."""
    for kind in (ConfigError, DataError, CheckpointError, TrainingError, FaceganError):
        if isinstance(exc, kind):  # its base kind: a subclass may take other __init__ arguments
            return kind(str(exc))
    return DataError(f"the attribute classifier failed on rank 0 ({type(exc).__name__}: {exc})")


def _cached_or_trained(shard_dir, settings, retrain, device, log) -> tuple[AttributeNet, dict]:
    folder = classifier_dir(shard_dir)
    meta = cached_meta(folder)
    why = "--retrain-classifier" if retrain else ("stale" if meta else "none cached")
    if not retrain and is_matching(meta, shard_dir, settings):
        try:
            return load_classifier(folder, device)
        except DataError as exc:
            why = f"{exc}"
    if log:
        log(f"training the attribute classifier on {shard_dir} ({why})")
    model, meta = train_classifier(shard_dir, settings, device, log)
    save_classifier(model, meta, folder)
    return load_classifier(folder, device)


@torch.no_grad()
def predict(model: AttributeNet, images: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """(probabilities [B, A], features [B, 128]) on CPU for float images in [-1, 1] or uint8."""
    device = next(model.parameters()).device
    probs, feats = [], []
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].to(device)
        x = uint8_to_input(x) if x.dtype == torch.uint8 else x.float()
        f = model.features(x)
        probs.append(torch.sigmoid(model.head(f)).cpu())
        feats.append(f.cpu())
    return torch.cat(probs), torch.cat(feats)
