"""Complete, atomic checkpoints on top of `accelerator.save_state`.

A checkpoint is `RUN_DIR/checkpoints/step-000001000/` holding what Accelerate writes (G, D as
safetensors; both optimizers; the GradScaler under fp16; one RNG file per rank) plus our own
`trainer_state.json` (step, images seen, batches drawn, W&B run id, the resolved config) and
`<name>.safetensors` tensor files (the fixed noise, the EMA of G). No custom object is registered
with Accelerate, because Accelerate loads those with `weights_only=False` (a pickle that could run
code); ours are JSON/safetensors.

Atomicity: every rank writes into `.tmp-step-.../`; after a barrier rank 0 writes
`trainer_state.json` last and renames the folder. A folder without the `.tmp-` prefix and with
`trainer_state.json` is complete; anything else (a kill mid-write) is never picked by --resume,
and the next save removes it.

Failures (docs/RELIABILITY.md): a write that fails on any rank (disk full, quota, I/O error)
removes the temp folder and raises the same one-line CheckpointError on every rank, after the
same collectives, so no rank waits in a barrier that another one skipped. Loading reads nothing
that can run code (safetensors, JSON, `torch.load(weights_only=True)`), and every rank fails or
succeeds together.

Damage (a complete folder with an empty, truncated or missing file): `find_resume` reads every
file back first (`check_files`). `--resume auto` steps over a damaged newest checkpoint to the
newest intact one, with a warning; the resumed run renames later checkpoints to `*.damaged` /
`*.superseded` (`set_aside_newer`) so they are kept but never reused.

The run folder as a whole: RUN_ENTRIES are what a run writes there; a fresh run refuses a folder
holding any of them, and `--restart` moves them to a sibling `OUT.old-<date>-<time>`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from facegan_dist.artifacts import CKPT_RE, ckpt_name, list_checkpoints
from facegan_dist.artifacts import CKPT_STATE_NAME as STATE_NAME
from facegan_dist.errors import CheckpointError
from facegan_dist.paths import atomic_write_text

# What a training run writes into its folder. A fresh run refuses a folder holding any of them
# (it would mix two runs); `--restart` moves them aside together, deleting nothing.
RUN_ENTRIES = ("checkpoints", "export", "best", "samples", "wandb", "metrics.jsonl", "run.json",
               "config.json")  # fmt: skip


def run_entries(run_dir: Path) -> list[str]:
    """The RUN_ENTRIES present in run_dir (empty for a new or an unrelated folder)."""
    return [n for n in RUN_ENTRIES if (run_dir / n).exists() or (run_dir / n).is_symlink()]


def aside_name(run_dir: Path) -> str:
    """How `--restart` names the folder it moves a run to (for messages and help)."""
    return f"{run_dir}.old-<date>-<time>"


def move_run_aside(run_dir: Path) -> Path | None:
    """`--restart`: move the run in run_dir (its RUN_ENTRIES; anything else stays) into a new
    sibling folder `<run_dir>.old-YYYYmmdd-HHMMSS` and return it (None when there was no run).
    Renames only, within one filesystem; on a failure the moved entries go back, so the run is
    either fully moved or untouched (CheckpointError naming both folders)."""
    entries = run_entries(run_dir)
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = run_dir.resolve()
    dest = base.with_name(f"{base.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}.old-{stamp}-{n}")
    moved: list[str] = []
    try:
        dest.mkdir()
        for name in entries:
            os.replace(run_dir / name, dest / name)
            moved.append(name)
    except OSError as exc:
        for name in reversed(moved):
            os.replace(dest / name, run_dir / name)
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        why = exc.strerror or type(exc).__name__
        raise CheckpointError(
            f"--restart: cannot move the run in {run_dir} to {dest} ({why}); nothing was moved"
        ) from None
    _fsync_dir(base.parent)
    return dest


def find_resume(
    run_dir: Path, resume: str | None, warn: Callable[[str], None] | None = None
) -> Path | None:
    """--resume auto -> the newest INTACT checkpoint in run_dir (None when there is none);
    --resume PATH -> that checkpoint. Both check every file first (`check_files`), so a damaged
    checkpoint is one line naming the file before any work.

    auto skips a damaged newest checkpoint for the next older intact one: `warn` gets one line
    naming the skipped one, which stays on disk. A file refused as untrusted, or no intact
    checkpoint at all, is a CheckpointError; so is any problem with an explicit PATH."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        skipped: list[tuple[Path, str]] = []
        for ckpt in reversed(found):
            problem = check_files(ckpt)
            if problem is None:
                for bad, why in skipped:
                    if warn is not None:
                        warn(
                            f"warning: --resume auto: skipped the damaged checkpoint {bad} "
                            f"({why}); resuming from {ckpt.name}; the damaged one is kept, "
                            f"renamed {bad.name}.damaged"
                        )
                return ckpt
            why, untrusted = problem
            if untrusted:  # someone else's file, not a damaged one of ours: stop here
                raise CheckpointError(why)
            skipped.append((ckpt, why))
        if skipped:
            raise CheckpointError(
                f"--resume auto: no intact checkpoint in {run_dir / 'checkpoints'} (the newest, "
                f"{skipped[0][0].name}: {skipped[0][1]}); start over with --restart instead of "
                "--resume, or pick a new --out"
            )
        return None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {STATE_NAME})")
    problem = check_files(path)
    if problem is not None:
        why, untrusted = problem
        raise CheckpointError(why if untrusted else f"--resume {resume}: damaged checkpoint: {why}")
    return path


