"""Logging: W&B (wandb called directly, on the main process), mirrored to the run folder.

Every scalar row goes to `RUN_DIR/metrics.jsonl` (one JSON object per log interval) and to W&B;
every image goes to `RUN_DIR/samples/*.png` and to W&B. Only the main process writes or talks to
W&B; callers reduce statistics on all ranks *before* calling in here.

Why wandb directly and not Accelerate's tracker: the logger needs the run itself (`define_metric`
for our step axis, `summary`, `log_artifact`, `finish(exit_code=1)` on failure) and must drop W&B
when it breaks; through `accelerator.init_trackers` that meant reaching into the tracker for the
raw run and editing `accelerator.trackers` by hand. Accelerate's tracker adds nothing here but a
main-process guard, which `RunLogger` has anyway. So the Accelerator is built without `log_with`,
and `RunLogger.finish` (not `accelerator.end_training`) closes the run.

W&B must never stop a training run (docs/RELIABILITY.md):
- when an online run cannot start (no network, a firewall, a bad key; wandb gives up after
  `WANDB_INIT_TIMEOUT` seconds, 90 by default), the logger prints one `warning:` line and logs
  offline under the same run id, to upload later with `wandb sync`;
- when W&B fails during the run (e.g. its service process was killed: SLURM signals every
  process of a job at preemption), the logger prints one `warning:` line and goes on without
  W&B; metrics.jsonl and samples/ stay complete.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from facegan_dist.images import save_png
from facegan_dist.paths import atomic_write_text


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
    """A W&B run id (8 base-36 characters), stored in checkpoints to resume the run. wandb's own
    generator: `wandb.util.generate_id` moved to `wandb.sdk.lib.runid` (wandb/wandb#4676)."""
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


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
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


class RunLogger:
    """metrics.jsonl + samples/*.png + W&B (`wandb.init` with `run_id`), main process only."""

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
        self.run_dir, self.mode, self.run_id = run_dir, mode, run_id
        self.main = acc.is_main_process
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb_dir: Path | None = None
        self.run = None  # the wandb Run while W&B works (main process)
        if not self.main:
            self.mode = "disabled"  # only the main process talks to W&B: no collective involved
            return
        warning = None
        if mode != "disabled":
            try:
                self.run = _start_wandb(run_dir, mode, project, run_name, run_id, config)
            except Exception as exc:  # any failure to start W&B: training goes on regardless
                self._drop_wandb()
                warning = f"W&B {mode} run {run_id} could not start ({_one_line(exc)}); "
                self.mode = "offline" if mode == "online" else "disabled"
                if self.mode == "offline":
                    try:
                        self.run = _start_wandb(
                            run_dir, "offline", project, run_name, run_id, config
                        )
                    except Exception as exc2:
                        self._drop_wandb()
                        self.mode = "disabled"
                        warning += f"offline neither ({_one_line(exc2)}); "
        if self.run is not None:
            self.wandb_dir = Path(self.run.dir).parent if self.run.dir else None
        if warning is not None:
            if self.mode == "offline":
                warning += f"logging offline instead (upload it later: wandb sync {self.wandb_dir})"
            else:
                warning += "training goes on, logging to metrics.jsonl and samples/ only"
            print(f"warning: {warning}", file=sys.stderr, flush=True)

    def _drop_wandb(self, service_gone: bool = True) -> None:
        """Forget a broken W&B run: wandb's service holds the run id ("run ID ... is in use") and
        an exit hook that fails with a traceback when the service died."""
        import wandb

        self.run = None
        self.mode = "disabled"
        if service_gone:
            try:
                wandb.teardown()
            except Exception:
                pass

    def _wandb(self, call) -> None:
        """Run a W&B call with the run (main process); the first failure turns W&B off for the
        rest of the run with one warning line: logging must not stop training."""
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as exc:
            # a dead service (ConnectionResetError) is torn down; a live one (e.g. online and
            # uploading) is left alone: tearing it down would wait for the uploads
            self._drop_wandb(service_gone=isinstance(exc, OSError))
            print(
                f"warning: W&B stopped working ({type(exc).__name__}: {_one_line(exc)}); "
                f"training goes on, logging to {self.metrics_path.name} and samples/ only",
                file=sys.stderr,
                flush=True,
            )

    def log(self, row: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._wandb(lambda run: run.log({**row, "step": step}))

    def image(self, key: str, grid: Tensor, step: int, png: Path) -> None:
        """A [3, H, W] uint8 grid to `png` and to W&B under `key`."""
        if not self.main:
            return
        save_png(grid, png)

        def log_image(run) -> None:
            import wandb

            arr = grid.permute(1, 2, 0).contiguous().numpy()
            run.log({key: wandb.Image(arr, caption=f"step {step}"), "step": step})

        self._wandb(log_image)

    def artifact(self, folder: Path, *, name: str, kind: str, metadata: dict) -> None:
        """Log a folder (e.g. the exported generator) as a W&B artifact (main process)."""

        def log_artifact(run) -> None:
            import wandb

            art = wandb.Artifact(name=name, type=kind, metadata=metadata)
            art.add_dir(str(folder))
            run.log_artifact(art)

        self._wandb(log_artifact)

    def summary(self, values: dict[str, Any]) -> None:
        def set_summary(run) -> None:
            for k, v in values.items():
                run.summary[k] = v

        self._wandb(set_summary)

    def finish(self, exit_code: int | None = None) -> None:
        """Close the W&B run (every process may call it; a no-op without a run)."""
        self._wandb(lambda run: run.finish(exit_code=exit_code))
        self.run = None

    @contextlib.contextmanager
    def finish_on_error(self) -> Iterator[None]:
        """If the run fails (an error, not a stop signal), close the W&B run as failed (exit code
        1, the error in its summary) before the error propagates: the offline run is complete
        for `wandb sync` and shows why it ended, instead of being cut off at process exit."""
        try:
            yield
        except Exception as exc:
            self.summary({"error": _one_line(exc)})
            self.finish(exit_code=1)
            raise


def _start_wandb(run_dir: Path, mode: str, project: str, name: str, run_id: str, config: dict):
    """A W&B run under `run_id` (resumed if it exists), charted against our step."""
    import wandb

    run = wandb.init(
        project=project,
        name=name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        settings=wandb.Settings(console="off", silent=True),
    )
    # a resumed run may change values (e.g. --max-steps): allowed, as the config is the new run's
    run.config.update(config, allow_val_change=True)
    # Charts use OUR step as x axis, not W&B's internal `_step` counter: after a rollback (or a
    # resume) the same steps are logged again, and W&B drops rows whose explicit `step=` is
    # below its current one.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
