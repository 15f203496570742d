"""FID and KID of a generator against a shard split (`facegan evaluate`, and the training loop).

Features (`--features`):
- `inception`: torchvision's `inception_v3` with the IMAGENET1K_V1 weights
  (`inception_v3_google-0cc3c7bd.pth`), the 2048-d pool features, images resized to 299x299
  bilinearly from uint8. This is torchvision's port of the Google weights, not the TF graph that
  pytorch-fid / clean-fid use, so our numbers compare between our runs but are not bit-identical
  to published FIDs. The weights are read from a file, never downloaded (`--inception-weights`
  or torch hub's cache); a missing file is a one-line error saying where to put which file.
- `attributes`: the 128-d penultimate features of the shards' attribute classifier
  (`classifier.py`, trained and cached on first use), so a quality number exists fully offline.
  Comparable only between runs evaluated with the same cached classifier.

Both sides are uint8 images (generated images are quantised as a saved PNG would be).

FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), in float64. tr((S1 S2)^1/2) equals
tr((sqrt(S1) S2 sqrt(S1))^1/2), and that matrix is symmetric PSD, so its square root's trace is
the sum of the square roots of its `eigvalsh` eigenvalues (no scipy needed).
KID = unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over `kid_subsets`
random subsets of min(1000, n) features per side (mean and std reported), as in Binkowski et al.

Distribution: the generated seeds and the real images are split across ranks; each rank sums x
and x x^T in float64 for its share and the sums are all-reduced; KID's features themselves are
gathered (at most `KID_MAX_FEATURES` per side). Real statistics are cached in
`SHARD_DIR/stats/<features>-<split>-<n>.safetensors` with the manifest's sha256 and the feature
extractor's identity in the metadata: another manifest or classifier recomputes them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from facegan_dist.errors import CheckpointError, ConfigError, DataError

FEATURES = ("inception", "attributes")
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"
INCEPTION_ID = "torchvision-inception_v3-IMAGENET1K_V1-pool2048-bilinear299"
KID_SUBSET_SIZE = 1000
KID_MAX_FEATURES = 10_000  # KID subsets are drawn from the first (up to) 10,000 features per side
STATS_DIR = "stats"
STATS_FORMAT = 1


# ---- the two statistics ----


def fid_from_stats(mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2) (float64 throughout)."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, s1, s2))
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    w, v = torch.linalg.eigh(s1)
    sqrt_s1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    eig = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0)
    tr_covmean = eig.sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sxx + syy - 2 * kxy.mean()


def kid(
    f1: Tensor, f2: Tensor, subsets: int = 100, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 (cubic polynomial kernel) over random subsets."""
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        got = f"{f1.shape[0]}, {f2.shape[0]}"
        raise ConfigError(f"KID needs at least 2 features per side (got {got})")
    g = torch.Generator().manual_seed(seed)
    f1, f2 = f1.double(), f2.double()
    vals = []
    for _ in range(max(1, subsets)):
        i = torch.randperm(f1.shape[0], generator=g)[:m]
        j = torch.randperm(f2.shape[0], generator=g)[:m]
        vals.append(_mmd2_unbiased(f1[i], f2[j]))
    v = torch.stack(vals)
    return float(v.mean()), float(v.std()) if len(vals) > 1 else 0.0


# ---- running sums (float64, reducible across ranks) ----


class FeatureStats:
    """n, sum x, sum x x^T (float64) and up to `keep` raw features (for KID)."""

    def __init__(self, dim: int, keep: int = KID_MAX_FEATURES) -> None:
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.keep = keep
        self.kept: list[Tensor] = []
        self._kept_n = 0

    def add(self, f: Tensor) -> None:
        f64 = f.detach().cpu().double()
        self.n += f64.shape[0]
        self.sum += f64.sum(0)
        self.sum_outer += f64.T @ f64
        take = min(self.keep - self._kept_n, f.shape[0])
        if take > 0:
            self.kept.append(f[:take].detach().cpu().float())
            self._kept_n += take

    def features(self) -> Tensor:
        return torch.cat(self.kept) if self.kept else torch.empty(0, self.sum.shape[0])