def set_aside_newer(ckpt_root: Path, resumed: Path) -> list[tuple[Path, Path]]:
    """Rank 0, when a run resumes from `resumed`: the complete checkpoints of a later step in
    ckpt_root belong to another timeline (a damaged one --resume auto skipped, or newer ones
    when an older checkpoint was resumed on purpose). Left in place, the next save at that step
    would take the old folder for its own and --resume auto could pick it, so each is renamed
    to `<name>.damaged` or `<name>.superseded` (out of the step-* namespace: never resumed,
    rotated or deleted). Returns the (old, new) paths."""
    step = int(CKPT_RE.match(resumed.name).group(1)) if CKPT_RE.match(resumed.name) else None
    if step is None:
        step = int(read_state(resumed)["step"])
    moved = []
    for ckpt in list_checkpoints(ckpt_root):
        if int(CKPT_RE.match(ckpt.name).group(1)) <= step:
            continue
        kind = "damaged" if check_files(ckpt) is not None else "superseded"
        dest, n = ckpt.with_name(f"{ckpt.name}.{kind}"), 1
        while dest.exists():
            n += 1
            dest = ckpt.with_name(f"{ckpt.name}.{kind}-{n}")
        os.replace(ckpt, dest)
        moved.append((ckpt, dest))
    return moved


# The files `accelerator.save_state` writes for our two models and two optimizers (the GradScaler
# `scaler.pt` only under fp16, one `random_states_<rank>.pkl` per rank).
_REQUIRED = ("model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin")


def check_files(ckpt: Path) -> tuple[str, bool] | None:
    """The first problem with checkpoint `ckpt`, or None when every file reads back.

    Returns (one line naming the file, untrusted): untrusted=True for a file refused unopened
    or by `torch.load(weights_only=True)` (it would run code); False for a damaged one (missing,
    empty, truncated, unparsable). Reads everything, on the CPU, with nothing that runs code."""
    from accelerate.utils.other import load as accelerate_load
    from safetensors.torch import load_file

    try:
        state = read_state(ckpt)
    except CheckpointError as exc:
        return str(exc), False
    custom = sorted(ckpt.glob("custom_checkpoint_*.pkl"))
    if custom:
        return _custom_refusal(ckpt / custom[0].name), True
    tensor_files = [f"{name}.safetensors" for name in state.get("tensor_files", [])]
    for name in (*_REQUIRED, *tensor_files):
        if not (ckpt / name).is_file():
            return f"{ckpt / name}: missing", False
    for path in sorted(ckpt.iterdir()):
        if path.name == STATE_NAME or path.suffix not in (".safetensors", ".bin", ".pt", ".pkl"):
            continue
        try:
            if path.stat().st_size == 0:
                return f"{path}: empty file", False
            if path.suffix == ".safetensors":
                load_file(str(path))
                continue
            data = accelerate_load(path, map_location="cpu")
        except pickle.UnpicklingError:
            return f"{path}: {_REFUSED}", True
        except Exception as exc:  # truncated, garbage, unreadable: the file is damaged
            return f"{path}: unreadable ({_first_line(exc)})", False
        if path.name.startswith("random_states_") and not (
            isinstance(data, dict) and "torch_manual_seed" in data
        ):
            return f"{path}: not an RNG state file", False
    return None


