"""Shards wherever they live: a `--data` URL prefix, opened with webdataset's URL handling.

`--data` is a local folder or one of
    https://host/celeba64/   http://...   gs://bucket/celeba64/   hf://datasets/user/repo/celeba64/
    s3://bucket/celeba64/    file:///abs/folder/
    pipe:COMMAND             a shell command that writes the file {name} to stdout, e.g.
                             "pipe:aws s3 cp s3://bucket/celeba64/{name} -"
A prefix names the folder that holds manifest.json and the shards; each file's URL is the prefix
plus the file name from the manifest (checked there: no path separators, so a manifest cannot
name a file outside its folder). This module only opens and fetches; reading the tars stays in
`stream.py`, with the same tar reader as for local shards.

Why webdataset's `gopen`: it is the library's URL convention (what `wds.WebDataset(url)` opens),
and it already knows every scheme above but s3: `http(s)`/`hf` run `curl -f -s -L` (hf with the
Hugging Face token), `gs` runs `gsutil cat`, `pipe:` runs the command, `file:` opens the file. We
add no HTTP client and no dependency. `s3://` becomes the webdataset docs' route, a `pipe:` through
`aws s3 cp URL -` (the aws CLI does credentials, regions and endpoints; s3fs is not installed).

Faults. gopen gives a stream and, for a command, its exit status. A transfer fails when
    - the command exits non-zero: for curl, exit 7 = connection refused (server down),
      22 = an HTTP status >= 400 such as 404, 18 = the transfer was cut mid-file, ...;
    - no byte arrives for `timeout_s` seconds (a stalled server; curl itself has no read timeout);
    - the tar stream is malformed (what a cut can also look like).
Each failure is retried `retries` times with exponential backoff (`backoff_s` * 2**k), then
becomes one DataError line naming the URL and the cause. (curl retries 408/429/5xx and its own
timeouts inside one attempt: gopen passes `--retry 30`.) A retried shard read resumes at the sample
it stopped at, so retries never change what the reader yields.

The shard cache (`--cache-dir DIR`, `Remote.cached`). Each shard is downloaded once per machine
into DIR/<sha256[:16]>-<name> (keyed by content, so the same shards under another URL reuse it and
two datasets never collide), then read by the local reader (random access, an index of its tar
headers). A download goes to a temporary name (O_EXCL, unique per process), is hashed while it is
written, and is renamed into place only when its sha256 is the manifest's; a mismatch is retried
like a cut transfer and then refused ("sha256 mismatch"), and the bad bytes are deleted. Ranks and
loader workers of one machine share DIR: a lock file per shard (DIR/.locks/, fcntl.flock) makes
one of them download while the others wait and then reuse its file. A cached file is hashed once
per process before its first use; one that no longer matches is deleted and downloaded again.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import select
import shlex
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

URL_SCHEMES = ("http", "https", "pipe", "gs", "s3", "hf", "file", "ais", "sftp", "ftps", "scp")
_CURL_SCHEMES = ("http", "https", "hf", "sftp", "ftps", "scp")
_CURL_EXIT = {  # curl's exit statuses (man curl, EXIT CODES) as a cause for the one-line error
    6: "cannot resolve the host",
    7: "connection refused (the server is down or refuses connections)",
    18: "the transfer was cut mid-file (partial transfer)",
    22: "the server answered with an HTTP error status >= 400 (e.g. 404 Not Found)",
    28: "timed out",
    35: "TLS handshake failed",
    52: "the server sent no reply",
    55: "failed sending data",
    56: "the connection was reset while receiving data",
}
_READ = 1 << 20  # bytes per read from a transfer
_LOCKS = ".locks"  # per-shard lock files inside a --cache-dir
_hashed: dict[str, tuple[int, int]] = {}  # cached file -> (size, mtime_ns) hashed by this process


def is_url(spec: object) -> bool:
    """True for a `--data` that names a URL (a scheme gopen opens, or s3), not a local path."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", str(spec))
    return bool(m) and m.group(1).lower() in URL_SCHEMES


def check_retry_policy(retries: int, timeout_s: float) -> None:
    """--data-retries and --data-timeout (train's options and the other commands'): one line."""
    from facegan_dist.errors import ConfigError

    if retries < 0:
        raise ConfigError(f"--data-retries {retries} must be at least 0")
    if not timeout_s > 0:
        raise ConfigError(f"--data-timeout {timeout_s:g} must be above 0 seconds")


