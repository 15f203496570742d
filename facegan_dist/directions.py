"""One latent direction per attribute, found by classifying generated faces (`facegan directions`).

The notes (notes-gans-it, "latent directions via a classifier") describe the idea: a classifier
trained on the real labelled faces tells, for many generated faces G(z), which ones show an
attribute; the latents of those faces then reveal a direction along which the attribute appears.
Two estimators, `--method`:

- `mean-diff`: d = mean(z | classified positive) - mean(z | classified negative), normalised.
- `linear` (InterFaceGAN, Shen et al. 2020): the unit normal of a linear boundary in z-space that
  separates the two groups; here an L2-regularised, class-balanced logistic regression fitted by
  L-BFGS (InterFaceGAN used a linear SVM; both give a separating hyperplane's normal).

Labels are the classifier's hard decisions (p > 0.5). An attribute with fewer than
`MIN_PER_CLASS` generated faces on either side gets no direction (a zero row, `usable: false`).
`separation` is d' of the projections z.d between the two groups: (mean_pos - mean_neg) /
sqrt((var_pos + var_neg) / 2), on the fitting seeds.

Output, next to the run: `RUN_DIR/directions.safetensors` (tensor `directions` [A, z_dim], unit
rows) + `RUN_DIR/directions.json` (method, n, seeds, the generator used, per-attribute counts,
separation, and a check on held-out seeds: the classifier's mean probability before and after
an edit of `check_amount` along each direction).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from facegan_dist.data.remote import Remote
from facegan_dist.errors import CheckpointError, ConfigError

DIRECTIONS_NAME = "directions.safetensors"
METHODS = ("mean-diff", "linear")
MIN_PER_CLASS = 10
CHECK_SEED = 1_000_000  # held-out seeds for the before/after check start here


def fit_directions(z: Tensor, labels: Tensor, method: str = "mean-diff") -> tuple[Tensor, list]:
    """z [N, d] float, labels [N, A] bool -> (unit directions [A, d] float32, per-attribute
    stats: positive, negative, usable, separation)."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} must be one of {', '.join(METHODS)}")
    z64 = z.double()
    N, A = labels.shape
    pos_n = labels.sum(0)
    usable = (pos_n >= MIN_PER_CLASS) & (N - pos_n >= MIN_PER_CLASS)
    dirs = torch.zeros(A, z.shape[1], dtype=torch.float64)
    if method == "mean-diff":
        for a in range(A):
            if usable[a]:
                m = labels[:, a]
                dirs[a] = z64[m].mean(0) - z64[~m].mean(0)
    elif usable.any():
        dirs[usable] = _logistic_normals(z64, labels[:, usable].double())
    norms = dirs.norm(dim=1, keepdim=True)
    dirs = torch.where(norms > 0, dirs / norms.clamp_min(1e-30), dirs)
    stats = []
    proj = z64 @ dirs.T  # [N, A]
    for a in range(A):
        row = {"positive": int(pos_n[a]), "negative": int(N - pos_n[a]), "usable": bool(usable[a])}
        if usable[a]:
            m = labels[:, a]
            p, q = proj[m, a], proj[~m, a]
            pooled = math.sqrt(0.5 * (float(p.var()) + float(q.var())))
            row["separation"] = round((float(p.mean()) - float(q.mean())) / max(pooled, 1e-12), 4)
        else:
            row["separation"] = None
        stats.append(row)
    return dirs.float(), stats


def _logistic_normals(z: Tensor, y: Tensor, l2: float = 1e-2, iters: int = 100) -> Tensor:
    """Weights [A, d] of A independent class-balanced logistic regressions of y [N, A] on z."""
    N, d = z.shape
    A = y.shape[1]
    pos = y.sum(0).clamp_min(1)
    neg = (N - y.sum(0)).clamp_min(1)
    weight = torch.where(y > 0, N / (2 * pos), N / (2 * neg))  # balanced classes
    W = torch.zeros(A, d, dtype=z.dtype, requires_grad=True)
    b = torch.zeros(A, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = z @ W.T + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weight)
        loss = loss + l2 * (W**2).sum() / A
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach()


