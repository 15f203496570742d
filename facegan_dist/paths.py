"""Output paths checked before any work, so a bad `--out` is one line, not a traceback later.

A leaf module (imports only `errors`): every command that writes a folder or a file calls one of
these at the start, with the flag the user typed, before it trains, samples or shards anything.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from facegan_dist.errors import ConfigError


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def out_dir(path: Path, flag: str) -> Path:
    """Create folder `path` (and its parents) and check that files can be created in it.

    Raises ConfigError naming `flag` and the path when it is a file, lies under a file, or cannot
    be created or written (read-only filesystem, /proc, no permission). Nothing is left behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot create the folder ({_reason(exc)})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder is not writable")
    return path


def out_file(path: Path, flag: str) -> Path:
    """Check that file `path` can be written: not a folder, and its folder can be created and
    written (see `out_dir`). The file itself is not created."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder, not a file")
    out_dir(path.parent, flag)
    return path
