"""Optional CPU kernels, compiled from C++ on first use with the system compiler and loaded through ctypes.

PyTorch has no fused "score, then keep the K best" for the lightning indexer: its ops write the [rows, Hi, T] score
block out to memory three times and rank every entry with `torch.topk`, which dominates a long CPU prefill. The kernel
here does both per query row in cache. Likewise sparse attention over the selected keys: PyTorch gathers K rows per
query into a buffer before small batched GEMMs (or, for training, multiplies against every causal key); the kernels
read each selected latent row once for all heads, in place, forward and backward. And a training step's RMSNorm and
SwiGLU, which PyTorch runs as about ten passes over memory each way, in one pass per row. Every kernel has an exact
pure-PyTorch twin that runs on other devices, in compiled graphs that lack the kernel's key layout, when no compiler is
found, or when the twin is faster on this CPU; tests compare the two.

One source, built for one of three targets (`ISAS`): avx512 (-march=x86-64-v4), avx2 (-march=x86-64-v3: AVX2 + FMA) or
portable (no SIMD intrinsics, 4-float vectors; any other CPU, aarch64 included). The register blocking of each target
is chosen in the source for its register file (`bench/kernels.py --sweep` times the alternatives); the indexer scoring
carries two blockings, and the calibration below picks one per CPU model (CPUs of one instruction set differ there:
AVX-512 on 256-bit units wants fewer accumulators). By default the best target this CPU runs is built;
DSALITE_KERNEL_ISA=avx512|avx2|portable picks one (it must be one the CPU runs, `cpu_isas()`).

Whether the kernels run at all is decided per machine, not assumed: DSALITE_KERNELS=0 turns them off, =1 on, and by
default (auto) a short calibration (`kernels.calibrate`: the scoring blockings against each other, then each kernel
against its PyTorch twin, one thread, a few seconds in a subprocess) runs once per CPU model and kernel build and is
cached on disk, like FFTW's wisdom, so every process of a run on this machine takes the same path. `decision()` says
what was chosen and why.

Builds and measurements land in $DSALITE_KERNEL_CACHE (default ~/.cache/dsalite/kernels; a temporary directory if
that cannot be written), keyed by the source, the compiler command and this CPU's feature flags, written under a
temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

from dsalite.kernels.wisdom import cpu_flags, find_cached, write_atomic

_SRC = Path(__file__).with_name("dsa_select.cpp")
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-psabi"]
ISAS = ("avx512", "avx2", "portable")  # best first
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# compiler flags per target, alternatives in order (older compilers lack the x86-64-vN names)
_TARGET_FLAGS = {
    "avx512": [["-march=x86-64-v4", "-mtune=native"],
               ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512cd", "-mavx2", "-mfma", "-mbmi2"]],
    "avx2": [["-march=x86-64-v3", "-mtune=native"], ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mf16c"]],
    "portable": [["-march=x86-64", "-mtune=native"], []] if _X86 else [[]],
}
# the /proc/cpuinfo flags each x86 target needs (x86-64-v4 and v3; lzcnt shows as abm)
_NEEDS = {
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "avx2": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe", "xsave"},
}
# Inside a compiled graph the indexer kernel is one call out of the graph (≈ 12 µs through the dispatcher), while the
# PyTorch path's scoring and top-k fuse into the graph: below this much scoring work (queries x heads x head dim x keys)
# the call costs more. Measured on decode steps of bench-small (4 indexer heads of 32), kernel vs in-graph step time,
# AVX-512 build: 0.92 at 512 keys, 0.95 at 1024, 1.00 at 2048, 1.03 at 4096; AVX2 build (x86-64-v3 stand-in): 0.93,
# 0.94, 0.99, 1.03.
COMPILED_MIN_WORK = 4 * 32 * 4096
# A compiled step pays for keeping the cache's tiled keys on every step (the traced write into the tiles copies them:
# compiled bench-small steps with / without the tiles 1.84 / 1.40 ms at 512 keys, 3.73 / 3.17 at 2048, AMD EPYC Zen 4
# AVX-512), which the kernel earns back only well past COMPILED_MIN_WORK (compiled kernel / PyTorch step time 0.80 at
# 8192 keys, bench/decode.py, both paths in one process). A compiled runner whose cache can never hold this much scoring
# work drops the tiles (`inference.runner.Runner`), and its compiled steps are the PyTorch path's.
COMPILED_TILES_MIN_WORK = 2 * COMPILED_MIN_WORK
# An autograd Function and a ctypes call cost ≈ 10 µs more than PyTorch's few element-wise ops on a small tensor:
# below this many elements (a decode step's rows) the PyTorch code runs. Measured per call, one thread, AMD EPYC Zen 5,
# AVX-512 build, no grad: RMSNorm 256 wide, kernel / PyTorch µs 13.1 / 12.1 at 1 row, 14.6 / 14.5 at 64, 19.2 / 25.9
# at 256; SwiGLU 1024 wide 9.5 / 3.6 at 1 row, 21.9 / 21.5 at 64, 62.3 / 87.6 at 256.
ELEMENTWISE_MIN_NUMEL = 1 << 16
_lock = threading.RLock()
_libs: dict[str, ctypes.CDLL] = {}
_lib: ctypes.CDLL | None = None
_tried = False
_available = False  # a plain bool, so torch.compile reads it without tracing `load`
_elementwise = True  # whether the fused element-wise kernels run where the others do (False: calibrated slower)
_decision: dict = {}
_forced_lib: ctypes.CDLL | None = None  # what `forced(True)` runs


def cpu_isas() -> list[str]:
    """The build targets this CPU runs, best first (portable always)."""
    flags = cpu_flags()
    ok = [isa for isa in ("avx512", "avx2") if _X86 and all(_NEEDS[i] <= flags for i in ISAS[ISAS.index(isa):2])]
    return ok + ["portable"]


def requested_isa() -> str:
    """The target to build: DSALITE_KERNEL_ISA, or the best this CPU runs."""
    isa = os.environ.get("DSALITE_KERNEL_ISA", "").strip().lower() or cpu_isas()[0]
    if isa not in ISAS:
        raise ValueError(f"DSALITE_KERNEL_ISA={isa!r}: expected one of {', '.join(ISAS)}")
    if isa not in cpu_isas():
        raise ValueError(f"DSALITE_KERNEL_ISA={isa!r}: this CPU lacks the instructions "
                         f"({', '.join(sorted(_NEEDS[isa] - cpu_flags()))}); it runs {', '.join(cpu_isas())}")
    return isa


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build_key(cxx: str, flags: list[str]) -> str:
    flag_line = " ".join(sorted(cpu_flags()))
    return hashlib.sha256(_SRC.read_bytes() + " ".join([cxx, *flags]).encode() + flag_line.encode()).hexdigest()[:16]


def _build(cxx: str, isa: str = "native", extra: tuple[str, ...] = ()) -> Path:
    """The shared library for this source, compiler and target, built once into the cache (a temporary directory
    when the cache directory cannot be written). isa: one of ISAS, or "native" for the best this CPU runs; extra:
    further flags (-D overrides of the blocking, for tuning)."""
    isa = cpu_isas()[0] if isa == "native" else isa
    errors = []
    for target in _TARGET_FLAGS[isa]:
        flags = [*_FLAGS, *target, *extra]
        name = f"dsa_select-{isa}-{build_key(cxx, flags)}.so"
        found = find_cached(name)
        if found:
            return found
        try:
            return write_atomic(name, lambda tmp: subprocess.run([cxx, *flags, str(_SRC), "-o", tmp], check=True,
                                                                 capture_output=True, text=True))
        except subprocess.CalledProcessError as e:
            errors.append(e)
    raise errors[0]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.dsa_build_info.argtypes = []
    lib.dsa_build_info.restype = ctypes.c_char_p
    lib.dsa_select.argtypes = [ptr, ptr, ptr, i64, i32, i64, i32, i32, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64]
    lib.dsa_select.restype = i64
    lib.dsa_set_score_blocking.argtypes = [i32]
    lib.dsa_set_score_blocking.restype = i32
    lib.dsa_sparse_attention.argtypes = [ptr, ptr, i64, i64, ptr, i64, i64, i32, i32, i32, ptr, ptr, ptr, i64, i64]
    lib.dsa_sparse_attention.restype = None
    lib.dsa_sparse_attention_bwd.argtypes = [ptr, ptr, i64, i64, ptr, i64, i64, i32, i32, i32, ptr, ptr, ptr, ptr, i64,
                                             i64, i64]
    lib.dsa_sparse_attention_bwd.restype = None
    f32 = ctypes.c_float
    lib.dsa_rms_norm.argtypes = [ptr, i64, ptr, i64, f32, ptr, i64, ptr, i64, i64]
    lib.dsa_rms_norm_bwd.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64]
    lib.dsa_swiglu.argtypes = [ptr, ptr, i64, i64, ptr, i64, i64]
    lib.dsa_swiglu_bwd.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, i64, i64]
    for name in ("dsa_rms_norm", "dsa_rms_norm_bwd", "dsa_swiglu", "dsa_swiglu_bwd"):
        getattr(lib, name).restype = None
    return lib


def build_info(lib: ctypes.CDLL) -> str:
    """The target and register blocking a loaded library was built with, e.g. "avx2 vw=8 score=32x3|64x1 ..." (the
    scoring default, then its alternative)."""
    return lib.dsa_build_info().decode()


def library(isa: str | None = None) -> ctypes.CDLL:
    """The kernels built for `isa` (default `requested_isa()`), loaded once per process, whatever the calibration
    says (tests and benches use this). Raises OSError / CalledProcessError when no compiler builds them."""
    isa = isa or requested_isa()
    with _lock:
        if isa not in _libs:
            if isa not in cpu_isas():
                raise ValueError(f"kernel target {isa!r}: this CPU runs only {', '.join(cpu_isas())}")
            cxx = compiler()
            if cxx is None:
                raise FileNotFoundError("no C++ compiler on PATH (set CXX)")
            lib = _declare(ctypes.CDLL(str(_build(cxx, isa))))
            if build_info(lib).split()[0] != isa:
                raise OSError(f"kernel build for {isa} reports {build_info(lib)!r}")
            _libs[isa] = lib
        return _libs[isa]


def _measure(lib: ctypes.CDLL) -> dict:
    """`kernels.calibrate` of this build, in a subprocess (nothing of this process's state is touched)."""
    env = dict(os.environ, DSALITE_KERNELS="1", DSALITE_KERNEL_ISA=build_info(lib).split()[0], OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "dsalite.kernels.calibrate"], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _calibration(lib: ctypes.CDLL) -> dict:
    """The cached kernel-vs-PyTorch measurements of this CPU model and kernel build, measured now (under a file lock,
    so processes started together measure once and agree) when there are none."""
    import torch

    from dsalite.kernels import wisdom

    # the twins' speed depends on the instructions torch itself uses (ATEN_CPU_CAPABILITY can lower them)
    # the calibration's own source too: a record measured by an older calibrate.py may lack a kernel's cases
    calibration = hashlib.sha256(_SRC.with_name("calibrate.py").read_bytes()).hexdigest()[:16]
    key = {"cpu": wisdom.cpu_key(), "build": build_info(lib), "source": build_key("", []), "calibration": calibration,
           "torch": torch.__version__, "torch_isa": torch.backends.cpu.get_cpu_capability()}
    return wisdom.cached("kernels", key, lambda: _measure(lib))


def load() -> ctypes.CDLL | None:
    """The compiled kernels when they are this machine's faster path, else None (the PyTorch paths run): disabled
    (DSALITE_KERNELS=0), no working C++ compiler (warned once), or slower than the PyTorch twins in this CPU's
    calibration. DSALITE_KERNELS=1 uses them without calibrating."""
    global _lib, _tried, _available, _decision, _elementwise
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        mode = os.environ.get("DSALITE_KERNELS", "auto").strip().lower()
        if mode == "0":
            _decision = {"use": False, "why": "DSALITE_KERNELS=0"}
        else:
            try:
                lib = library()
                _decision = {"isa": build_info(lib).split()[0], "build": build_info(lib)}
                if mode == "1":
                    _decision.update(use=True, why="DSALITE_KERNELS=1")
                else:
                    cal = _calibration(lib)
                    use = cal["kernel_faster"]
                    _elementwise = cal.get("elementwise_faster", True)
                    blocking = cal.get("score_blocking")
                    _decision.update(use=use, calibration=cal, why=(
                        "calibrated on this CPU: " + ("the kernels are" if use else "the PyTorch paths are")
                        + " faster (" + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in cal["kernels"].items())
                        + ")" + (f"; indexer scoring blocking {blocking['blocking']} (alternative / default "
                                 f"{blocking['alternative_over_default']:.2f})" if blocking else "")
                        + ("" if _elementwise else "; the fused element-wise kernels are slower: not used")))
                if _decision["use"]:
                    # the scoring blocking the calibration found faster here (the build's default without one)
                    lib.dsa_set_score_blocking(_decision.get("calibration", {}).get("score_blocking", {}).get("alt", 0))
                    _lib = lib
            except (OSError, ValueError, subprocess.CalledProcessError) as e:
                detail = (getattr(e, "stderr", "") or str(e)).strip()[-300:]
                _decision = {"use": False, "why": f"kernels unavailable: {detail}"}
                warnings.warn(f"dsalite: CPU kernels unavailable, using the PyTorch paths ({detail})",
                              RuntimeWarning, stacklevel=2)
        _available = _lib is not None
        _tried = True
    return _lib


