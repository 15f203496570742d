"""Before any work: the run's config, the checkpoint it resumes, and the checks that fail in one
line before an Accelerator, a model or a file exists (`build_run` calls them in this order)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from facegan_dist.config import TrainConfig, merge_train_config, train_config_from_json
from facegan_dist.data.remote import Remote, locate
from facegan_dist.data.stream import Manifest
from facegan_dist.errors import CheckpointError, ConfigError, DataError
from facegan_dist.train import checkpoint


def resolve_config(
    preset: str | None, config_file: Path | None, flags: dict[str, Any]
) -> tuple[TrainConfig, Path | None]:
    """The run's config and the checkpoint to resume from (None for a fresh run).

    When resuming, the config saved in the checkpoint is the base and only what this command line
    states explicitly (preset, --config file, flags) overrides it, e.g. a larger --max-steps.
    `--resume auto` skips a damaged newest checkpoint for an older intact one, with a warning.
    """
    cfg = merge_train_config(preset, config_file, flags)
    if cfg.restart and cfg.resume is not None:  # before looking for a checkpoint to resume
        raise ConfigError(f"--restart starts the run over: it cannot go with --resume {cfg.resume}")
    ckpt = checkpoint.find_resume(cfg.run_dir, cfg.resume, warn=_print_rank0)
    if ckpt is None:
        if cfg.resume not in (None, "auto"):
            raise CheckpointError(f"--resume {cfg.resume}: not found")
        return cfg.validate(), None
    saved = train_config_from_json(checkpoint.read_state(ckpt).get("config", {}))
    saved.pop("resume", None)
    saved.pop("restart", None)  # an action of the command that started the run, not a setting
    cfg = merge_train_config(preset, config_file, flags, base=saved)
    return cfg.validate(), ckpt


def _print_rank0(line: str) -> None:
    """A warning from before the Accelerator exists: printed by the launcher's rank 0 only (the
    RANK rule of `dist.error_line`), so N processes print it once."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(line, file=sys.stderr, flush=True)


def check_run_folder(cfg: TrainConfig, resume_from: Path | None) -> None:
    """A fresh run never writes into a folder holding another run: two runs' metrics, exports
    and checkpoints would mix (and --resume auto would later pick the old run's checkpoint).
    Read-only; `--restart` moves the old run aside later, on rank 0 (`move_run_aside`).

    `--resume auto` without any checkpoint starts fresh over the leftovers of a run that never
    checkpointed (its metrics rows are dropped), but not over a finished run's export."""
    run_dir = cfg.run_dir
    if resume_from is not None or cfg.restart:
        return
    entries = checkpoint.run_entries(run_dir)
    if cfg.resume == "auto":
        finished = [e for e in entries if e in ("export", "best")]
        if finished:
            raise ConfigError(
                f"--out {run_dir} holds a finished run ({', '.join(e + '/' for e in finished)}) "
                "but no checkpoint to resume: start over with --restart (moves it to "
                f"{checkpoint.aside_name(run_dir)}), or pick a new --out"
            )
        return
    if entries:
        listing = ", ".join(e + "/" if (run_dir / e).is_dir() else e for e in entries)
        raise ConfigError(
            f"--out {run_dir} already holds a run ({listing}): continue it with --resume auto, "
            f"start over with --restart (moves it to {checkpoint.aside_name(run_dir)}), or pick "
            "a new --out"
        )


def check_resolution(cfg: TrainConfig, resolution: int) -> None:
    """The shards' image size must be one the architecture builds (train has no size flag: the
    size comes from --data's manifest)."""
    from facegan_dist.models import RESOLUTIONS

    sizes = RESOLUTIONS[cfg.arch]
    if resolution not in sizes:
        fit = max((s for s in sizes if s <= resolution), default=sizes[0])
        raise ConfigError(
            f"--data {cfg.data}: holds {resolution} px images, but --arch {cfg.arch} trains on "
            f"{', '.join(map(str, sizes))} px; write shards of one of these sizes "
            f"(`facegan shard SRC --size {fit} --out NEW`)"
        )


