"""fp32 matrix products through OpenBLAS (the scipy-openblas32 wheel) on CPUs where torch's own BLAS is slow.

torch's x86 CPU wheels multiply fp32 matrices with MKL, which runs generic code on CPUs that are not Intel's: on an
AMD EPYC with AVX-512 it reaches ≈ 96 GFLOP/s per core where OpenBLAS's AVX-512 kernels reach ≈ 215. So on x86 CPUs
from other vendors dsalite's large fp32 products go to its own copy of OpenBLAS, loaded with the AVX-512 kernels when
the CPU has the instructions (OpenBLAS's automatic choice, or an OPENBLAS_CORETYPE set for other libraries, may map
such CPUs to the AVX2 kernels). The rule is fixed, not timed, so every process of a run rounds the same way (a resumed
run reproduces the uninterrupted one). DSALITE_BLAS=torch or =openblas forces the choice. Small products (decode rows)
stay with torch: below `MIN_WORK` multiply-adds the call overhead wins.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import threading

import torch

from dsalite import kernels

MIN_WORK = 1 << 21  # multiply-adds (M·N·K) from which a product goes to OpenBLAS
MIN_ROWS = 32

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_lock = threading.Lock()
_lib = None
_decided = False


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl"))


def _load():
    """dsalite's own copy of OpenBLAS, its kernels chosen from this CPU's flags (DSALITE_OPENBLAS_CORETYPE overrides):
    OPENBLAS_CORETYPE is read once, when the library loads, so it is set for the load and put back, leaving any
    other OpenBLAS in the process (numpy's) to the environment's choice."""
    spec = importlib.util.find_spec("scipy_openblas32")  # not imported: importing it loads the library
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scipy-openblas32 is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "lib", "libscipy_openblas.so")
    core = os.environ.get("DSALITE_OPENBLAS_CORETYPE") or ("SkylakeX" if _cpu_has_avx512() else None)
    before = os.environ.get("OPENBLAS_CORETYPE")
    try:
        if core:
            os.environ["OPENBLAS_CORETYPE"] = core
        lib = ctypes.CDLL(path)
    finally:
        if before is None:
            os.environ.pop("OPENBLAS_CORETYPE", None)
        else:
            os.environ["OPENBLAS_CORETYPE"] = before
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.scipy_cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    lib.scipy_cblas_sgemm.restype = None
    lib.scipy_openblas_set_num_threads.argtypes = [i]
    # single-threaded: its spinning workers and torch's OpenMP ones would fight over the cores (`_sgemm` splits rows
    # over dsalite's kernel threads instead)
    lib.scipy_openblas_set_num_threads(1)
    return lib


def _vendor_is_not_intel() -> bool:
    """x86 CPU whose vendor is not Intel (MKL's fast paths are Intel-only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return False
    return bool(vendor) and vendor != "GenuineIntel"


def library():
    """The OpenBLAS handle when products should go through it, else None (decided once per process)."""
    global _lib, _decided
    if _decided:
        return _lib
    with _lock:
        if not _decided:
            choice = os.environ.get("DSALITE_BLAS", "auto")
            if choice != "torch":
                try:
                    if choice == "openblas" or _vendor_is_not_intel():
                        _lib = _load()
                except (ImportError, OSError):
                    if choice == "openblas":
                        raise
            _decided = True
    return _lib


def _operand(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(storage, transpose flag, leading dimension) of a 2-D matrix for a row-major GEMM: rows or columns contiguous
    are used in place, anything else is copied."""
    if x.stride(1) == 1 and x.stride(0) >= max(1, x.shape[1]):
        return x, _NO_TRANS, x.stride(0)
    if x.stride(0) == 1 and x.stride(1) >= max(1, x.shape[0]):
        return x, _TRANS, x.stride(1)
    x = x.contiguous()
    return x, _NO_TRANS, max(1, x.shape[1])


def _sgemm(lib, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """out = a @ b + beta * out; with torch.get_num_threads() > 1 the rows of out are split over dsalite's kernel
    threads, each part a single-threaded sgemm."""
    (M, K), N = a.shape, b.shape[1]
    a, ta, lda = _operand(a)
    b, tb, ldb = _operand(b)
    fsize = a.element_size()
    a_ptr, b_ptr, c_ptr, ldc = a.data_ptr(), b.data_ptr(), out.data_ptr(), out.stride(0)

    def rows(_, r0, r1):  # rows r0..r1-1 of out: the same rows of op(a)
        a_rows = a_ptr + r0 * (1 if ta == _TRANS else lda) * fsize
        lib.scipy_cblas_sgemm(_ROW_MAJOR, ta, tb, r1 - r0, N, K, 1.0, a_rows, lda, b_ptr, ldb, beta,
                              c_ptr + r0 * ldc * fsize, ldc)

    parts = max(1, min(torch.get_num_threads(), M // MIN_ROWS))
    kernels.run_parts(rows, kernels.even_bounds(M, parts), parts)
    return out


def usable(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors may take OpenBLAS: fp32 on CPU, outside autocast and compiled graphs."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu") and library() is not None)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """a [M, K] @ b [K, N] (fp32 CPU, any strides) into a new [M, N] tensor or into `out` (contiguous rows), added to
    it with accumulate=True. Through OpenBLAS when `library()` chose it and the product is big enough, else torch."""
    M, K = a.shape
    N = b.shape[1]
    lib = library()
    if lib is None or M < MIN_ROWS or M * N * K < MIN_WORK or a.dtype != torch.float32 or b.dtype != torch.float32:
        if out is None:
            return a @ b
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if out is None:
        out = a.new_empty(M, N)
    elif out.stride(1) != 1:
        raise ValueError(f"mm: out must have contiguous rows, got strides {tuple(out.stride())}")
    return _sgemm(lib, a, b, out, 1.0 if accumulate else 0.0)
