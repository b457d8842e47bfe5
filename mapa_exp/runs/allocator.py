"""glibc's allocator, told to keep the memory a training step frees for the next step.

A step allocates and frees the same activation and gradient buffers again and again (a stacked IWAE step at
S = 100 makes ~100 tensors of 0.5-2 MB). With glibc's defaults a block above the mmap threshold (128 KiB,
raised on the fly up to 32 MiB) is mapped fresh and unmapped on free, and the top of the heap is returned
to the kernel once 128 KiB of it is free: every new page then costs a page fault and a page of zeroing.
Measured on stacked IWAE epochs (25 members, S = 10-100): 23,000-390,000 minor faults an epoch with the
defaults, 0-550 with the settings below, x1.25-1.6 faster with 32768-row chunks (``docs/benchmarks.md``,
``scripts/bench_allocator.py``).

``keep_freed_memory(mmap_threshold, trim_threshold, top_pad)`` calls ``mallopt`` once for the process
(the ``malloc`` node of ``conf/train.yaml``); elsewhere than glibc (macOS, musl) it does nothing. The cost
is that the process keeps its peak heap until it exits, which a training process reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

from mapa_exp.errors import check

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
INT_MAX = 2**31 - 1  # mallopt takes an int
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses a larger mmap threshold on 64-bit machines (HEAP_MAX_SIZE / 2)
PARAMETERS = {"mmap_threshold": (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), "trim_threshold": (M_TRIM_THRESHOLD, INT_MAX),
              "top_pad": (M_TOP_PAD, INT_MAX)}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def check_malloc(settings: dict | None) -> dict:
    """The ``malloc`` settings as ``{name: bytes}`` (None: glibc's defaults, ``{}``); a bad one raises ConfigError."""
    if settings is None:
        return {}
    out = {}
    for name, value in dict(settings).items():
        check(name in PARAMETERS, f"malloc.{name}", value, f"no such setting (one of {', '.join(PARAMETERS)})")
        if value is None:
            continue
        most = PARAMETERS[name][1]
        check(isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most, f"malloc.{name}", value,
              f"must be a number of bytes in [0, {most}] or null")
        out[name] = value
    return out


def keep_freed_memory(settings: dict | None) -> bool:
    """Apply ``{mmap_threshold, trim_threshold, top_pad}`` (bytes; None or a missing key: glibc's default) to
    this process's allocator. Returns whether any was applied (False where the C library is not glibc)."""
    values = check_malloc(settings)
    if not values:
        return False
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: malloc settings ignored")
        return False
    for name, value in values.items():
        if libc.mallopt(PARAMETERS[name][0], value) != 1:
            raise OSError(f"mallopt refused malloc.{name}={value}")
    return True
