"""The run folder's artifacts: where a run keeps its generator, in which format, and how a
generator is found and loaded again.

    RUN_DIR/export/generator.safetensors       G's state_dict (the EMA of G when training kept one)
    RUN_DIR/export/generator_raw.safetensors   G itself, written only beside an EMA export
    RUN_DIR/export/generator.json              what rebuilds G (`generator_meta`)
    RUN_DIR/checkpoints/step-000001000/        train/checkpoint.py: trainer_state.json (with the
                                               generator meta), model.safetensors (G),
                                               ema.safetensors (the EMA of G), ...

Used by training (to export), and by `facegan sample`, `facegan evaluate` and `facegan
directions` (to find and load a generator from a run folder, an export folder or a checkpoint
folder). It never imports train/ (train imports it). Never a pickled module: safetensors cannot
run code, and the JSON rebuilds the architecture with `build_models`. Files are written through
`paths.atomic_path` / `paths.atomic_write_text`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facegan_dist.errors import CheckpointError, ConfigError
from facegan_dist.paths import atomic_path, atomic_write_text

# ---- the layout ----

EXPORT_DIR = "export"
WEIGHTS_NAME = "generator.safetensors"  # the EMA of G when training kept one, else G
RAW_WEIGHTS_NAME = "generator_raw.safetensors"  # G itself, written only beside an EMA export
META_NAME = "generator.json"
# The checkpoint layout of train/checkpoint.py (tests/unit/test_sampling.py checks they agree).
CHECKPOINTS_DIR = "checkpoints"
CKPT_STATE_NAME = "trainer_state.json"
CKPT_G_NAME = "model.safetensors"  # accelerate's save_state: the first prepared model is G
CKPT_EMA_NAME = "ema.safetensors"
CKPT_RE = re.compile(r"^step-(\d{9})$")

# The TrainConfig fields that define G's architecture.
ARCH_KEYS = ("arch", "act", "dropout", "z_dim", "g_width", "d_width", "upsample", "spectral_norm",
             "mbstd")  # fmt: skip
# What generator.json must hold to rebuild G (`build_from_meta`; the other keys have defaults).
META_REQUIRED = ("arch", "resolution", "z_dim", "g_width", "d_width", "act", "dropout")


# ---- the export: write ----


def generator_meta(
    cfg: dict[str, Any],
    resolution: int,
    attribute_names: list[str],
    condition: list[str] | None = None,
    d_norm: str = "batch",
) -> dict:
    """What rebuilds G (and D) without the training config: architecture, resolution, the
    shards' attribute names and, for a conditional G, the attributes it is conditioned on."""
    return {
        "format_version": 1,
        "resolution": resolution,
        "attribute_names": list(attribute_names),
        "condition": list(condition or []),
        "d_norm": d_norm,
        **{k: cfg[k] for k in ARCH_KEYS if k in cfg},
    }