def save_directions(path: Path, dirs: Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    from facegan_dist.paths import atomic_path, atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"directions": dirs.contiguous()}, str(tmp), metadata={"format": "pt"})
    atomic_write_text(meta_path(path), json.dumps(meta, indent=2))


def meta_path(path: Path) -> Path:
    """directions.json beside directions.safetensors."""
    return Path(path).with_suffix(".json")


def load_directions(path: Path) -> tuple[Tensor, list[str], dict]:
    """(directions [A, z_dim], attribute names, meta with `usable` as {name: bool}). A bad
    .safetensors or .json is one CheckpointError naming that file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def first_line(exc: Exception) -> str:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    try:
        dirs = load_file(str(path))["directions"].float()
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot load directions ({first_line(exc)})") from None
    jpath = meta_path(path)
    try:
        meta = json.loads(jpath.read_text())
        names = [str(n) for n in meta["attribute_names"]]
        attributes = meta.get("attributes", {})
        usable = {n: bool(a.get("usable", True)) for n, a in attributes.items()}
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{jpath}: cannot load directions ({first_line(exc)})") from None
    if dirs.ndim != 2 or dirs.shape[0] != len(names):
        raise CheckpointError(f"{path}: {tuple(dirs.shape)} directions for {len(names)} names")
    return dirs, names, {**meta, "usable": usable}


@dataclass(frozen=True)
class DirectionsConfig:
    """Everything `facegan directions` does; see docs/SAMPLING.md for each field's flag."""

    source: Path  # run folder, export folder or checkpoint folder
    data: Path | Remote  # shard folder or URL (the classifier is trained on it, cached there)
    n: int = 2000  # generated faces to classify
    method: str = "mean-diff"
    seed: int = 0  # the faces are seeds seed..seed+n-1
    batch: int = 64
    ema: bool = True
    out: Path | None = None  # default: <run dir>/directions.safetensors
    check_seeds: int = 64  # held-out seeds for the before/after check (0: skip)
    check_amount: float = 3.0
    retrain_classifier: bool = False
    classifier_epochs: int = 3
    classifier_width: int = 32

    def validate(self) -> DirectionsConfig:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} must be one of {', '.join(METHODS)}")
        if self.n < 2 * MIN_PER_CLASS:
            raise ConfigError(f"--n {self.n} must be at least {2 * MIN_PER_CLASS}")
        for flag, v in (("--batch", self.batch), ("--classifier-epochs", self.classifier_epochs)):
            if v < 1:
                raise ConfigError(f"{flag} {v} must be at least 1")
        if self.check_seeds < 0:
            raise ConfigError(f"--check-seeds {self.check_seeds} must be >= 0")
        if self.seed < 0:
            raise ConfigError(f"--seed {self.seed} must be >= 0")
        if self.out is not None and Path(self.out).suffix == ".json":
            raise ConfigError(
                f"--out {self.out}: name the .safetensors file (the .json goes beside it)"
            )
        return self


@torch.no_grad()
def classify_seeds(G, classifier, seeds: list[int], z_extra=None, batch: int = 64, state=None):
    """Classifier probabilities [len(seeds), A] of G(z_seed (+ z_extra)), split over ranks and
    gathered on every rank."""
    from facegan_dist import dist
    from facegan_dist.classifier import predict
    from facegan_dist.images import generate, to_uint8
    from facegan_dist.latent import seed_z

    mine = dist.split_items(state, seeds)
    probs = torch.empty(0, classifier.n_attrs)
    if mine:
        z = seed_z(mine, G.z_dim)
        if z_extra is not None:
            z = z + z_extra
        # uint8 first: the classifier sees what a PNG of the sample would hold
        probs, _ = predict(classifier, to_uint8(generate(G, z, batch)), batch)
    return dist.gather_rows(state, probs.float(), len(seeds))


