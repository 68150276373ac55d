"""Optional CPU kernels, compiled from C++ on first use with the system compiler and loaded through ctypes.

PyTorch has no fused "score, then keep the K best" for the lightning indexer: its ops write the [rows, Hi, T] score
block out to memory three times and rank every entry with `torch.topk`, which dominates a long CPU prefill. The kernel
here does both per query row in cache. Likewise sparse attention over the selected keys: PyTorch gathers K rows per
query into a buffer before small batched GEMMs (or, for training, multiplies against every causal key); the kernels
read each selected latent row once for all heads, in place, forward and backward. Every kernel has an exact
pure-PyTorch twin that runs on other devices, in compiled graphs that lack the kernel's key layout, when no compiler is
found, or when DSALITE_KERNELS=0; tests compare the two.

Builds land in $DSALITE_KERNEL_CACHE (default ~/.cache/dsalite/kernels; a temporary directory if that cannot be
written), keyed by the source, the compiler command and this CPU's feature flags (the build uses -march=native),
written under a temporary name and renamed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

_SRC = Path(__file__).with_name("dsa_select.cpp")
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-psabi"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_available = False  # a plain bool, so torch.compile reads it without tracing `load`


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(cxx: str, march: str = "native") -> Path:
    """The shared library for this source, compiler and target (-march), built once into the cache (a temporary
    directory when the cache directory cannot be written)."""
    flags = [*_FLAGS, f"-march={march}"]
    key = hashlib.sha256(_SRC.read_bytes() + " ".join([cxx, *flags]).encode() + _cpu_flags().encode()).hexdigest()[:16]
    name = f"dsa_select-{key}.so"
    dirs = [Path(os.environ.get("DSALITE_KERNEL_CACHE", Path.home() / ".cache" / "dsalite" / "kernels")),
            Path(tempfile.gettempdir()) / f"dsalite-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"]
    for cache in dirs:  # an earlier build, in either place
        if (cache / name).exists():
            return cache / name
    for i, cache in enumerate(dirs):
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        except OSError:
            if i == len(dirs) - 1:
                raise
            continue
        os.close(fd)
        try:
            subprocess.run([cxx, *flags, str(_SRC), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, cache / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return cache / name
    raise OSError("no kernel cache directory")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.dsa_select.argtypes = [ptr, ptr, ptr, i64, i32, i64, i32, i32, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64]
    lib.dsa_select.restype = i64
    lib.dsa_sparse_attention.argtypes = [ptr, ptr, i64, i64, ptr, i64, i64, i32, i32, i32, ptr, ptr, ptr, i64, i64]
    lib.dsa_sparse_attention.restype = None
    lib.dsa_sparse_attention_bwd.argtypes = [ptr, ptr, i64, i64, ptr, i64, i64, i32, i32, i32, ptr, ptr, ptr, ptr, i64,
                                             i64, i64]
    lib.dsa_sparse_attention_bwd.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, or no working C++ compiler: warned once, the PyTorch path runs)."""
    global _lib, _tried, _available
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("DSALITE_KERNELS", "1") != "0":
            cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
            try:
                if cxx is None:
                    raise FileNotFoundError("no C++ compiler on PATH (set CXX)")
                _lib = _declare(ctypes.CDLL(str(_build(cxx))))
                _available = True
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                warnings.warn(f"dsalite: CPU kernels unavailable, using the PyTorch paths ({detail.strip()[:300]})",
                              RuntimeWarning, stacklevel=2)
        _tried = True
    return _lib


def available() -> bool:
    """Whether `load` has found the kernels (False before its first call); safe inside a compiled function."""
    return _available


_pool = None


def run_parts(call, bounds: list[int], threads: int) -> list:
    """[call(i, bounds[i], bounds[i + 1]) for each part i], the parts run on up to `threads` threads, the calling
    thread one of them (ctypes releases the GIL)."""
    global _pool
    parts = len(bounds) - 1
    workers = min(threads, parts)
    if workers <= 1:
        return [call(i, r0, r1) for i, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:]))]
    if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers < workers - 1:  # a forked child has no workers
        from concurrent.futures import ThreadPoolExecutor

        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="dsalite-kernel"))
    spans = list(enumerate(zip(bounds[:-1], bounds[1:])))
    futures = [_pool[1].submit(call, i, r0, r1) for i, (r0, r1) in spans[1:]]
    first = call(0, *spans[0][1])  # the calling thread takes a part too instead of waiting idle
    return [first] + [f.result() for f in futures]


def even_bounds(rows: int, parts: int) -> list[int]:
    """Part boundaries splitting rows 0..rows-1 into `parts` nearly equal consecutive ranges."""
    return [rows * i // parts for i in range(parts + 1)]


def split_rows(call, rows: int, threads: int, min_rows: int = 32) -> int:
    """Sum of call(r0, r1) over rows 0..rows-1 split across up to `threads` threads."""
    parts = max(1, min(threads, rows // min_rows))
    return sum(r or 0 for r in run_parts(lambda _, r0, r1: call(r0, r1), even_bounds(rows, parts), threads))