def mean_cov(n: int, s: Tensor, ss: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from n, sum x and sum x x^T."""
    mu = s / n
    cov = (ss - n * torch.outer(mu, mu)) / max(n - 1, 1)
    return mu, cov


def reduce_stats(state, st: FeatureStats) -> tuple[Tensor, Tensor, Tensor]:
    """(mu, cov, KID features) over all ranks; every rank calls it.

    Each rank kept the first (up to) KID_MAX_FEATURES features of its contiguous share, so the
    first KID_MAX_FEATURES rows of the rank-ordered concatenation are those of the whole list:
    the same features whatever the number of processes."""
    from facegan_dist import dist

    n = int(dist.all_sum(state, torch.tensor([st.n], dtype=torch.float64)).item())
    mu, cov = mean_cov(n, dist.all_sum(state, st.sum), dist.all_sum(state, st.sum_outer))
    feats = st.features()
    allf = _gather_varlen(state, feats, _gathered_sizes(state, feats.shape[0]))
    return mu, cov, allf[:KID_MAX_FEATURES]


def _gathered_sizes(state, k: int) -> list[int]:
    from facegan_dist import dist

    rank, world = dist.world(state)
    one_hot = torch.zeros(world, dtype=torch.float64)
    one_hot[rank] = k
    return [int(v) for v in dist.all_sum(state, one_hot)]


def _gather_varlen(state, rows: Tensor, sizes: list[int]) -> Tensor:
    from facegan_dist import dist

    rank, world = dist.world(state)
    if world == 1:
        return rows
    import torch.distributed as tdist

    width = rows.shape[1]
    padded = rows.new_zeros((max(sizes), width))
    padded[: rows.shape[0]] = rows
    padded = padded.to(state.device)
    parts = [torch.empty_like(padded) for _ in sizes]
    tdist.all_gather(parts, padded)
    return torch.cat([p[:k].cpu() for p, k in zip(parts, sizes, strict=True)])


# ---- feature extractors: uint8 [B, 3, S, S] (on device) -> float [B, D] ----


@dataclass
class Extractor:
    name: str  # "inception" | "attributes"
    identity: str  # what the cached real statistics must match
    dim: int
    fn: Callable[[Tensor], Tensor]

    @torch.no_grad()
    def __call__(self, images_uint8: Tensor) -> Tensor:
        return self.fn(images_uint8).float()


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_weights_path(path: Path | None = None) -> Path:
    """The Inception file to use; CheckpointError naming where to put it when absent."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"--inception-weights {path}: file not found (download {INCEPTION_URL})"
            )
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not hub.is_file():
        raise CheckpointError(
            f"Inception weights not found: put {INCEPTION_FILE} (from {INCEPTION_URL}) at {hub}, "
            "or pass --inception-weights PATH, or use --features attributes"
        )
    return hub


def inception_extractor(device, weights: Path | None = None) -> Extractor:
    """torchvision Inception v3, 2048-d pool features of 299x299 bilinear resizes."""
    from torchvision.models.inception import Inception3

    path = inception_weights_path(weights)
    # transform_input=False: we feed what the Google weights expect, x in [-1, 1] (torchvision's
    # transform_input=True only converts ImageNet-normalised input into that range).
    model = Inception3(num_classes=1000, aux_logits=True, transform_input=False, init_weights=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not torchvision's Inception v3 weights ({first})") from None
    model.fc = torch.nn.Identity()  # -> the 2048-d pool features (after avgpool + dropout)
    model = model.to(device).eval().requires_grad_(False)
    identity = f"{INCEPTION_ID}-{_file_sha256(path)[:16]}"  # other weights: other statistics

    def fn(x: Tensor) -> Tensor:
        x = x.float() / 127.5 - 1.0
        x = torch.nn.functional.interpolate(
            x, size=(299, 299), mode="bilinear", align_corners=False
        )
        return model(x)

    return Extractor("inception", identity, 2048, fn)


def attribute_extractor(shard_dir: Path, device, state=None, log=None, **kw) -> Extractor:
    from facegan_dist.classifier import FEATURE_DIM, WEIGHTS_NAME, get_classifier, uint8_to_input

    clf, meta = get_classifier(shard_dir, device, state=state, log=log, **kw)
    digest = _file_sha256(Path(shard_dir) / "classifier" / WEIGHTS_NAME)
    identity = f"attributes-classifier-{digest[:16]}"
    return Extractor("attributes", identity, FEATURE_DIM, lambda x: clf.features(uint8_to_input(x)))


def make_extractor(
    features: str, data_dir: Path, device, *, inception_weights=None, state=None, log=None
) -> Extractor:
    if features == "inception":
        return inception_extractor(device, inception_weights)
    if features == "attributes":
        return attribute_extractor(data_dir, device, state=state, log=log)
    raise ConfigError(f"--features {features!r} must be one of {', '.join(FEATURES)}")


# ---- real statistics, cached next to the shards ----


def stats_path(data_dir: Path, features: str, split: str, n: int) -> Path:
    return Path(data_dir) / STATS_DIR / f"{features}-{split}-{n}.safetensors"


def _split_count(data_dir: Path, split: str) -> int:
    from facegan_dist.data.stream import read_manifest

    splits = read_manifest(data_dir)["splits"]
    if split == "all":
        return sum(int(v.get("count", 0)) for v in splits.values())
    if split not in splits:
        raise DataError(
            f"split '{split}' is not in {Path(data_dir) / 'manifest.json'} "
            f"(available: {', '.join(sorted(splits))}, or 'all')"
        )
    return int(splits[split].get("count", 0))


def _load_cached(path: Path, want: dict):
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != str(v) for k, v in want.items()):
                return None
            return f.get_tensor("mu"), f.get_tensor("cov"), f.get_tensor("kid_features")
    except (OSError, ValueError, KeyError, RuntimeError):  # unreadable cache: recompute
        return None


