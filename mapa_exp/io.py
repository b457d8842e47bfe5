"""File I/O that never leaves a half-written file: atomic writes, locked array caches with checksums.

Every file the framework writes goes to a temporary name in the same folder, is flushed to disk
and renamed over the target, so a killed process leaves either the old file or the new one.
Caches hold only numpy arrays (``.npz``, loaded with ``allow_pickle=False``) and a SHA-256 of
the file beside them; a truncated or corrupted entry is detected, reported and rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock

from mapa_exp.errors import ConfigError

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: 0644 under umask 022, readable by collaborators


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path`` (mode as open() gives)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def progress(iterable, desc: str, every_s: float = 10.0):
    """``iterable`` with a progress bar and ETA on stderr when it is a terminal; elsewhere (a log, a pipe) a log
    line ``desc: k/N done, t s`` every ``every_s`` seconds, so that a long step is never silent."""
    import sys

    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, file=sys.stderr, leave=False, mininterval=0.5)
    return _logged(iterable, desc, every_s)


def _logged(iterable, desc: str, every_s: float):
    import time

    log = logging.getLogger("mapa_exp.progress")
    total = len(iterable) if hasattr(iterable, "__len__") else None
    start = last = time.monotonic()
    for k, item in enumerate(iterable):
        now = time.monotonic()
        if now - last >= every_s:
            log.info("%s: %d%s done, %.0f s", desc, k, f"/{total}" if total is not None else "", now - start)
            last = now
        yield item


CODE_PATHS = ("mapa_exp", "conf", "hydra_plugins", "train.py", "evaluate.py")  # what computes a number


@functools.lru_cache(maxsize=None)
def code_version() -> dict:
    """The framework's code as a run records it: ``{"code_commit": <git HEAD or None>, "code_dirty": <uncommitted
    changes to the code (CODE_PATHS), or None>}``; both None outside a git checkout (a non-editable install)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0 or not (root / "mapa_exp").is_dir():
            return {"code_commit": None, "code_dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                 *CODE_PATHS], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"code_commit": None, "code_dirty": None}
    return {"code_commit": head.stdout.strip(),
            "code_dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def content_key(*parts) -> str:
    """A short hex key for cache entries, from arrays (their bytes, dtype and shape) and JSON-able values."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


class ArrayCache:
    """Named ``.npz`` entries under ``root/kind/key.npz`` with a checksum file, built under a file lock.

    ``load_or_build`` returns ``(arrays, hit)``. Concurrent builders of one key serialise on the lock:
    the first builds and renames a complete file into place, the others then load it.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.npz"

    def load_or_build(
        self, kind: str, key: str, build: Callable[[], dict[str, np.ndarray]]
    ) -> tuple[dict[str, np.ndarray], bool]:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            for stale in path.parent.glob(f".{path.stem}.*.tmp"):  # left by a builder killed mid-write
                stale.unlink(missing_ok=True)
            arrays = self._load_verified(path)
            if arrays is not None:
                log.info("cache hit: %s/%s", kind, key)
                return arrays, True
            log.info("cache miss: %s/%s, building", kind, key)
            arrays = {k: np.asarray(v) for k, v in build().items()}
            for k, a in arrays.items():  # .npz of object arrays would be pickles: refuse them
                if a.dtype.hasobject:
                    raise ValueError(f"cache entry {kind}/{key}: array {k!r} has dtype object; "
                                     "only numeric arrays are cached")
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            data = buf.getvalue()
            atomic_write_bytes(path, data)
            atomic_write_text(path.with_suffix(".sha256"), sha256_bytes(data) + "\n")
            return arrays, False

    @staticmethod
    def _load_verified(path: Path) -> dict[str, np.ndarray] | None:
        sums = path.with_suffix(".sha256")
        if not path.exists():
            return None
        try:
            data = path.read_bytes()
            expected = sums.read_text().strip() if sums.exists() else None
            if expected != sha256_bytes(data):
                raise ValueError("checksum mismatch" if expected else "checksum file missing")
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as exc:  # corrupt, truncated or unreadable: rebuild
            log.warning("cache entry %s is invalid (%s); rebuilding it", path, exc)
            return None


class FolderLock:
    """An exclusive, non-blocking lock on folders while this process writes them: ``fcntl.flock`` on the folder
    itself, held until ``release`` (or the process ends: the kernel drops it, so a killed writer never leaves a
    stale lock). While held, ``<folder>/.lock`` says who holds it (pid, host, since when); it is removed on
    release, so a finished folder holds nothing extra.

    ``acquire`` takes every folder's lock or none: a folder another process holds raises ``FolderBusyError`` (a
    ``ConfigError`` naming ``key``, the folder and the holder) before anything is written. Within one process the
    lock is re-entrant (the command-line check takes a pinned run folder's lock; training takes it again). Where
    the file system cannot lock (some network mounts) it warns once and goes on unlocked."""

    NAME = ".lock"
    _held: dict[Path, list] = {}  # folder -> [fd, count]: this process's locks

    def __init__(self, folders, key: str, doing: str = "written"):
        self.folders = [Path(f).expanduser().resolve() for f in folders]
        self.key, self.doing, self._mine = key, doing, []

    def acquire(self) -> "FolderLock":
        import datetime
        import fcntl
        import socket

        for folder in self.folders:
            if folder in self._held:
                self._held[folder][1] += 1
                self._mine.append(folder)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.release()
                raise FolderBusyError(self.key, str(folder), f"is being {self.doing} by {_holder_text(folder)}; "
                                      "wait for it to end or use another folder") from None
            except OSError as exc:  # no locks on this file system
                log.warning("cannot lock %s (%s); going on without a lock", folder, exc.strerror or exc)
            since = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
            atomic_write_text(folder / self.NAME, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
            self._held[folder] = [fd, 1]
            self._mine.append(folder)
        return self

    @classmethod
    def holder(cls, folder) -> str | None:
        """Who else holds ``folder``'s lock now, or None when no other process does (asked without waiting)."""
        import fcntl

        folder = Path(folder).expanduser().resolve()
        if folder in cls._held or not folder.is_dir():
            return None
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return _holder_text(folder)
        except OSError:
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        import fcntl

        for folder in reversed(self._mine):
            entry = self._held.get(folder)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                del self._held[folder]
                try:
                    (folder / self.NAME).unlink(missing_ok=True)
                    fcntl.flock(entry[0], fcntl.LOCK_UN)
                except OSError:
                    pass
                finally:
                    os.close(entry[0])
        self._mine = []

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_text(folder: Path) -> str:
    try:
        return (folder / FolderLock.NAME).read_text().strip() or "another process"
    except OSError:
        return "another process"


class FolderBusyError(ConfigError):
    """A folder another process is writing: bad input (exit 2), and the folder is not this process's to remove."""