def _custom_refusal(path: Path) -> str:
    return (
        f"{path}: refused: this trainer writes no custom_checkpoint_*.pkl, and accelerate would "
        "unpickle it with weights_only=False (code could run); remove it"
    )


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
    `tensors` maps a name to a flat dict of tensors, saved as `<name>.safetensors` by rank 0.

    A failed write (disk full, quota, I/O error) on any rank raises CheckpointError on every rank
    after the same collectives, with the temp folder removed and the previous checkpoints intact.
    """
    final = ckpt_root / ckpt_name(step)
    tmp = ckpt_root / f".tmp-{ckpt_name(step)}"

    # 1. rank 0 prepares the folder and decides whether there is anything to write.
    done, err = False, None
    if acc.is_main_process:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            _remove_debris(ckpt_root, final)
            done = (final / STATE_NAME).is_file()  # e.g. resumed at the final step
        except Exception as exc:
            err = exc
    done = _agree(acc, final, err, extra=done)
    if done:
        return final

    # 2. every rank writes its files (rank 0: models, optimizers, scaler; each rank: its RNG).
    err = None
    try:
        acc.save_state(str(tmp), safe_serialization=True)
    except Exception as exc:
        err = exc
    _agree(acc, final, err, cleanup=tmp)

    # 3. rank 0 completes the folder, state last, and renames it into place.
    err = None
    if acc.is_main_process:
        try:
            _write_rank0_files(tmp, final, state, tensors)
        except Exception as exc:
            err = exc
    _agree(acc, final, err, cleanup=tmp)
    if acc.is_main_process:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _write_rank0_files(
    tmp: Path, final: Path, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]
) -> None:
    from safetensors.torch import save_file

    for name, flat in tensors.items():
        cpu = {k: v.detach().cpu().contiguous() for k, v in flat.items()}
        save_file(cpu, str(tmp / f"{name}.safetensors"))
    state = {**state, "tensor_files": sorted(tensors)}
    # Test hook: hold the half-written folder open so a test can kill -9 mid-write.
    if delay_s := float(os.environ.get("FACEGAN_TEST_SAVE_DELAY_S", "0")):
        time.sleep(delay_s)
    atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=2))
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _remove_debris(ckpt_root: Path, final: Path) -> None:
    """Rank 0, before a save: drop what killed runs left behind. Every `.tmp-step-*` folder is
    unfinished (each save starts by removing its own), and a `step-*` folder at this step without
    trainer_state.json is not a checkpoint (not from us: we rename only complete folders) and
    would block the rename. Nothing in here is ever picked by --resume."""
    for old in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(old, ignore_errors=True)
    if final.is_dir() and not (final / STATE_NAME).is_file():
        shutil.rmtree(final)


# Exceptions that mean "the write failed" (the disk, not our code): torch.save reports a full disk
# as RuntimeError ("PytorchStreamWriter failed writing file ..."), safetensors as SafetensorError.
def _is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError | RuntimeError) or type(exc).__name__ == "SafetensorError"


def _agree(acc, final: Path, err: BaseException | None, *, cleanup: Path | None = None, extra=None):
    """A collective every rank reaches, failed or not: gathers each rank's error and rank 0's
    `extra`. When any rank failed, rank 0 removes `cleanup` and EVERY rank raises: a
    CheckpointError naming `final`, or (on the rank where it happened) a non-I/O exception as is,
    so a bug keeps its traceback. Returns rank 0's `extra` otherwise."""
    mine = (None if err is None else f"{_describe(err, final)}", extra)
    if acc.num_processes == 1:
        gathered = [mine]
    else:
        from accelerate.utils import gather_object

        gathered = list(gather_object([mine]))
    failures = [(rank, msg) for rank, (msg, _) in enumerate(gathered) if msg is not None]
    if not failures:
        return gathered[0][1]
    if cleanup is not None and acc.is_main_process:
        shutil.rmtree(cleanup, ignore_errors=True)
    if err is not None and not _is_write_error(err):
        raise err
    rank, msg = failures[0]
    where = f" (rank {rank})" if acc.num_processes > 1 else ""
    raise CheckpointError(
        f"cannot write checkpoint {final}{where}: {msg}; the previous checkpoints are intact"
    ) from (err if err is not None and acc.process_index == rank else None)


