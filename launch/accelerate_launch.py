"""`accelerate launch` with the exit codes and the one-line errors that facegan documents.

    python launch/accelerate_launch.py [accelerate launch options] facegan_dist train ...

It is accelerate's own launcher (`accelerate.commands.launch`), run in this process, with two of
torchrun's agent behaviours changed (torch `distributed/elastic/agent/server/api.py`, `run`):

1. SIGTERM or SIGINT to the launcher (preemption, `kill`, Ctrl-C). torchrun's agent forwards it to
   its workers, waits 30 s (then SIGKILLs them) and re-raises it as `SignalException`, so plain
   `accelerate launch` exits 1 with a traceback although every rank checkpointed and exited 0.
   Here the agent is told to leave both signals alone (`--signals-to-handle`, read from
   PET_SIGNALS_TO_HANDLE; torch PR #160690) and this process forwards them to the training
   processes itself. They finish the step, checkpoint and exit 0; the agent sees its workers
   succeed and returns as after a complete run: exit 0, no traceback, no 30 s deadline.
2. A training process that fails. The agent logs it, raises `ChildFailedError`, and Python
   prints its traceback plus a failure report after the process's own `error:` line. Here the
   launcher exits with that process's exit code and adds nothing; only for a process killed by
   a signal (it could not say so itself) the agent's one log line stays: `failed (exitcode: -9)
   local_rank: 1 (pid: N)`. So does it before an elastic restart (`--max_restarts`).

A training process of torchrun runs in a session of its own, so a Ctrl-C in the terminal reaches
only the launcher, which forwards it. One that shares the launcher's process group (the 1-process
launcher) may have had the terminal's SIGINT already, and a second SIGINT means "abort now" to
`facegan train`: it gets SIGTERM instead, which means "checkpoint and stop" just the same.
A stop signal that comes before any training process exists ends the launcher (nothing to save).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _forward(signum: int, frame) -> None:
    """Pass a stop signal on to the training processes (this process's children)."""
    import psutil

    me = psutil.Process()
    children = me.children()
    if not children:  # still starting up: nothing to checkpoint, stop like a plain process
        signal.signal(signum, signal.SIG_DFL)
        os.kill(me.pid, signum)
        return
    for child in children:
        try:
            same_group = os.getpgid(child.pid) == os.getpgrp()
            child.send_signal(signal.SIGTERM if same_group else signum)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


class _QuietAgent(logging.Filter):
    """Drops the agent's lines that repeat what a failed process said itself: `failed
    (exitcode: N > 0) ...` and `Sending process N closing signal ...` (the others' shutdown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("failed (exitcode") and record.args:
            return not (isinstance(record.args[0], int) and record.args[0] > 0)
        return not msg.startswith("Sending process")


def _exit_code(exc) -> int:
    """A failed run's exit code: the first failed process's, 128 + N for one killed by signal N
    (the shell's convention)."""
    _rank, failure = exc.get_first_failure()
    return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun's agent keeps SIGHUP/SIGQUIT (terminal gone, core dump); the stop signals are ours
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietAgent())
    for sig in STOP_SIGNALS:
        signal.signal(sig, _forward)
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:  # torchrun (several processes)
        return _exit_code(exc)
    except subprocess.CalledProcessError as exc:  # the 1-process launcher; the child spoke
        return exc.returncode if exc.returncode > 0 else 128 - exc.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