def real_stats(
    ext: Extractor, data_dir: Path, split: str, n: int, batch: int, device, state=None, log=None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """(mu, cov, KID features, images used) of the first min(n, |split|) real images, from the
    cache when it matches, else computed (split over ranks) and cached by rank 0."""
    from safetensors.torch import save_file

    from facegan_dist import dist
    from facegan_dist.classifier import iter_split_once, manifest_sha256

    count = min(n, _split_count(data_dir, split))
    if count < 2:
        raise DataError(f"{data_dir}: split '{split}' has {count} image(s); FID needs 2 or more")
    path = stats_path(data_dir, ext.name, split, n)
    want = {
        "format": STATS_FORMAT,
        "manifest_sha256": manifest_sha256(data_dir),
        "extractor": ext.identity,
        "count": count,
    }
    cached = _load_cached(path, want)
    if cached is not None:
        return (*cached, count)
    if log:
        log(f"computing real {ext.name} statistics of {count} '{split}' images -> {path}")
    # every rank reads the images in the same order and featurises its contiguous share
    rank, world = dist.world(state)
    sizes = dist.chunk_sizes(count, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    st = FeatureStats(ext.dim)
    pos = 0
    for images, _, _ in iter_split_once(data_dir, split, batch, limit=count):
        a, b = max(lo, pos), min(hi, pos + images.shape[0])
        if a < b:
            st.add(ext(images[a - pos : b - pos].to(device)))
        pos += images.shape[0]
        if pos >= hi:
            break
    mu, cov, feats = reduce_stats(state, st)
    if dist.is_main(state):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tensors = {"mu": mu, "cov": cov, "kid_features": feats.contiguous()}
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in want.items()})
            os.replace(tmp, path)
        except OSError as exc:  # a read-only shard folder: compute each time
            if log:
                log(f"warning: cannot cache {path} ({exc})")
    dist.barrier(state)
    return mu, cov, feats, count


# ---- generated statistics and the core entry point ----