def _describe(exc: BaseException, final: Path) -> str:
    """One line for a failed write: 'no space left on device' when it is that, plus free space."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    try:
        free: int | None = shutil.disk_usage(final.parent).free
    except OSError:
        free = None
    code = getattr(exc, "errno", None)
    if code == errno.EDQUOT or "quota" in text.lower():
        what = "disk quota exceeded"
    elif (
        code == errno.ENOSPC
        or "no space left" in text.lower()
        # torch.save reports a full disk without errno ("file write failed")
        or (free is not None and free < _NEARLY_FULL_BYTES)
    ):
        what = "no space left on device"
    else:
        what = text if len(text) <= 200 else text[:197] + "..."
    if free is not None:
        what += f" ({free / 2**20:,.0f} MiB free there)"
    return what


_NEARLY_FULL_BYTES = 64 * 2**20


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What a checkpoint that cannot be loaded raises: files missing or truncated (OSError, EOFError,
# RuntimeError), tensors of the wrong shape (RuntimeError), a pickle with anything but tensors and
# plain containers (UnpicklingError from torch.load(weights_only=True)), bad safetensors.
_LOAD_ERRORS = (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError)
_REFUSED = "refused: it holds objects other than tensors (torch.load(weights_only=True))"


def _check_rng_file(acc, ckpt: Path) -> str | None:
    """Accelerate reads `random_states_<rank>.pkl` with weights_only=True but silently resumes
    with other random streams when that fails; a tampered or truncated one is refused here."""
    from accelerate.utils.other import load as accelerate_load

    path = ckpt / f"random_states_{acc.process_index}.pkl"
    if not path.is_file():  # e.g. resuming a 1-process checkpoint on 2: accelerate skips it too
        return None
    try:
        states = accelerate_load(path, map_location="cpu")
    except pickle.UnpicklingError:
        return f"{path}: {_REFUSED}"
    except Exception as exc:
        return f"{path}: unreadable: {_first_line(exc)}"
    if not isinstance(states, dict) or "torch_manual_seed" not in states:
        return f"{path}: not an RNG state file"
    return None


def load(acc, ckpt: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Restore models/optimizers/scaler/RNG via Accelerate; return (trainer state, tensor files).

    Everything is read with safetensors or `weights_only=True`: nothing in a checkpoint runs.
    Accelerate unpickles `custom_checkpoint_*.pkl` with `weights_only=False` (for objects
    registered with `register_for_checkpointing`): we register none and refuse a checkpoint that
    holds such a file, unopened. Call on all ranks: each rank loads, then they agree, so all of
    them fail together (one-line CheckpointError) or all go on.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_state(ckpt)
    if getattr(acc, "_custom_objects", None):
        raise CheckpointError(
            f"{ckpt}: refusing to resume: objects registered with accelerator."
            "register_for_checkpointing are unpickled with weights_only=False (code could run)"
        )
    custom = sorted(p.name for p in ckpt.glob("custom_checkpoint_*.pkl"))
    if custom:  # never written by this trainer: refused before accelerate looks at them
        raise CheckpointError(_custom_refusal(ckpt / custom[0]))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    problem = _check_rng_file(acc, ckpt)
    if problem is None:
        try:
            acc.load_state(str(ckpt))
            tensors = {
                name: load_file(str(ckpt / f"{name}.safetensors"))
                for name in state.get("tensor_files", [])
            }
        except (*_LOAD_ERRORS, SafetensorError) as exc:
            # name the file when one is damaged or refused (an empty optimizer.bin is an
            # EOFError without a message otherwise)
            bad = check_files(ckpt)
            if bad is not None:
                problem = bad[0] if bad[1] else f"damaged checkpoint: {bad[0]}"
            elif isinstance(exc, pickle.UnpicklingError):
                problem = f"{ckpt}: {_REFUSED}"
            else:
                problem = f"{ckpt}: cannot load checkpoint: {_first_line(exc)}"
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        problems = [p for p in gather_object([problem]) if p is not None]
        problem = problems[0] if problems else None
    if problem is not None:
        raise CheckpointError(problem)
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
