"""Write and read the exported generator: `generator.safetensors` (a state_dict) + `generator.json`.

A leaf module used by training (to export) and by sampling/evaluation (to load). Never a pickled
module: safetensors cannot run code, and the JSON rebuilds the architecture with `build_models`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facegan_dist.errors import CheckpointError, ConfigError

WEIGHTS_NAME = "generator.safetensors"  # the EMA of G when training kept one, else G
RAW_WEIGHTS_NAME = "generator_raw.safetensors"  # G itself, written only beside an EMA export
META_NAME = "generator.json"
# The TrainConfig fields that define G's architecture.
ARCH_KEYS = ("arch", "act", "dropout", "z_dim", "g_width", "d_width", "upsample", "spectral_norm",
             "mbstd")  # fmt: skip


# What generator.json must hold to rebuild G (`build_from_meta`; the other keys have defaults).
META_REQUIRED = ("arch", "resolution", "z_dim", "g_width", "d_width", "act", "dropout")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp name beside `path`; on success it is renamed to `path`, so readers never see
    half a file. On any failure (the write, the rename, Ctrl-C) the temp file is removed and the
    exception goes on: a failed write leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if not tmp.is_dir():
                tmp.unlink(missing_ok=True)
        raise


def _try_create(path: Path, tmp: Path, flag: str) -> None:
    try:
        with open(tmp, "ab"):
            pass
        tmp.unlink()
    except OSError as exc:
        where = "there" if tmp.parent == path else f"in {tmp.parent}"
        raise ConfigError(f"{flag} {path}: cannot create files {where} ({exc.strerror})") from None


def writable_dir(path: Path, flag: str) -> Path:
    """`paths.out_dir`, then a real try: create and remove a file in it, so that a folder that
    looks writable but is not (/proc, a read-only mount seen as root) is one ConfigError naming
    `flag`, before any work."""
    from facegan_dist.paths import out_dir

    path = out_dir(Path(path), flag)
    _try_create(path, path / f".facegan-{os.getpid()}.probe.tmp", flag)
    return path


def writable_file(path: Path, flag: str) -> Path:
    """`paths.out_file`, then a real try: create and remove a file beside it (see
    `writable_dir`). The file itself is not created."""
    from facegan_dist.paths import out_file

    path = Path(path)
    try:
        out_file(path, flag)
    except ConfigError as exc:  # out_file names the folder; the user typed the file
        why = str(exc).removeprefix(f"{flag} ")
        if why.startswith(f"{path}: "):
            raise
        raise ConfigError(f"{flag} {path}: cannot be written ({why})") from None
    _try_create(path, path.with_name(f".{path.name}.{os.getpid()}.probe.tmp"), flag)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temp name + rename (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
