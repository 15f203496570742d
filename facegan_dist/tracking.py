"""Logging: W&B through Accelerate's tracker, mirrored to the run folder.

Every scalar row goes to `RUN_DIR/metrics.jsonl` (one JSON object per log interval) and to W&B;
every image goes to `RUN_DIR/samples/*.png` and to W&B. Only the main process writes or talks to
W&B; callers reduce statistics on all ranks *before* calling in here.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from facegan_dist.sampling import save_png


def has_wandb_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(requested: str | None) -> str:
    """--wandb-mode, else $WANDB_MODE, else online with an API key and offline without."""
    if requested:
        return requested
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_wandb_api_key() else "offline"


def new_run_id() -> str:
    """A W&B-style run id (8 lowercase alphanumerics), stored in checkpoints to resume the run."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def truncate_metrics(path: Path, max_step: int) -> None:
    """Drop rows written after `max_step` (a killed run logged past its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:  # a half-written last line from a kill
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    os.replace(tmp, path)


class RunLogger:
    """metrics.jsonl + samples/*.png + W&B (via `accelerator.init_trackers`), main process only."""

    def __init__(
        self,
        acc,
        run_dir: Path,
        *,
        mode: str,
        project: str,
        run_name: str,
        run_id: str,
        config: dict[str, Any],
    ) -> None:
        self.acc, self.run_dir, self.mode, self.run_id = acc, run_dir, mode, run_id
        self.main = acc.is_main_process
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb_dir: Path | None = None
        if mode != "disabled":
            import wandb

            acc.init_trackers(
                project,
                config=config,
                init_kwargs={
                    "wandb": {
                        "dir": str(run_dir),
                        "mode": mode,
                        "id": run_id,
                        "resume": "allow",
                        "name": run_name,
                        "settings": wandb.Settings(console="off", silent=True),
                    }
                },
            )
            if self.main:
                run = acc.get_tracker("wandb", unwrap=True)
                self.wandb_dir = Path(run.dir).parent if getattr(run, "dir", None) else None

    def log(self, row: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.mode != "disabled":
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def image(self, key: str, grid: Tensor, step: int, png: Path) -> None:
        """A [3, H, W] uint8 grid to `png` and to W&B under `key`."""
        if not self.main:
            return
        save_png(grid, png)
        if self.mode != "disabled":
            import wandb

            arr = grid.permute(1, 2, 0).contiguous().numpy()
            self.acc.log({key: wandb.Image(arr, caption=f"step {step}")}, step=step)

    def artifact(self, folder: Path, *, name: str, kind: str, metadata: dict) -> None:
        """Log a folder (e.g. the exported generator) as a W&B artifact (main process)."""
        if not self.main or self.mode == "disabled":
            return
        import wandb

        art = wandb.Artifact(name=name, type=kind, metadata=metadata)
        art.add_dir(str(folder))
        self.acc.get_tracker("wandb", unwrap=True).log_artifact(art)

    def summary(self, values: dict[str, Any]) -> None:
        if self.main and self.mode != "disabled":
            run = self.acc.get_tracker("wandb", unwrap=True)
            for k, v in values.items():
                run.summary[k] = v