def _save_state_dict(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def export_generator(
    G: nn.Module, meta: dict[str, Any], out_dir: Path, ema: nn.Module | None = None
) -> Path:
    """Save the generator as state_dict(s) + meta JSON into out_dir; returns the main weights.
    With `ema`, `generator.safetensors` is the EMA and `generator_raw.safetensors` is G."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if ema is not None:
        _save_state_dict(G, out_dir / RAW_WEIGHTS_NAME)
    _save_state_dict(ema if ema is not None else G, out_dir / WEIGHTS_NAME)
    atomic_write_text(out_dir / META_NAME, json.dumps({**meta, "ema": ema is not None}, indent=2))
    return out_dir / WEIGHTS_NAME


# ---- the export: read ----


def build_from_meta(meta: dict[str, Any]):
    """(G, D) built from a generator meta (older metas lack the newer keys: defaults)."""
    from facegan_dist.models import build_models

    return build_models(
        meta["arch"],
        resolution=meta["resolution"],
        z_dim=meta["z_dim"],
        g_width=meta["g_width"],
        d_width=meta["d_width"],
        act=meta["act"],
        dropout=meta["dropout"],
        upsample=meta.get("upsample", "convtranspose"),
        d_norm=meta.get("d_norm", "batch"),
        spectral_norm=meta.get("spectral_norm", "none"),
        n_cond=len(meta.get("condition") or []),
        mbstd=meta.get("mbstd", False),
    )


def check_meta(meta: object, where: Path) -> dict:
    """`meta` if it can rebuild G (a JSON object with every `META_REQUIRED` key), else a
    CheckpointError naming `where` (the generator.json, or the trainer_state.json holding it)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: not a JSON object (a {type(meta).__name__})")
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: no {', '.join(missing)} (not a generator config)")
    return meta


def read_meta(path: Path) -> dict:
    """The generator config in `path` (generator.json), checked; errors name the file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    try:
        meta = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return check_meta(meta, path)


def build_checked(meta: dict, where: Path):
    """(G, D) from a checked meta; a value build_models refuses is blamed on `where`."""
    try:
        return build_from_meta(meta)
    except (ConfigError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # build_models names train's flags ("--z-dim 0 ..."): here the value is the file's key
        first = re.sub(r"^--([\w-]+)", lambda m: m.group(1).replace("-", "_"), first)
        raise CheckpointError(
            f"{where}: cannot build the generator it describes ({first})"
        ) from None


def load_weights(G: nn.Module, weights: Path, prefixes: tuple[str, ...] = ()) -> None:
    """Load the state_dict in `weights` into G (removing wrapper `prefixes`); any failure (empty,
    truncated, not safetensors, another architecture) is one CheckpointError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(weights), device="cpu")
        for prefix in prefixes:
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
        G.load_state_dict(sd)
    except (OSError, EOFError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror:
            first = exc.strerror
        raise CheckpointError(f"{weights}: cannot load generator: {first}") from None


def load_generator(
    path: Path, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[nn.Module, dict]:
    """Rebuild G from an export folder (or its .safetensors file) -> (G in eval mode, meta).
    `ema=False` loads the raw G of an export that has an EMA. A problem with generator.json names
    generator.json; one with the weights names the .safetensors file."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    weights, meta_path = folder / WEIGHTS_NAME, folder / META_NAME
    if not ema and (folder / RAW_WEIGHTS_NAME).is_file():
        weights = folder / RAW_WEIGHTS_NAME
    if not meta_path.is_file():
        if weights.is_file():
            raise CheckpointError(f"{meta_path}: missing (it describes {weights.name})")
        raise CheckpointError(f"{folder}: no exported generator ({WEIGHTS_NAME} + {META_NAME})")
    meta = read_meta(meta_path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (described by {META_NAME})")
    G, _ = build_checked(meta, meta_path)
    load_weights(G, weights)
    return G.to(device).eval(), meta


# ---- any generator of a run: its export, or a checkpoint ----


def ckpt_name(step: int) -> str:
    return f"step-{step:09d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints in `ckpt_root` (RUN/checkpoints), oldest first: `step-*` folders
    holding trainer_state.json, which a save writes last."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and CKPT_RE.match(p.name) and (p / CKPT_STATE_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder in run_dir/checkpoints (None if there is none)."""
    found = list_checkpoints(Path(run_dir) / CHECKPOINTS_DIR)
    return found[-1] if found else None


def find_generator(path: Path) -> tuple[str, Path, Path | None]:
    """RUN_DIR | RUN_DIR/export | a checkpoint folder -> (kind, folder, run_dir).

    kind is "export" or "checkpoint". A run folder uses its export when there is one (the
    final G), else its newest complete checkpoint. run_dir is where `directions.safetensors`
    lives (None for a folder outside a run)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a run folder, export folder or checkpoint folder")
    if (path / META_NAME).is_file():
        return "export", path, path.parent if path.name == EXPORT_DIR else path
    if (path / CKPT_STATE_NAME).is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path
        return "checkpoint", path, run_dir
    if (path / EXPORT_DIR / META_NAME).is_file():
        return "export", path / EXPORT_DIR, path
    ckpt = newest_checkpoint(path)
    if ckpt is not None:
        return "checkpoint", ckpt, path
    for folder in (path, path / EXPORT_DIR):  # weights without their config: name the config
        if (folder / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{folder / META_NAME}: missing (it describes {WEIGHTS_NAME})")
    raise CheckpointError(
        f"{path}: no {EXPORT_DIR}/{META_NAME} and no complete checkpoint in "
        f"{CHECKPOINTS_DIR}/ (train first, or pass a checkpoint folder)"
    )


def _load_checkpoint_generator(ckpt: Path, device, ema: bool):
    state_path = ckpt / CKPT_STATE_NAME
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_path}: unreadable ({exc})") from None
    meta = state.get("generator") if isinstance(state, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{state_path}: no 'generator' entry (a checkpoint from an older "
            "version); sample its run's export/ instead"
        )
    check_meta(meta, state_path)
    use_ema = ema and (ckpt / CKPT_EMA_NAME).is_file()
    weights = ckpt / (CKPT_EMA_NAME if use_ema else CKPT_G_NAME)
    if not weights.is_file():
        raise CheckpointError(f"{ckpt}: no {CKPT_G_NAME} (incomplete checkpoint)")
    G, _ = build_checked(meta, state_path)
    load_weights(G, weights, prefixes=("module.", "_orig_mod."))  # DDP / torch.compile wrappers
    return G.to(device).eval(), {**meta, "ema": use_ema}


def load_any_generator(path: Path, device="cpu", ema: bool = True):
    """(G in eval mode, meta, info) from a run folder, an export folder or a checkpoint folder.

    `ema=True` takes the EMA of G when the run kept one (the export's `generator.safetensors`,
    a checkpoint's `ema.safetensors`), else G; `ema=False` always takes the raw G. `meta["ema"]`
    says which one was loaded; info = {"kind", "path", "run_dir"}."""
    kind, folder, run_dir = find_generator(path)
    if kind == "export":
        G, meta = load_generator(folder, device, ema=ema)
        meta = {**meta, "ema": bool(ema and meta.get("ema", False))}
    else:
        G, meta = _load_checkpoint_generator(folder, device, ema)
    info = {"kind": kind, "path": folder, "run_dir": run_dir, "bn_recalibrated": False}
    if meta["ema"] and "ema_bn_calibration" not in meta and not meta.get("condition"):
        # Written before the EMA had BatchNorm statistics of its own (they were copied from
        # the raw G): re-estimate them now, as training does today (models/bn.py).
        from facegan_dist.models.bn import recalibrate_bn

        info["bn_recalibrated"] = recalibrate_bn(G)
    return G, meta, info


def load_unconditional_generator(path: Path, device="cpu", ema: bool = True):
    """load_any_generator for the commands that draw G(z) without a condition (`directions`: on
    a conditional model the condition itself is the attribute control): a conditional generator
    is refused with one line."""
    G, meta, info = load_any_generator(path, device, ema=ema)
    if meta.get("condition"):
        raise ConfigError(
            f"{path}: a conditional generator; this command supports unconditional models only "
            "(use `facegan sample --attrs` to draw from it)"
        )
    return G, meta, info
