"""Atomic file writes and checked JSON reads, shared by every stage that writes artifacts.

A crash or Ctrl-C halfway through a write must never leave a truncated manifest or model
behind, so every write goes to a temporary file in the same directory (same filesystem, so
`os.replace` is atomic), is fsync'ed, and then replaces the target in one step.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ArtifactError, ArtifactWriteError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; create the parent directory if needed. Returns the path."""
    return atomic_write_files({path: data})[0]


def atomic_write_files(files: Mapping[str | os.PathLike, bytes]) -> list[Path]:
    """Write several files as one artifact: every file is staged (written and fsync'ed to a
    temporary name) before any target is replaced, so a failed write (a full disk, a crash while
    writing) leaves all previous files untouched. Targets are replaced in the given order; put the
    file that vouches for the others (the one holding their checksums) last."""
    staged: list[tuple[Path, str]] = []
    try:
        for target, data in files.items():
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            staged.append((path, _stage(path, data)))
        for path, tmp_name in staged:
            os.replace(tmp_name, path)
    except BaseException as exc:
        for _, tmp_name in staged:
            Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, ArtifactWriteError):
            failed = next((str(p) for p in map(Path, files) if p not in {s for s, _ in staged}), str(path))
            raise ArtifactWriteError(exc.errno, f"cannot write {failed} ({exc.strerror or exc}); the previous "
                                     "file(s) are unchanged. Free disk space or fix permissions and run again") from exc
        raise
    for directory in dict.fromkeys(path.parent for path, _ in staged):
        _fsync_directory(directory)
    return [path for path, _ in staged]


def _stage(path: Path, data: bytes) -> str:
    """Write `data` to a new temporary file beside `path`, fsync'ed; returns its name."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            _write_fully(tmp, data)
            tmp.flush()
            os.fsync(tmp.fileno())
        # mkstemp creates 0600 files; give the artifact the usual umask-based permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return tmp_name


def _write_fully(file, data: bytes) -> None:
    # One place that writes artifact bytes (the reliability tests make it fail part-way).
    file.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """The bytes h2t-edge writes for a JSON artifact: indented, newline-terminated UTF-8."""
    return (json.dumps(obj, indent=2) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON (keys in insertion order, trailing newline) atomically."""
    return atomic_write_bytes(path, json_bytes(obj))


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file; `what` names it in errors (e.g. "task sidecar").

    Raises ArtifactError naming the file when it is missing or is not valid JSON.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{what} {path} does not exist; check the path or re-create it") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {what} {path}: {exc}") from exc
    return parse_json(data, path, what)


def parse_json(data: bytes, path: str | os.PathLike, what: str) -> Any:
    """Parse the bytes of a JSON file read from `path` (ArtifactError naming it, as `read_json`)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"cannot read {what} {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "re-create it"
        ) from exc
    # Valid JSON that Python will not hold: numbers over int's digit limit, absurd nesting.
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"cannot parse {what} {path} ({type(exc).__name__}: {exc}); re-create it") from None


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; not possible on every platform (e.g. Windows), so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (identifies backbones, graphs and engines)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class FileLock:
    """An exclusive `flock` on `path` for as long as the `with` block runs (non-blocking by default).

    A second holder is refused at once with `error(message)` naming the lock, the process that
    holds it and `fix`, instead of two writers interleaving their output. The kernel drops the
    lock when its holder exits, even on SIGKILL, so a killed run never blocks the next one.

    wait=True: block until the holder lets go instead (short critical sections, e.g. a version record).
    """

    def __init__(self, path: str | os.PathLike, what: str, fix: str, error: type[Exception] = ArtifactError,
                 *, wait: bool = False):
        self.path, self.what, self.fix, self.error, self.wait = Path(path), what, fix, error, wait
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self.error(f"cannot open the lock {self.path} of {self.what} ({exc}); {self.fix}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise self.error(f"{self.what} is being written by {holder} (it holds the lock {self.path}); "
                             f"{self.fix}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode("ascii"))
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
