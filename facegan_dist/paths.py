"""Output files: checked before any work, and written atomically.

A leaf module (imports only `errors`), the one place that knows how a file is written safely:
- every command that writes a folder or a file calls `out_dir` / `out_file` at the start, with the
  flag the user typed, before it trains, samples or shards anything, so a bad `--out` is one line,
  not a traceback later;
- every small file is written through `atomic_path` / `atomic_write_text` (temp name + rename), so
  readers never see half a file and a failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from facegan_dist.errors import ConfigError


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _check_dir(path: Path, flag: str) -> Path:
    """Create folder `path` (and its parents) and check its permission bits."""
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


def _try_create(path: Path, tmp: Path, flag: str) -> None:
    try:
        with open(tmp, "ab"):
            pass
        tmp.unlink()
    except OSError as exc:
        where = "there" if tmp.parent == path else f"in {tmp.parent}"
        raise ConfigError(f"{flag} {path}: cannot create files {where} ({exc.strerror})") from None


def out_dir(path: Path, flag: str) -> Path:
    """Create folder `path` (and its parents) and prove that files can be created in it: create
    and remove a probe file, so that a folder that looks writable but is not (/proc, a read-only
    mount seen as root) is caught too.

    Raises ConfigError naming `flag` and the path when it is a file, lies under a file, or cannot
    be created or written (read-only filesystem, /proc, no permission). Nothing is left behind.
    """
    path = _check_dir(Path(path), flag)
    _try_create(path, path / f".facegan-{os.getpid()}.probe.tmp", flag)
    return path


def out_file(path: Path, flag: str) -> Path:
    """Check that file `path` can be written: not a folder, its folder can be created and
    written, and a probe file beside it can be created and removed (see `out_dir`). Errors name
    the file the user typed. The file itself is not created."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder, not a file")
    try:
        _check_dir(path.parent, flag)
    except ConfigError as exc:  # the check names the folder; the user typed the file
        why = str(exc).removeprefix(f"{flag} ")
        raise ConfigError(f"{flag} {path}: cannot be written ({why})") from None
    _try_create(path, path.with_name(f".{path.name}.{os.getpid()}.probe.tmp"), flag)
    return path


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temp name + rename (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
