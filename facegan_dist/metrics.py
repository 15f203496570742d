"""FID and KID of a generator against a shard split (`facegan evaluate`, and the training loop).

The statistics are torchmetrics' `FrechetInceptionDistance` and `KernelInceptionDistance`; this
module owns what they do not: the feature extractors, the split of seeds and real images over
ranks, the real-statistics cache next to the shards, and the one-line errors.

Features (`--features`), each an `nn.Module` uint8 [B, 3, S, S] -> float [B, D] with `name`,
`identity` (what keys the cache) and `num_features`:
- `inception`: torchmetrics' default network, torch-fidelity's port of the TF-FID Inception
  (`weights-inception-2015-12-05-6726825d.pth`), 2048-d pool features, images resized to 299 by
  torch-fidelity's TF1-compatible bilinear resize (`antialias=False`; torchmetrics 1.9 defaults to
  an antialiased resize that departs from TF-FID). The file is read, never downloaded:
  `--inception-weights` or torch hub's cache (where torch-fidelity would download it); a missing,
  corrupt or wrong-network file is a one-line CheckpointError naming the file and the URL.
- `attributes`: the 128-d penultimate features of the shards' attribute classifier
  (`classifier.py`, trained and cached on first use), so a quality number exists fully offline.
  Comparable only between runs evaluated with the same cached classifier.
- any other extractor object with those three attributes (`evaluate_generator(extractor=...)`).

Each image goes through the extractor once; FID and KID both receive its features through a
pass-through `feature` module (`_Precomputed`). Why not hand the extractor itself to both metrics:
each would run the network on every image again, and `KernelInceptionDistance(feature=2048)`
builds its own Inception without a weights path (a download) and with the antialiased resize.

Distribution: every rank updates both metrics with its contiguous share of the seeds and of the
real images, and `Metric.sync()` reduces the states (FID's sums are summed, KID's feature lists
gathered in rank order, so the features are in seed order whatever the number of processes).
KID's list states are gathered element by element (`dist_reduce_fx=None`): ranks with different
numbers of `update` calls would deadlock (torchmetrics#3336), so KID gets exactly one update per
side per rank (a zero-row tensor when a rank has nothing). Cached real states are loaded on rank 0
only (zeros elsewhere), so the sum over ranks counts them once.

Real states are cached in `SHARD_DIR/stats/<name>-<split>-<n>.safetensors` (a URL --data: under
its --cache-dir, `readback.derived_dir`): FID's real sum, sum of
outer products and count, and KID's real features, with the manifest's sha256 and the extractor's
identity in the metadata (another manifest or extractor recomputes). Rank 0 writes it (temp file +
os.replace) only after both metrics were computed, so a failed run caches nothing.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from facegan_dist.config import EVAL_FEATURES as FEATURES  # declared with --eval-features
from facegan_dist.data.remote import Remote, sha256_file
from facegan_dist.data.stream import Manifest
from facegan_dist.errors import CheckpointError, ConfigError, DataError

# torch-fidelity's URL_INCEPTION_V3 (torch_fidelity/feature_extractor_inceptionv3.py); torch hub
# names a downloaded file after the URL's last part, whose suffix is the sha256 prefix.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
# the published file (95,628,359 bytes); another file works, with a warning
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_ID = "torch-fidelity-inception-v3-compat-pool2048-tf1-bilinear299"
KID_SUBSET_SIZE = 1000
KID_SEED = 0  # KID's random subsets: the same draw for every run and number of processes
FID_UPDATE_ROWS = 4096  # FID's float64 x^T x per update, on at most this many rows
STATS_DIR = "stats"
STATS_FORMAT = 2  # 2: torchmetrics states (format 1 held mean/cov; such files are recomputed)
FID_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


# ---- feature extractors: uint8 [B, 3, S, S] (on device) -> float [B, D] ----


def _first_line(exc: Exception) -> str:
    """The informative line of an exception (load_state_dict's first line only says where)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    return (lines or [type(exc).__name__])[0][:160]


def _where_to_get() -> str:
    return f"get {INCEPTION_FILE} from {INCEPTION_URL}"


def inception_weights_path(path: Path | None = None) -> Path:
    """The Inception file to use: `path` (--inception-weights), else torch hub's cache, where
    torch-fidelity would download it. CheckpointError naming the file and the URL when it is
    absent or empty."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"--inception-weights {path}: file not found ({_where_to_get()})")
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not path.is_file():
            raise CheckpointError(
                f"Inception weights not found: put {INCEPTION_FILE} (from {INCEPTION_URL}) at "
                f"{path}, or pass --inception-weights PATH, or use --features attributes"
            )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not the Inception weights ({_where_to_get()})")
    return path


def _check_inception_state(path: Path) -> None:
    """Refuse anything but torch-fidelity's Inception state_dict before torch-fidelity reads it.

    torch-fidelity loads the file with `weights_only=False` (a pickle may run code). Loading it
    here with `weights_only=True` first means only plain tensors and containers get through, and
    the fingerprint below turns the usual mistakes (torchvision's inception_v3 file, with its
    1000-class fc, or any other network) into one line instead of a state_dict diff."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file, or a disallowed pickle
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives (or legacy pickles)
            why = "corrupt, truncated, or not a PyTorch file"
        elif "Weights only load failed" in str(exc):  # an archive holding more than a state_dict
            why = "it holds pickled objects besides tensors, which are not loaded"
        else:
            why = _first_line(exc)
        raise CheckpointError(
            f"{path}: not a readable Inception weights file ({why}); {_where_to_get()}"
        ) from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if (
        not isinstance(fc, Tensor)
        or tuple(fc.shape) != (1008, 2048)
        or "Mixed_7c.branch_pool.conv.weight" not in state
    ):
        what = (
            f"fc.weight {tuple(fc.shape)}"
            if isinstance(fc, Tensor)
            else "no fc.weight [1008, 2048]"
        )
        raise CheckpointError(
            f"{path}: not torch-fidelity's Inception v3 weights ({what}; torchvision's "
            f"inception_v3 file does not fit either); {_where_to_get()}"
        )


class InceptionFeatures(nn.Module):
    """torchmetrics' default FID network (torch-fidelity's TF-FID Inception v3), 2048-d pool
    features of the TF1-compatible bilinear resize to 299 (antialias off)."""

    name = "inception"
    num_features = 2048

    def __init__(self, weights: Path | None = None, log: Callable[[str], None] | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = inception_weights_path(weights)
        _check_inception_state(path)
        # torchmetrics before the antialias flag (e.g. 1.4) always resizes the TF1 way
        params = inspect.signature(NoTrainInceptionV3.__init__).parameters
        resize = {"antialias": False} if "antialias" in params else {}
        try:
            # what FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=...,
            # antialias=False) builds; a path is always given, so nothing is downloaded
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(self.num_features)],
                feature_extractor_weights_path=str(path),
                **resize,
            )
        except (OSError, RuntimeError, KeyError, ValueError, EOFError) as exc:
            raise CheckpointError(
                f"{path}: not torch-fidelity's Inception v3 weights ({_first_line(exc)}); "
                f"{_where_to_get()}"
            ) from None
        digest = sha256_file(path)
        if digest != INCEPTION_SHA256 and log:
            log(
                f"warning: {path} (sha256 {digest[:8]}...) is not the published {INCEPTION_FILE}: "
                "its FIDs compare only with runs that use the same file"
            )
        self.identity = f"{INCEPTION_ID}-{digest[:16]}"  # other weights: other statistics

    @torch.no_grad()
    def forward(self, images_uint8: Tensor) -> Tensor:
        return self.net(images_uint8)


