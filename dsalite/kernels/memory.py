"""Freed memory kept in the process instead of handed back to the kernel after every large tensor.

glibc serves a block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh mapping and unmaps it on
free, and trims the heap's free top: the next activation of that size is then faulted in page by page, each page
zeroed by the kernel. On a virtual machine a fault is expensive (2-13 µs measured on the VMs this project runs on): a
bench-small training step of transformers spent 1.9 of its 3.5 s in the kernel that way, its 4096-token prefill two
thirds of 9.8 s, and dsalite's step 20 of 660 ms. Keeping freed blocks for reuse, as jemalloc and tcmalloc do, removes
those faults; the price is that the process's resident memory stays at its peak.

dsalite's commands keep freed memory (`keep_freed_memory`, unless DSALITE_MALLOC=glibc); the benches give both sides
the same setting through glibc's environment tunables (`tunables`), so a ratio compares model code, not allocators.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h) and the values used: every block below 1 GiB from the heap, and the heap never trimmed
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1
_mode: str | None = None


def tunables() -> str:
    """The GLIBC_TUNABLES value with the same effect as `keep_freed_memory`, for a process started with it."""
    return f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"


def keep_freed_memory() -> str:
    """Tell glibc to keep freed memory for reuse, once per process; returns what is in effect: "kept", "glibc"
    (DSALITE_MALLOC=glibc, or already set through GLIBC_TUNABLES) or "unavailable" (not glibc)."""
    global _mode
    if _mode is None:
        if os.environ.get("DSALITE_MALLOC", "keep").strip().lower() == "glibc":
            _mode = "glibc"
        elif tunables() in os.environ.get("GLIBC_TUNABLES", ""):
            _mode = "kept"
        else:
            _mode = "kept" if _mallopt() else "unavailable"
    return _mode


def mode() -> str:
    """What is in effect now, without changing it: "kept" (here or through GLIBC_TUNABLES) or "glibc"."""
    return "kept" if _mode == "kept" or tunables() in os.environ.get("GLIBC_TUNABLES", "") else "glibc"


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # musl and others: no-op
            return False
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                         TRIM_THRESHOLD))
    except OSError:
        return False
