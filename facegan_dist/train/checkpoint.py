"""Complete, atomic checkpoints on top of `accelerator.save_state`.

A checkpoint is `RUN_DIR/checkpoints/step-000001000/` holding what Accelerate writes (G, D as
safetensors; both optimizers; the GradScaler under fp16; one RNG file per rank) plus our own
`trainer_state.json` (step, images seen, batches drawn, W&B run id, the resolved config) and
`<name>.safetensors` tensor files (the fixed noise, the EMA of G). No custom object is registered
with Accelerate, because Accelerate loads those with `weights_only=False` (a pickle that could run
code); ours are JSON/safetensors.

Atomicity: every rank writes into `.tmp-step-.../`; after a barrier rank 0 writes
`trainer_state.json` last and renames the folder. A folder without the `.tmp-` prefix and with
`trainer_state.json` is complete; anything else (a kill mid-write) is never picked by --resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from facegan_dist.errors import CheckpointError
from facegan_dist.export import atomic_write_text

STATE_NAME = "trainer_state.json"
_CKPT_RE = re.compile(r"^step-(\d{9})$")


def ckpt_name(step: int) -> str:
    return f"step-{step:09d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and _CKPT_RE.match(p.name) and (p / STATE_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)))


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """--resume auto -> newest complete checkpoint in run_dir (None when there is none);
    --resume PATH -> that checkpoint (CheckpointError when it is not a complete one)."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {STATE_NAME})")
    return path


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt / STATE_NAME}: unreadable ({exc})") from None


def save(
    acc,
    ckpt_root: Path,
    step: int,
    state: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
    keep: int,
) -> Path:
    """Write checkpoint `step` on ALL ranks (save_state is a collective), then rotate to `keep`.
    `tensors` maps a name to a flat dict of tensors, saved as `<name>.safetensors` by rank 0."""
    from safetensors.torch import save_file

    final = ckpt_root / ckpt_name(step)
    tmp = ckpt_root / f".tmp-{ckpt_name(step)}"
    if acc.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    acc.wait_for_everyone()
    if final.exists():  # e.g. resumed at the final step: the checkpoint is already there
        acc.wait_for_everyone()
        return final
    acc.save_state(str(tmp), safe_serialization=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        for name, flat in tensors.items():
            cpu = {k: v.detach().cpu().contiguous() for k, v in flat.items()}
            save_file(cpu, str(tmp / f"{name}.safetensors"))
        state = {**state, "tensor_files": sorted(tensors)}
        atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=2))
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load(acc, ckpt: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Restore models/optimizers/scaler/RNG via Accelerate; return (trainer state, tensor files).
    Everything is read with safetensors or `weights_only=True`: nothing in a checkpoint runs."""
    from safetensors.torch import load_file

    state = read_state(ckpt)
    try:
        acc.load_state(str(ckpt))
        tensors = {
            name: load_file(str(ckpt / f"{name}.safetensors"))
            for name in state.get("tensor_files", [])
        }
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{ckpt}: cannot load checkpoint: {first}") from None
    return state, tensors


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