def real_conditions(data_dir: Path, split: str, n: int, attr_idx: list[int]) -> Tensor:
    """float {0,1} [n, len(attr_idx)]: the attributes `attr_idx` of the first min(n, |split|)
    real images, cycled to n rows. A conditional G is evaluated on the real label distribution
    (fake image i gets the labels of real image i), the usual protocol for conditional FID: the
    score then measures image quality and label coverage together."""
    from facegan_dist.classifier import iter_split_once

    count = min(n, _split_count(data_dir, split))
    idx = torch.tensor(attr_idx, dtype=torch.long)
    rows = [a[:, idx] for _, a, _ in iter_split_once(data_dir, split, 256, limit=count)]
    c = torch.cat(rows).float()
    return c.repeat(-(-n // len(c)), 1)[:n]


@torch.no_grad()
def fake_stats(
    G,
    ext: Extractor,
    seeds: list[int],
    batch: int,
    psi: float = 1.0,
    mode: str = "shrink",
    state=None,
    conds: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mu, cov, KID features) of G over `seeds`, split over ranks (every rank calls it).
    conds: [len(seeds), n_cond] conditions of a conditional G, row i for seed i."""
    from facegan_dist import dist
    from facegan_dist.latent import truncated_z
    from facegan_dist.sampling import to_uint8

    mine = dist.split_items(state, list(range(len(seeds))))  # positions in `seeds`
    device = next(G.parameters()).device
    st = FeatureStats(ext.dim)
    was_training = G.training
    G.eval()
    try:
        for i in range(0, len(mine), batch):
            part = mine[i : i + batch]
            z = truncated_z([seeds[j] for j in part], G.z_dim, psi, mode).to(device)
            images = G(z) if conds is None else G(z, conds[part].to(device))
            st.add(ext(to_uint8(images)))
    finally:
        G.train(was_training)
    return reduce_stats(state, st)


def evaluate_generator(
    G,
    data_dir: Path,
    *,
    n: int = 50_000,
    features: str = "inception",
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
) -> dict:
    """FID and KID of G (seeds seed..seed+n-1) against the first n images of `split`.
    A conditional G gets `condition_idx` (its condition attributes' columns in the shards'
    attribute table) and draws fake image i with the labels of real image i (`real_conditions`).

    Call it on EVERY rank with the same arguments (it uses collectives when `acc`, an
    Accelerator or PartialState, has several processes); pass an unwrapped module (the EMA or
    `acc.unwrap_model(G)`), never the DDP wrapper: a DDP forward here would desync the ranks.
    G is put in eval mode for the duration and restored. Returns
    {fid, kid, kid_std, n, n_real, features, split}."""
    from facegan_dist.latent import check_truncation

    if n < 2:
        raise ConfigError(f"--n {n} must be at least 2")
    if batch < 1:
        raise ConfigError(f"--batch {batch} must be at least 1")
    if kid_subsets < 1:
        raise ConfigError(f"--kid-subsets {kid_subsets} must be at least 1")
    check_truncation(truncation, truncation_mode)
    device = device if device is not None else next(G.parameters()).device
    state = acc
    ext = make_extractor(
        features, data_dir, device, inception_weights=inception_weights, state=state, log=log
    )
    mu_r, cov_r, f_r, n_real = real_stats(ext, data_dir, split, n, batch, device, state, log)
    seeds = list(range(seed, seed + n))
    conds = real_conditions(data_dir, split, n, condition_idx) if condition_idx else None
    mu_g, cov_g, f_g = fake_stats(
        G, ext, seeds, batch, truncation, truncation_mode, state, conds=conds
    )
    fid = fid_from_stats(mu_g, cov_g, mu_r, cov_r)
    k, k_std = kid(f_g, f_r, kid_subsets)
    return {
        "fid": fid,
        "kid": k,
        "kid_std": k_std,
        "n": n,
        "n_real": n_real,
        "features": features,
        "split": split,
        "kid_subset_size": min(KID_SUBSET_SIZE, f_g.shape[0], f_r.shape[0]),
        "conditions": "real labels" if condition_idx else None,
    }


# ---- `facegan evaluate` ----


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `facegan evaluate` does; see docs/SAMPLING.md for each field's flag."""

    source: Path
    data: Path
    n: int = 50_000
    split: str = "train"
    features: str = "inception"
    batch: int = 100
    kid_subsets: int = 100
    seed: int = 0
    ema: bool = True
    truncation: float = 1.0
    truncation_mode: str = "shrink"
    inception_weights: Path | None = None
    out: Path | None = None  # default: <run dir>/eval/<features>-<split>-<n>.json


def condition_columns(meta: dict, manifest: dict, data_dir: Path) -> list[int] | None:
    """The columns of a conditional generator's condition attributes in the shards' attribute
    table (None for an unconditional generator)."""
    condition = list(meta.get("condition") or [])
    if not condition:
        return None
    names = list(manifest.get("attribute_names") or [])
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
    from facegan_dist.export import atomic_write_text
    from facegan_dist.sampling import load_any_generator

    if cfg.features not in FEATURES:
        raise ConfigError(f"--features {cfg.features!r} must be one of {', '.join(FEATURES)}")
    if cfg.features == "inception":
        inception_weights_path(cfg.inception_weights)  # fail before loading anything else
    device = state.device if state is not None else "cpu"
    G, meta, info = load_any_generator(cfg.source, device, ema=cfg.ema)
    from facegan_dist.data.stream import read_manifest

    manifest = read_manifest(cfg.data)
    size = manifest["settings"]["size"]
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
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2))
    dist.barrier(state)
    return {**result, "path": out, "finite": all(math.isfinite(result[k]) for k in ("fid", "kid"))}