class AttributeFeatures(nn.Module):
    """The 128-d penultimate features of the shards' attribute classifier."""

    name = "attributes"

    def __init__(self, classifier: nn.Module, identity: str) -> None:
        super().__init__()
        from facegan_dist.classifier import FEATURE_DIM

        self.classifier = classifier
        self.identity = identity
        self.num_features = FEATURE_DIM

    @torch.no_grad()
    def forward(self, images_uint8: Tensor) -> Tensor:
        from facegan_dist.classifier import uint8_to_input

        return self.classifier.features(uint8_to_input(images_uint8))


def attribute_extractor(shard_dir, device, state=None, log=None, **kw) -> AttributeFeatures:
    """`shard_dir`: a folder or a URL `Remote`. Its identity is the cached weights file's sha256,
    read on rank 0 (the only rank that may see that file: a URL's cache is per machine)."""
    from facegan_dist import dist
    from facegan_dist.classifier import WEIGHTS_NAME, classifier_dir, get_classifier

    clf, _ = get_classifier(shard_dir, device, state=state, log=log, **kw)
    digest = sha256_file(classifier_dir(shard_dir) / WEIGHTS_NAME) if dist.is_main(state) else ""
    digest = dist.broadcast_object(state, digest)
    return AttributeFeatures(clf, f"attributes-classifier-{digest[:16]}").to(device)