def elementwise_ready(*tensors) -> bool:
    """Whether the fused element-wise kernels (RMSNorm, SwiGLU) take these tensors: plain CPU fp32 tensors (no
    DTensor or other subclass) outside compiled graphs and autocast, the first at least ELEMENTWISE_MIN_NUMEL
    elements, with the kernels loaded and not calibrated slower than PyTorch's ops here (the layers fall back to their
    PyTorch code otherwise)."""
    import torch

    # compiling first, so a traced graph never guards on the size; then the size, which a decode step fails
    if torch.compiler.is_compiling() or tensors[0].numel() < ELEMENTWISE_MIN_NUMEL:
        return False
    return (all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and load() is not None and _elementwise)


def available() -> bool:
    """Whether `load` has found the kernels (False before its first call); safe inside a compiled function."""
    return _available


@contextlib.contextmanager
def forced(use: bool):
    """Within the block the kernels run (use) or the PyTorch twins do, whatever `load` decided; for benches that
    time both paths side by side in one process. A compiled graph reads `available()` while tracing and is guarded
    on it, so each path gets its own graph. Caches decide their key layout when built: build them inside too."""
    global _lib, _available, _forced_lib, _elementwise
    load()
    saved = _lib, _available, _elementwise
    if use and _forced_lib is None:
        _forced_lib = library()  # once: finding the target reads the CPU flags (~0.3 ms, a decode step is ~1 ms)
    _lib = _forced_lib if use else None
    _available = _lib is not None
    _elementwise = True
    try:
        yield
    finally:
        _lib, _available, _elementwise = saved


def decision() -> dict:
    """What `load` chose and why: use (bool), why, isa and build (when built), calibration (when measured)."""
    load()
    return dict(_decision)


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


def row_parts(rows: int, threads: int, min_rows: int = 32) -> int:
    """How many parts `split_rows` cuts `rows` into: one per thread, each at least `min_rows` rows (at least one)."""
    return max(1, min(threads, rows // min_rows))


def split_rows(call, rows: int, threads: int, min_rows: int = 32) -> int:
    """Sum of call(r0, r1) over rows 0..rows-1 split across up to `threads` threads."""
    parts = row_parts(rows, threads, min_rows)
    if parts == 1:  # a decode step's few rows: no pool, no closures (this runs once per layer and token)
        return call(0, rows) or 0
    return sum(r or 0 for r in run_parts(lambda _, r0, r1: call(r0, r1), even_bounds(rows, parts), threads))