def edit_effect(
    G, classifier, dirs: Tensor, seeds: list[int], amount: float, batch: int = 64, state=None
) -> dict[int, tuple[float, float]]:
    """{attribute index: (mean probability before, after z += amount * d)} over `seeds`."""
    before = classify_seeds(G, classifier, seeds, batch=batch, state=state).mean(0)
    out = {}
    for a in range(dirs.shape[0]):
        if float(dirs[a].norm()) == 0:
            continue
        after = classify_seeds(G, classifier, seeds, amount * dirs[a], batch, state)[:, a]
        out[a] = (float(before[a]), float(after.mean()))
    return out


def compute_directions(cfg: DirectionsConfig, state=None, log=print) -> dict:
    """Run `facegan directions`: every rank calls it; rank 0 writes the files."""
    from facegan_dist import dist
    from facegan_dist.artifacts import load_unconditional_generator
    from facegan_dist.classifier import ClassifierSettings, classifier_dir, get_classifier
    from facegan_dist.data.stream import Manifest
    from facegan_dist.latent import seed_z
    from facegan_dist.paths import out_file

    cfg.validate()
    device = state.device if state is not None else "cpu"
    G, meta, info = load_unconditional_generator(cfg.source, device, ema=cfg.ema)
    out = Path(cfg.out) if cfg.out else Path(info["run_dir"]) / DIRECTIONS_NAME
    for path in (out, meta_path(out)):  # before any work (the classifier takes minutes)
        out_file(path, "--out")
    size = Manifest.read(cfg.data).image_size
    clf_dir = classifier_dir(cfg.data)  # a URL without --cache-dir: one line before any work
    if size != meta["resolution"]:
        raise ConfigError(
            f"--data {cfg.data}: shards are {size} px, the generator makes {meta['resolution']} px"
        )
    settings = ClassifierSettings(epochs=cfg.classifier_epochs, width=cfg.classifier_width)
    clf, clf_meta = get_classifier(
        cfg.data, device, settings=settings, retrain=cfg.retrain_classifier, state=state, log=log
    )
    names = clf_meta["attribute_names"]
    seeds = list(range(cfg.seed, cfg.seed + cfg.n))
    probs = classify_seeds(G, clf, seeds, batch=cfg.batch, state=state)
    dirs, stats = fit_directions(seed_z(seeds, G.z_dim), probs > 0.5, cfg.method)
    check = {}
    if cfg.check_seeds:
        check_seeds = list(range(CHECK_SEED, CHECK_SEED + cfg.check_seeds))
        check = edit_effect(G, clf, dirs, check_seeds, cfg.check_amount, cfg.batch, state)
    attributes = {}
    for a, name in enumerate(names):
        row = {**stats[a], "classifier_accuracy": clf_meta["accuracy"].get(name)}
        if a in check:
            row["check_before"], row["check_after"] = (round(v, 4) for v in check[a])
        attributes[name] = row
    result = {
        "format_version": 1,
        "method": cfg.method,
        "n": cfg.n,
        "seeds": f"{cfg.seed}-{cfg.seed + cfg.n - 1}",
        "z_dim": G.z_dim,
        "generator": {"path": str(info["path"]), "kind": info["kind"], "ema": meta["ema"]},
        "classifier": {
            "path": str(clf_dir),
            "mean_accuracy": clf_meta["mean_accuracy"],
            "manifest_sha256": clf_meta["manifest_sha256"],
        },
        "check": {"seeds": cfg.check_seeds, "first_seed": CHECK_SEED, "amount": cfg.check_amount},
        "attribute_names": names,
        "attributes": attributes,
    }
    if dist.is_main(state):
        save_directions(out, dirs, result)
    dist.barrier(state)
    return {**result, "path": out, "directions": dirs}
