"""Cache integrity: corrupt entries are detected by checksum and rebuilt; concurrent builders build once.

``mapa_exp.io.ArrayCache`` is what every proximity structure and ground-truth surrogate goes through.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from mapa_exp.io import ArrayCache

KIND, KEY = "proximity", "0123abcd"


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"idx": rng.integers(0, 100, (50, 20)), "dist": rng.random((50, 20)).astype(np.float32)}


class CountingBuild:
    """A build function that records each call in a file (one line per build) and can take its time."""

    def __init__(self, log: Path, seconds: float = 0.0):
        self.log, self.seconds = log, seconds

    def __call__(self) -> dict[str, np.ndarray]:
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(self.seconds)
        return arrays()

    def calls(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_second_load_is_a_hit(tmp_path):
    cache, build = ArrayCache(tmp_path), CountingBuild(tmp_path / "builds.log")
    first, hit1 = cache.load_or_build(KIND, KEY, build)
    second, hit2 = cache.load_or_build(KIND, KEY, build)
    assert (hit1, hit2, build.calls()) == (False, True, 1)
    assert_same(first, second)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the array data: np.load alone would not notice
    path.write_bytes(bytes(data))


def _drop_checksum(path: Path) -> None:
    path.with_suffix(".sha256").unlink()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("corrupt", [_truncate, _flip_one_bit, _drop_checksum, _empty],
                         ids=["truncated", "bit-flipped", "checksum-missing", "empty"])
def test_corrupt_entry_is_detected_and_rebuilt_with_a_warning(corrupt, tmp_path, caplog):
    cache, build = ArrayCache(tmp_path), CountingBuild(tmp_path / "builds.log")
    good, _ = cache.load_or_build(KIND, KEY, build)
    corrupt(cache.path(KIND, KEY))
    caplog.set_level(logging.WARNING, logger="mapa_exp.io")
    again, hit = cache.load_or_build(KIND, KEY, build)
    assert hit is False and build.calls() == 2
    assert_same(good, again)
    assert any("invalid" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    # the rebuilt entry verifies again
    assert cache.load_or_build(KIND, KEY, build)[1] is True


def _build_in_process(root: str, log: str, seconds: float, out: str) -> None:
    got, hit = ArrayCache(root).load_or_build(KIND, KEY, CountingBuild(Path(log), seconds))
    np.savez(out, hit=np.array(hit), **got)


def test_two_processes_building_one_key_build_it_once(tmp_path):
    ctx = mp.get_context("fork")
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_build_in_process,
                         args=(str(tmp_path / "cache"), str(log), 1.0, str(tmp_path / f"out{i}.npz")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert CountingBuild(log).calls() == 1  # the second waited on the lock, then loaded the first's file
    outs = [dict(np.load(tmp_path / f"out{i}.npz")) for i in range(2)]
    assert sorted(bool(o.pop("hit")) for o in outs) == [False, True]
    assert_same(outs[0], outs[1])
    assert_same(outs[0], arrays())
    entry = ArrayCache(tmp_path / "cache").path(KIND, KEY)
    left = sorted(p.name for p in entry.parent.iterdir() if not p.name.endswith(".lock"))
    assert left == [f"{KEY}.npz", f"{KEY}.sha256"]  # one complete entry, no temporary files
    assert ArrayCache(tmp_path / "cache").load_or_build(KIND, KEY, CountingBuild(log))[1] is True


def test_builder_killed_mid_build_leaves_no_partial_entry(tmp_path):
    """SIGKILL a builder while it holds the lock: the OS frees the lock and the next builder succeeds."""
    ctx = mp.get_context("fork")
    log, root = tmp_path / "builds.log", tmp_path / "cache"
    victim = ctx.Process(target=_build_in_process, args=(str(root), str(log), 60.0, str(tmp_path / "never.npz")))
    victim.start()
    deadline = time.monotonic() + 20
    while CountingBuild(log).calls() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    assert victim.exitcode == -signal.SIGKILL
    cache = ArrayCache(root)
    assert not cache.path(KIND, KEY).exists()
    got, hit = cache.load_or_build(KIND, KEY, CountingBuild(log))
    assert hit is False and CountingBuild(log).calls() == 2
    assert_same(got, arrays())


def test_stale_temporary_files_are_cleaned_up(tmp_path):
    cache = ArrayCache(tmp_path)
    path = cache.path(KIND, KEY)
    path.parent.mkdir(parents=True)
    stale = path.parent / f".{KEY}.npz.abc123.tmp"
    stale.write_bytes(b"half a file")
    cache.load_or_build(KIND, KEY, arrays)
    assert not stale.exists()


def test_cache_entries_hold_no_pickles(tmp_path):
    """Entries are plain .npz; an object array cannot be stored, and loading never unpickles."""
    cache = ArrayCache(tmp_path)
    with pytest.raises(ValueError):
        cache.load_or_build(KIND, "objects", lambda: {"a": np.array([{"x": 1}], dtype=object)})
    assert not cache.path(KIND, "objects").exists()


def test_a_long_step_says_where_it_is_in_a_log(monkeypatch, caplog):
    """Without a terminal (a log file, a pipe) ``progress`` yields every item unchanged and logs ``k/N done`` once
    ``every_s`` seconds have passed since its last line (a clock stepped by hand: 0, then 1, 11, 12, 25 s)."""
    from mapa_exp.io import progress

    ticks = iter([0.0, 1.0, 11.0, 12.0, 25.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(ticks))
    with caplog.at_level(logging.INFO, logger="mapa_exp.progress"):
        items = list(progress(["a", "b", "c", "d"], "fitting", every_s=10.0))
    assert items == ["a", "b", "c", "d"]
    assert [r.getMessage() for r in caplog.records] == ["fitting: 1/4 done, 11 s", "fitting: 3/4 done, 25 s"]