def check_resume_matches(
    cfg: TrainConfig, state: dict[str, Any], ckpt: Path, resolution: int,
    attribute_names: list[str],
) -> None:  # fmt: skip
    """Before loading: the networks this command builds are the checkpoint's. A changed --arch,
    width, upsampling, norm, condition or image size would fail deep inside load_state_dict;
    here it is one line saying what differs."""
    import dataclasses

    saved = state.get("config", {})
    meta = state.get("generator", {})
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    diffs = []

    def differ(label: str, old: Any, new: Any) -> None:
        if old != new:
            diffs.append(f"{label}: checkpoint {old}, now {new}")

    old_arch = saved.get("arch", defaults["arch"])
    differ("--arch", old_arch, cfg.arch)
    if old_arch == cfg.arch:
        keys = ["z_dim", "spectral_norm"]
        if cfg.arch == "dcgan":
            keys += ["g_width", "d_width", "upsample", "mbstd"]
        for k in keys:
            differ("--" + k.replace("_", "-"), saved.get(k, defaults[k]), getattr(cfg, k))
        if cfg.arch == "dcgan":
            differ("--d-norm", meta.get("d_norm", cfg.resolved_d_norm), cfg.resolved_d_norm)
        old_cond = list(meta.get("condition") or [])
        new_cond = resolve_condition(cfg.condition, attribute_names)
        differ("--condition", ",".join(old_cond) or "none", ",".join(new_cond) or "none")
    old_res = meta.get("resolution")
    if old_res is not None and int(old_res) != resolution:
        diffs.append(
            f"image size: checkpoint {old_res} px, now {resolution} px (--data {cfg.data})"
        )
    if diffs:
        raise ConfigError(
            f"--resume {ckpt}: this run's networks differ from the checkpoint's ("
            + "; ".join(diffs)
            + "); drop the flags that change them (the checkpoint's settings are the defaults), "
            "or train into a new --out"
        )


def resolve_condition(spec: str | None, attribute_names: list[str]) -> list[str]:
    """--condition all | A,B,... -> the attribute names to condition on (checked)."""
    if spec is None:
        return []
    if not attribute_names:
        raise ConfigError(f"--condition {spec}: the shards have no attributes (a plain folder)")
    if spec.strip() == "all":
        return list(attribute_names)
    names = [x.strip() for x in spec.split(",") if x.strip()]
    for name in names:
        if name not in attribute_names:
            raise ConfigError(f"--condition: {name!r} is not an attribute of the shards")
    return names


def data_location(cfg: TrainConfig) -> Path | Remote:
    """--data as the readers take it: the folder, or a URL with the --data-retries /
    --data-timeout policy and the --cache-dir (data/remote.py `locate`)."""
    return locate(cfg.data, cfg.cache_dir, retries=cfg.data_retries, timeout_s=cfg.data_timeout)


def read_data_manifest(cfg: TrainConfig) -> Manifest:
    """The shard manifest of --data (read and checked once per run), with one-line errors for a
    missing or empty folder. A URL --data is fetched with the --data-retries/--data-timeout
    policy, which its shard reads keep (data/remote.py)."""
    if isinstance(cfg.data, str):
        return Manifest.read(data_location(cfg))
    if not cfg.data.exists():
        raise DataError(f"--data {cfg.data}: no such folder (write shards with `facegan shard`)")
    if not cfg.data.is_dir():
        raise DataError(f"--data {cfg.data}: not a folder (give the shard folder)")
    return Manifest.read(cfg.data)


def steps_for_epochs(epochs: float, batches_per_epoch: int, d_every: int, d_steps: int) -> int:
    """G steps needed to draw `epochs` passes of real batches (D draws d_steps per D step)."""
    batches = math.ceil(epochs * batches_per_epoch)
    d_updates = math.ceil(batches / d_steps)
    return max(1, (d_updates - 1) * d_every + 1)


def below_checkpoint(what: str, state: dict[str, Any], ckpt: Path) -> str:
    step = int(state["step"])
    return (
        f"{what} is below step {step} of the checkpoint it resumes ({ckpt}): nothing would "
        f"train; give --max-steps above {step} to train on"
    )


def check_inception_weights(cfg: TrainConfig) -> None:
    """`--eval-features inception` needs its weights file: checked before any work, with the
    train flags in the message (metrics.py names evaluate's `--features`)."""
    from facegan_dist.metrics import inception_weights_path

    try:
        inception_weights_path(cfg.inception_weights)
    except CheckpointError as exc:
        msg = str(exc).replace("--features attributes", "--eval-features attributes")
        raise CheckpointError(msg) from None
