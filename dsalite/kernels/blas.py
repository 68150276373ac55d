"""fp32 matrix products through OpenBLAS (the scipy-openblas32 wheel) on CPUs where torch's own BLAS is slow.

torch's x86 CPU wheels multiply fp32 matrices with MKL, which runs generic code on CPUs that are not Intel's. Measured
fp32 GEMM 2048³, one thread, MKL vs OpenBLAS: AMD EPYC Zen 5 (full 512-bit units) ≈ 95 vs ≈ 215 GFLOP/s; Zen 4
(AVX-512 on 256-bit units) 95 vs 102; Zen 3 (AVX2) 61.2 vs 70.9; Intel Xeon (Sapphire Rapids, AVX-512) 173 vs 139. So
on x86 CPUs from other vendors dsalite's large fp32 products go to its own copy of OpenBLAS, loaded with the AVX-512
kernels when the CPU has the instructions (OpenBLAS's automatic choice, or an OPENBLAS_CORETYPE set for other
libraries, may map such CPUs to the AVX2 kernels), and on Intel's they stay with MKL. That rule is fixed, not timed,
so every process of a run rounds the same way (a resumed run reproduces the uninterrupted one). On other
architectures, where neither side was measured, a short timing of both decides once per CPU model and is cached
(`kernels.wisdom`), which keeps that property on the machine. DSALITE_BLAS=torch or =openblas forces the choice;
`decision()` says which was made and why. Small products (decode rows) stay with torch: below `MIN_WORK` multiply-adds
the call overhead wins.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import threading
import time

import torch

from dsalite import kernels

MIN_WORK = 1 << 21  # multiply-adds (M·N·K) from which a product goes to OpenBLAS
MIN_ROWS = 32

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_lock = threading.Lock()
_lib = None
_decided = False
_why = ""


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


def _vendor() -> str:
    """The x86 CPU vendor string (GenuineIntel, AuthenticAMD, ...), "" elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def _rates(lib) -> dict:
    """GFLOP/s of torch's BLAS and OpenBLAS, one thread, best of a few: a square product and a tall-skinny one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rates = {"torch": 0.0, "openblas": 0.0}
    try:
        for M, K, N in ((1024, 1024, 1024), (2048, 256, 512)):
            a, b, c = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g), torch.empty(M, N)
            for name, fn in (("torch", lambda: torch.mm(a, b, out=c)), ("openblas", lambda: _sgemm(lib, a, b, c))):
                fn()
                best = min(_timed(fn) for _ in range(3))
                rates[name] += 2 * M * N * K / best / 1e9 / 2
    finally:
        torch.set_num_threads(threads)
    return rates


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _choose() -> tuple[bool, str]:
    """(whether products go to OpenBLAS, why)."""
    choice = os.environ.get("DSALITE_BLAS", "auto").strip().lower()
    if choice in ("torch", "openblas"):
        return choice == "openblas", f"DSALITE_BLAS={choice}"
    if importlib.util.find_spec("scipy_openblas32") is None:
        return False, "scipy-openblas32 is not installed"
    vendor = _vendor()
    if vendor == "GenuineIntel":
        return False, "rule: Intel x86, where torch's MKL runs its own fast kernels (measured: faster than OpenBLAS)"
    if vendor:
        return True, f"rule: x86 from {vendor}, where torch's MKL runs generic code (measured: slower than OpenBLAS)"
    from dsalite.kernels import wisdom

    key = {"cpu": wisdom.cpu_key(), "torch": torch.__version__, "openblas": _openblas_version()}
    rec = wisdom.cached("blas", key, lambda: {"gflops": _rates(_load())})
    r = rec["gflops"]
    use = r["openblas"] > r["torch"]
    return use, (f"calibrated on this CPU: OpenBLAS {r['openblas']:.0f} vs torch {r['torch']:.0f} GFLOP/s, one thread")


def _openblas_version() -> str:
    try:
        from importlib.metadata import version

        return version("scipy-openblas32")
    except Exception:  # noqa: BLE001 - any metadata problem: an unknown version
        return "?"


def library():
    """The OpenBLAS handle when products should go through it, else None (decided once per process)."""
    global _lib, _decided, _why
    if _decided:
        return _lib
    with _lock:
        if not _decided:
            use, _why = _choose()
            if use:
                try:
                    _lib = _load()
                except (ImportError, OSError) as e:
                    if os.environ.get("DSALITE_BLAS") == "openblas":
                        raise
                    _why += f"; OpenBLAS did not load ({e})"
            _decided = True
    return _lib


def decision() -> dict:
    """Which BLAS dsalite's fp32 products use and why: {"blas": "OpenBLAS" or "torch", "why": ..., "coretype": ...}."""
    lib = library()
    core = os.environ.get("DSALITE_OPENBLAS_CORETYPE") or ("SkylakeX" if _cpu_has_avx512() else "auto")
    return {"blas": "OpenBLAS" if lib is not None else "torch", "why": _why,
            "coretype": core if lib is not None else None}


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
