"""Write and read the exported generator: `generator.safetensors` (a state_dict) + `generator.json`.

A leaf module used by training (to export) and by sampling/evaluation (to load). Never a pickled
module: safetensors cannot run code, and the JSON rebuilds the architecture with `build_models`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facegan_dist.errors import CheckpointError

WEIGHTS_NAME = "generator.safetensors"  # the EMA of G when training kept one, else G
RAW_WEIGHTS_NAME = "generator_raw.safetensors"  # G itself, written only beside an EMA export
META_NAME = "generator.json"
# The TrainConfig fields that define G's architecture.
ARCH_KEYS = ("arch", "act", "dropout", "z_dim", "g_width", "d_width", "upsample", "spectral_norm",
             "mbstd")  # fmt: skip


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temp name + rename so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _save_state_dict(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


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


def load_generator(
    path: Path, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[nn.Module, dict]:
    """Rebuild G from an export folder (or its .safetensors file) -> (G in eval mode, meta).
    `ema=False` loads the raw G of an export that has an EMA."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    weights, meta_path = folder / WEIGHTS_NAME, folder / META_NAME
    if not ema and (folder / RAW_WEIGHTS_NAME).is_file():
        weights = folder / RAW_WEIGHTS_NAME
    if not weights.is_file() or not meta_path.is_file():
        raise CheckpointError(f"{folder}: no exported generator ({WEIGHTS_NAME} + {META_NAME})")
    try:
        meta = json.loads(meta_path.read_text())
        G, _ = build_from_meta(meta)
        G.load_state_dict(load_file(str(weights), device="cpu"))
    except (KeyError, ValueError, RuntimeError, json.JSONDecodeError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{weights}: cannot load generator: {first}") from None
    return G.to(device).eval(), meta