def locate(
    data: Path | str,
    cache_dir: Path | None = None,
    *,
    retries: int = 3,
    timeout_s: float = 30.0,
) -> Path | Remote:
    """A `--data` as the readers take it: a local folder (a Path), or a `Remote` for a URL, with
    its retry policy (checked here, one line naming the flag) and shard cache. The --cache-dir
    folder is created and checked first (one line naming it); --cache-dir with a local folder is
    refused (it is read in place)."""
    from facegan_dist.errors import ConfigError

    check_retry_policy(retries, timeout_s)
    if not is_url(data):
        if cache_dir is not None:
            raise ConfigError(
                f"--cache-dir caches the shards of a URL --data; --data {data} is a local "
                "folder (read in place): drop --cache-dir"
            )
        return Path(data)
    if cache_dir is not None:
        from facegan_dist.paths import out_dir

        cache_dir = out_dir(Path(cache_dir), "--cache-dir")
    return Remote(str(data), retries=retries, timeout_s=timeout_s, cache_dir=cache_dir)


class TransferError(Exception):
    """One failed attempt to transfer a file (retried); `cause` says why, in a few words."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass(frozen=True)
class Remote:
    """A shard folder at a URL prefix or behind a `pipe:` command (see the module docstring),
    with the retry policy of its transfers."""

    spec: str
    retries: int = 3
    timeout_s: float = 30.0
    backoff_s: float = 0.5
    cache_dir: Path | None = None  # --cache-dir: shards are downloaded here once (`cached`)

    def __post_init__(self) -> None:
        if not is_url(self.spec):
            raise ValueError(f"{self.spec!r} is not a URL")
        if self.scheme == "pipe" and "{name}" not in self.spec:
            from facegan_dist.errors import ConfigError

            raise ConfigError(
                f"--data {self.spec}: a pipe: command needs {{name}} where the file name goes, "
                "e.g. 'pipe:aws s3 cp s3://bucket/shards/{name} -'"
            )

    @property
    def scheme(self) -> str:
        return self.spec.split(":", 1)[0].lower()

    def __str__(self) -> str:
        return self.spec

    def where(self, name: str) -> str:
        """The file's URL as messages name it (the s3 URL rather than its aws command)."""
        if self.scheme == "pipe":
            return self.spec.replace("{name}", name)
        return self.spec.rstrip("/") + "/" + name

    def url(self, name: str) -> str:
        """What gopen opens for the file `name` of this folder."""
        if self.scheme == "pipe":
            return self.spec.replace("{name}", shlex.quote(name))
        if self.scheme == "s3":
            # exec: the shell becomes aws, so that closing a transfer (a stall, or enough read)
            # kills aws itself; a killed shell would leave it running, orphaned
            return f"pipe:exec aws s3 cp {shlex.quote(self.where(name))} -"
        if self.scheme in ("http", "https"):
            return self.spec.rstrip("/") + "/" + urllib.parse.quote(name)
        return self.where(name)

    def open(self, name: str) -> RemoteReader:
        """One attempt: the file's bytes as a stream (raises TransferError)."""
        return RemoteReader(self.url(name), self.timeout_s, curl=self.scheme in _CURL_SCHEMES)

    def attempts(self):
        """Yields the attempt number 0..retries, sleeping the backoff before each retry."""
        for k in range(self.retries + 1):
            if k:
                time.sleep(self.backoff_s * 2 ** (k - 1))
            yield k

    def failed(self, name: str, err: TransferError) -> str:
        """The one line for a transfer that failed every attempt."""
        tries = f", {self.retries + 1} attempts" if self.retries else ""
        return f"{self.where(name)}: {err.cause}{tries}"

    def fetch(self, name: str) -> bytes:
        """The whole file (manifest.json), retried; DataError after the last attempt."""
        from facegan_dist.errors import DataError

        err = TransferError("not tried")
        for _ in self.attempts():
            try:
                with self.open(name) as f:
                    return f.read()
            except TransferError as e:
                err = e
        raise DataError(self.failed(name, err))

    def download(self, name: str, dest: Path) -> None:
        """The file into `dest` (a temporary name beside it, renamed when complete), retried."""
        from facegan_dist.errors import DataError

        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        err = TransferError("not tried")
        try:
            for _ in self.attempts():
                try:
                    with self.open(name) as f, open(tmp, "wb") as out:
                        while block := f.read(_READ):
                            out.write(block)
                    os.replace(tmp, dest)
                    return
                except TransferError as e:
                    err = e
        finally:
            tmp.unlink(missing_ok=True)
        raise DataError(self.failed(name, err))

    def cached(self, name: str, sha256: str | None) -> Path:
        """The shard `name` as a verified local file in `cache_dir` (module docstring): reused
        when its sha256 is `sha256`, else downloaded (retried) and checked; DataError naming the
        URL and the cause after the last attempt (a mismatch: "sha256 mismatch")."""
        from facegan_dist.errors import DataError

        if not sha256:
            raise DataError(
                f"{self.where('manifest.json')} gives no sha256 for {name}: --cache-dir checks "
                "each shard against it (write the shards with `facegan shard`)"
            )
        dest = Path(self.cache_dir) / f"{sha256[:16]}-{name}"
        if self._known_good(dest):
            return dest
        try:
            (dest.parent / _LOCKS).mkdir(parents=True, exist_ok=True)
            with _locked(dest.parent / _LOCKS / f"{dest.name}.lock"):
                if dest.is_file():
                    if sha256_file(dest) == sha256:
                        return self._mark_good(dest)
                    dest.unlink()  # damaged in the cache: never used, downloaded again
                err = TransferError("not tried")
                for _ in self.attempts():
                    try:
                        self._download_checked(name, dest, sha256)
                        return self._mark_good(dest)
                    except TransferError as e:
                        err = e
        except OSError as e:
            where = f"--cache-dir {self.cache_dir}"
            raise DataError(f"{where}: cannot write {dest.name} ({e})") from None
        raise DataError(self.failed(name, err))

    def _download_checked(self, name: str, dest: Path, sha256: str) -> None:
        """One attempt: `name` into a unique temporary file beside `dest`, hashed as it is
        written, renamed to `dest` only if the hash is `sha256` (else deleted: TransferError)."""
        fd = -1
        for k in range(100):  # O_EXCL: this process's own temporary name
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{k}.part")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                continue
        if fd < 0:
            raise OSError(f"no free temporary name beside {dest}")
        try:
            h = hashlib.sha256()
            # the descriptor's owner first: an open that fails must not leak it
            with os.fdopen(fd, "wb") as out, self.open(name) as f:
                while block := f.read(_READ):
                    h.update(block)
                    out.write(block)
            got = h.hexdigest()
            if got != sha256:
                raise TransferError(
                    f"sha256 mismatch (downloaded {got[:12]}..., manifest {sha256[:12]}...)"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _known_good(path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return _hashed.get(str(path)) == (st.st_size, st.st_mtime_ns)

    @staticmethod
    def _mark_good(path: Path) -> Path:
        st = path.stat()
        _hashed[str(path)] = (st.st_size, st.st_mtime_ns)
        return path


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of a file, read in blocks (the manifest's shard checksum)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if absent) for the block: one process of the
    machine at a time. The lock files stay (removing one would race with its next holder)."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class RemoteReader:
    """A file-like reader over what `webdataset.gopen` opened, with a read timeout and the
    command's exit status checked at the end of the data (both raise TransferError).

    gopen returns a `Pipe` (a command's stdout) for every scheme but file:. Its reads block
    without limit, so this reader waits on the pipe's descriptor with select() and reads it
    directly (the Pipe's own buffer is never used, so nothing is read twice)."""

    def __init__(self, url: str, timeout_s: float, curl: bool = False) -> None:
        from webdataset.gopen import Pipe, gopen

        self.url, self.timeout_s, self.curl = url, timeout_s, curl
        try:
            self.f = gopen(url, "rb")
        except (OSError, ValueError) as e:
            raise TransferError(f"cannot open ({e})") from None
        self.pipe = self.f if isinstance(self.f, Pipe) else None
        self._fd = self.pipe.stream.fileno() if self.pipe is not None else -1

    def read(self, n: int = -1) -> bytes:
        if self.pipe is None:
            try:
                return self.f.read(n)
            except OSError as e:
                raise TransferError(f"read failed ({e})") from None
        if n is None or n < 0:
            parts = []
            while block := self.read(_READ):
                parts.append(block)
            return b"".join(parts)
        ready, _, _ = select.select([self._fd], [], [], self.timeout_s)
        if not ready:
            raise TransferError(f"stalled: no data for {self.timeout_s:g} s (read timeout)")
        data = os.read(self._fd, n)
        if not data:
            self._check_exit()
        return data

    def _check_exit(self) -> None:
        proc = self.pipe.proc
        try:
            status = proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            raise TransferError(
                f"stalled: the transfer did not end within {self.timeout_s:g} s"
            ) from None
        if status not in self.pipe.ignore_status:
            cause = _CURL_EXIT.get(status) if self.curl else None
            what = "curl" if self.curl else "the command"
            raise TransferError(f"{cause or 'failed'} ({what} exit {status})")

    def close(self) -> None:
        if self.pipe is None:
            self.f.close()
            return
        proc = self.pipe.proc
        if proc.poll() is None:  # stopped early (enough samples, or a fault): end the transfer
            proc.kill()
        self.pipe.stream.close()  # the Pipe's own close() would raise on the kill's status
        proc.wait()

    def buffered(self, size: int = _READ) -> io.BufferedReader:
        """This reader behind an `io.BufferedReader` of `size` bytes: tarfile's small reads
        (a 512-byte header, a 5 KB image) are served from memory, one syscall per `size`
        (about 20 % less time per tar member than reading the pipe directly). Closing it leaves
        the transfer to `close()`."""
        return io.BufferedReader(_RawView(self), size)

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RawView(io.RawIOBase):
    """`RemoteReader.read` as the raw stream an `io.BufferedReader` reads from."""

    def __init__(self, reader: RemoteReader) -> None:
        super().__init__()
        self._reader = reader

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self._reader.read(len(buf))
        buf[: len(data)] = data
        return len(data)