def make_extractor(
    features: str, data_dir: Path, device, *, inception_weights=None, state=None, log=None
) -> nn.Module:
    """The `--features` extractor, on `device` (every rank calls it)."""
    if features == "inception":
        return InceptionFeatures(inception_weights, log=log).to(device)
    if features == "attributes":
        return attribute_extractor(data_dir, device, state=state, log=log)
    raise ConfigError(f"--features {features!r} must be one of {', '.join(FEATURES)}")


# ---- the two torchmetrics metrics, fed with precomputed features ----


class _Precomputed(nn.Module):
    """The metrics' `feature` module: the features arrive already extracted (once per image, for
    both metrics). `num_features` spares FrechetInceptionDistance its probe with a 299 px image."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@dataclass
class _Metrics:
    """FID and KID side by side, fed the same features."""

    fid: object  # torchmetrics FrechetInceptionDistance
    kid: object  # torchmetrics KernelInceptionDistance
    device: torch.device

    @classmethod
    def build(cls, dim: int, subsets: int, subset_size: int, device, world_size: int) -> _Metrics:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        # We sync once by hand (to cache the reduced real states), and only when this call runs
        # on several ranks: a process group that exists for other reasons is not ours to sync.
        kw = {"sync_on_compute": False, "distributed_available_fn": lambda: world_size > 1}
        fid = FrechetInceptionDistance(feature=_Precomputed(dim), **kw)
        with warnings.catch_warnings():  # "will save all extracted features": we know (docs)
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            kid = KernelInceptionDistance(
                feature=_Precomputed(dim), subsets=subsets, subset_size=subset_size, **kw
            )
        device = torch.device(device)
        return cls(fid.to(device), kid.to(device), device)

    def add(self, features: Tensor, real: bool) -> None:
        """One rank's features of one side ([k, D], k may be 0): FID in float64 chunks, KID in
        exactly one update (see the module docstring)."""
        features = features.to(self.device)
        for chunk in features.split(FID_UPDATE_ROWS) if len(features) else [features]:
            self.fid.update(chunk.double(), real=real)
        # float32 (what torchmetrics keeps with its own Inception): 4 bytes per feature, and the
        # same dtype on every rank for the gather
        self.kid.update(features.float(), real=real)

    def load_real(self, cached: dict[str, Tensor]) -> None:
        """Cached real states (rank 0 only: every rank's states are summed / gathered)."""
        for name in FID_REAL_STATES:
            setattr(self.fid, name, cached[name].to(self.device))
        self.kid.update(cached["kid_real_features"].to(self.device).float(), real=True)

    def compute(self, keep_real: bool = False) -> tuple[float, float, float, dict | None]:
        """(fid, kid, kid_std, reduced real states or None) over all ranks; every rank calls
        it. keep_real: also return the real states reduced over ranks (what the cache holds);
        they are read between the sync and compute(), which restores the local states."""
        self.fid.sync()
        self.kid.sync()
        real = self._real_states() if keep_real else None
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
            torch.manual_seed(KID_SEED)
            fid = self.fid.compute()
            kid, kid_std = self.kid.compute()
        return float(fid), float(kid), float(kid_std), real

    def _real_states(self) -> dict[str, Tensor]:
        out = {n: getattr(self.fid, n).detach().cpu().contiguous() for n in FID_REAL_STATES}
        real = self.kid.real_features
        feats = torch.cat(real) if isinstance(real, list) else real
        out["kid_real_features"] = feats.detach().cpu().contiguous()
        return out


# ---- real images: count, cache, features ----


def stats_path(data_dir, name: str, split: str, n: int) -> Path:
    """DATA/stats/..., or for a URL --data under its --cache-dir (readback.derived_dir)."""
    from facegan_dist.data.readback import derived_dir

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return derived_dir(data_dir) / STATS_DIR / f"{safe}-{split}-{n}.safetensors"


def _load_cached(path: Path, want: dict, dim: int) -> dict[str, Tensor] | None:
    """The cached real states if the file matches `want` (metadata) and the shapes, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != str(v) for k, v in want.items()):
                return None
            out = {k: f.get_tensor(k) for k in (*FID_REAL_STATES, "kid_real_features")}
    except (OSError, ValueError, KeyError, RuntimeError):  # unreadable cache: recompute
        return None
    count = int(want["count"])
    shapes_ok = (
        out["real_features_sum"].shape == (dim,)
        and out["real_features_cov_sum"].shape == (dim, dim)
        and int(out["real_features_num_samples"]) == count
        and out["kid_real_features"].shape == (count, dim)
    )
    return out if shapes_ok else None


def _save_cached(path: Path, want: dict, states: dict[str, Tensor], log=None) -> None:
    from safetensors.torch import save_file

    from facegan_dist.paths import atomic_path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(states, str(tmp), metadata={k: str(v) for k, v in want.items()})
    except OSError as exc:  # a read-only shard folder: compute each time
        if log:
            log(f"warning: cannot cache {path} ({exc})")


@torch.no_grad()
def real_features(
    ext: nn.Module, data_dir: Path, split: str, count: int, batch: int, device, state=None
) -> Tensor:
    """Features [k, D] of this rank's contiguous share of the first `count` images of `split`
    (every rank reads the images in the same order and featurises its share)."""
    from facegan_dist import dist
    from facegan_dist.data.readback import iter_split_once

    rank, world = dist.world(state)
    sizes = dist.chunk_sizes(count, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    feats = []
    pos = 0
    if hi > lo:
        for images, _, _ in iter_split_once(data_dir, split, batch, limit=count):
            a, b = max(lo, pos), min(hi, pos + images.shape[0])
            if a < b:
                feats.append(ext(images[a - pos : b - pos].to(device)))
            pos += images.shape[0]
            if pos >= hi:
                break
    return torch.cat(feats) if feats else torch.empty(0, ext.num_features, device=device)


# ---- generated images and the core entry point ----


def real_conditions(data_dir: Path, split: str, n: int, attr_idx: list[int]) -> Tensor:
    """float {0,1} [n, len(attr_idx)]: the attributes `attr_idx` of the first min(n, |split|)
    real images, cycled to n rows. A conditional G is evaluated on the real label distribution
    (fake image i gets the labels of real image i), the usual protocol for conditional FID: the
    score then measures image quality and label coverage together."""
    from facegan_dist.data.readback import iter_split_once

    count = min(n, Manifest.read(data_dir).count(split))
    idx = torch.tensor(attr_idx, dtype=torch.long)
    rows = [a[:, idx] for _, a, _ in iter_split_once(data_dir, split, 256, limit=count)]
    c = torch.cat(rows).float()
    return c.repeat(-(-n // len(c)), 1)[:n]


@torch.no_grad()
def fake_features(
    G,
    ext: nn.Module,
    seeds: list[int],
    batch: int,
    psi: float = 1.0,
    mode: str = "shrink",
    state=None,
    conds: Tensor | None = None,
) -> Tensor:
    """Features [k, D] of G's images for this rank's contiguous share of `seeds`, in seed order.
    Generated images are quantised to uint8 as a saved PNG would be. conds: [len(seeds), n_cond]
    conditions of a conditional G, row i for seed i."""
    from facegan_dist import dist
    from facegan_dist.images import to_uint8
    from facegan_dist.latent import truncated_z

    mine = dist.split_items(state, list(range(len(seeds))))  # positions in `seeds`
    device = next(G.parameters()).device
    feats = []
    was_training = G.training
    G.eval()
    try:
        for i in range(0, len(mine), batch):
            part = mine[i : i + batch]
            z = truncated_z([seeds[j] for j in part], G.z_dim, psi, mode).to(device)
            images = G(z) if conds is None else G(z, conds[part].to(device))
            feats.append(ext(to_uint8(images)))
    finally:
        G.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0, ext.num_features, device=device)


def evaluate_generator(
    G,
    data_dir: Path,
    *,
    n: int = 50_000,
    features: str = "attributes",
    split: str = "train",
    batch: int = 100,
    device=None,
    acc=None,
    kid_subsets: int = 100,
    seed: int = 0,
    truncation: float = 1.0,
    truncation_mode: str = "shrink",
    inception_weights: Path | None = None,
    log: Callable[[str], None] | None = None,
    condition_idx: list[int] | None = None,
    extractor: nn.Module | None = None,
) -> dict:
    """FID and KID of G (seeds seed..seed+n-1) against the first n images of `split`.
    A conditional G gets `condition_idx` (its condition attributes' columns in the shards'
    attribute table) and draws fake image i with the labels of real image i (`real_conditions`).
    `extractor`: an already-built feature extractor used instead of `features` (an nn.Module
    uint8 [B, 3, S, S] -> float [B, D] with `name`, `identity` and `num_features`).

    Call it on EVERY rank with the same arguments (it uses collectives when `acc`, an
    Accelerator or PartialState, has several processes); pass an unwrapped module (the EMA or
    `acc.unwrap_model(G)`), never the DDP wrapper: a DDP forward here would desync the ranks.
    G is put in eval mode for the duration and restored. Returns
    {fid, kid, kid_std, n, n_real, features, split, kid_subset_size, conditions}."""
    from facegan_dist import dist
    from facegan_dist.data.readback import manifest_sha256
    from facegan_dist.latent import check_truncation

    if n < 2:
        raise ConfigError(f"--n {n} must be at least 2")
    if batch < 1:
        raise ConfigError(f"--batch {batch} must be at least 1")
    if kid_subsets < 1:
        raise ConfigError(f"--kid-subsets {kid_subsets} must be at least 1")
    check_truncation(truncation, truncation_mode)
    if extractor is None and features not in FEATURES:
        raise ConfigError(f"--features {features!r} must be one of {', '.join(FEATURES)}")
    device = device if device is not None else next(G.parameters()).device
    state = acc
    available = Manifest.read(data_dir).count(split)
    count = min(n, available)
    if count < 2:
        raise DataError(f"{data_dir}: split '{split}' has {count} image(s); FID needs 2 or more")
    ext = extractor
    if ext is None:  # before the warning below: a bad weights file is then the only line
        ext = make_extractor(
            features, data_dir, device, inception_weights=inception_weights, state=state, log=log
        )
    if count < n and log:
        log(
            f"warning: --n {n} but split '{split}' of {data_dir} has {available} images: "
            f"real statistics use {count}"
        )
    subset_size = min(KID_SUBSET_SIZE, n, count)
    metrics = _Metrics.build(
        ext.num_features, kid_subsets, subset_size, device, dist.world(state)[1]
    )

    # real side: rank 0 alone loads a matching cache (and tells the others), else all featurise
    path = stats_path(data_dir, ext.name, split, n)
    want = {
        "format": STATS_FORMAT,
        "manifest_sha256": manifest_sha256(data_dir),
        "extractor": ext.identity,
        "split": split,
        "count": count,
    }
    cached = _load_cached(path, want, ext.num_features) if dist.is_main(state) else None
    hit = dist.broadcast_object(state, cached is not None)
    if cached is not None:
        metrics.load_real(cached)
    elif hit:  # another rank holds the cached states: this rank adds nothing (but updates once)
        metrics.add(torch.empty(0, ext.num_features), real=True)
    else:
        if log:
            log(f"computing real {ext.name} statistics of {count} '{split}' images -> {path}")
        metrics.add(real_features(ext, data_dir, split, count, batch, device, state), real=True)

    # generated side
    seeds = list(range(seed, seed + n))
    conds = real_conditions(data_dir, split, n, condition_idx) if condition_idx else None
    fake = fake_features(G, ext, seeds, batch, truncation, truncation_mode, state, conds=conds)
    metrics.add(fake, real=False)

    fid, kid, kid_std, real = metrics.compute(keep_real=not hit and dist.is_main(state))
    if real is not None and all(bool(torch.isfinite(t.double()).all()) for t in real.values()):
        _save_cached(path, want, real, log)
    dist.barrier(state)
    return {
        "fid": fid,
        "kid": kid,
        "kid_std": kid_std,
        "n": n,
        "n_real": count,
        "features": ext.name,
        "split": split,
        "kid_subset_size": subset_size,
        "conditions": "real labels" if condition_idx else None,
    }


# ---- `facegan evaluate` ----


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `facegan evaluate` does; see docs/SAMPLING.md for each field's flag."""

    source: Path
    data: Path | Remote  # a folder, or a URL (`data.remote.locate`)
    n: int = 50_000
    split: str = "train"
    features: str = "attributes"  # offline; "inception" = the standard FID, needs the file
    batch: int = 100
    kid_subsets: int = 100
    seed: int = 0
    ema: bool = True
    truncation: float = 1.0
    truncation_mode: str = "shrink"
    inception_weights: Path | None = None
    out: Path | None = None  # default: <run dir>/eval/<features>-<split>-<n>.json


def condition_columns(meta: dict, manifest: Manifest, data_dir: Path) -> list[int] | None:
    """The columns of a conditional generator's condition attributes in the shards' attribute
    table (None for an unconditional generator)."""
    condition = list(meta.get("condition") or [])
    if not condition:
        return None
    names = manifest.attribute_names
    missing = [a for a in condition if a not in names]
    if missing:
        raise ConfigError(
            f"--data {data_dir}: the shards have no {', '.join(missing)} attribute(s), which the "
            "conditional generator needs as conditions"
        )
    return [names.index(a) for a in condition]


def evaluate(cfg: EvaluateConfig, state=None, log=None) -> dict:
    """Run `facegan evaluate` (every rank calls it); rank 0 writes the JSON result."""
    from facegan_dist import dist
    from facegan_dist.artifacts import load_any_generator
    from facegan_dist.data.readback import derived_dir
    from facegan_dist.paths import atomic_write_text, out_dir, out_file

    if cfg.features not in FEATURES:
        raise ConfigError(f"--features {cfg.features!r} must be one of {', '.join(FEATURES)}")
    if cfg.features == "inception":
        inception_weights_path(cfg.inception_weights)  # fail before loading anything else
    device = state.device if state is not None else "cpu"
    G, meta, info = load_any_generator(cfg.source, device, ema=cfg.ema)
    # the output before any work (its default lies in the run folder of the source)
    if cfg.out is not None:
        out_file(Path(cfg.out), "--out")
    else:
        out_dir(Path(info["run_dir"]) / "eval", "--out")
    manifest = Manifest.read(cfg.data)
    derived_dir(cfg.data)  # a URL without --cache-dir: one line before any work
    size = manifest.image_size
    condition_idx = condition_columns(meta, manifest, cfg.data)
    if cfg.features == "attributes" and size != meta["resolution"]:
        raise ConfigError(
            f"--data {cfg.data}: shards are {size} px, the generator makes "
            f"{meta['resolution']} px (the attribute features need the same size)"
        )
    result = evaluate_generator(
        G,
        cfg.data,
        n=cfg.n,
        features=cfg.features,
        split=cfg.split,
        batch=cfg.batch,
        device=device,
        acc=state,
        kid_subsets=cfg.kid_subsets,
        seed=cfg.seed,
        truncation=cfg.truncation,
        truncation_mode=cfg.truncation_mode,
        inception_weights=cfg.inception_weights,
        log=log,
        condition_idx=condition_idx,
    )
    result.update(
        generator={"path": str(info["path"]), "kind": info["kind"], "ema": meta["ema"]},
        data=str(cfg.data),
        seeds=f"{cfg.seed}-{cfg.seed + cfg.n - 1}",
        truncation=cfg.truncation,
        world_size=dist.world(state)[1],
    )
    tag = f"{cfg.features}-{cfg.split}-{cfg.n}" + ("" if meta["ema"] else "-raw")
    if cfg.truncation < 1:
        tag += f"-psi{cfg.truncation:g}-{cfg.truncation_mode}"
    out = cfg.out or Path(info["run_dir"]) / "eval" / f"{tag}.json"
    if dist.is_main(state):
        atomic_write_text(out, json.dumps(result, indent=2))
    dist.barrier(state)
    return {**result, "path": out, "finite": all(math.isfinite(result[k]) for k in ("fid", "kid"))}
