"""`dsalite env`: what a bug or speed report needs about the machine it came from.

The CPU (model, vendor, SIMD flags, cores), the software (Python, torch and its CPU capability, torch's BLAS, the C++
compiler), and the paths dsalite chose on this machine with the reason for each: which kernel build (avx512 / avx2 /
portable) and whether the kernels or their PyTorch twins run, with the calibration's timings; which BLAS runs the fp32
products, with both measured rates; how the work is split over threads; the environment variables that override
these. `report()` gathers it as a dict (`--json` prints that), `format_report` as text. Nothing here changes a choice:
it asks the same functions the layers ask.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time

# SIMD feature flags worth naming in a report (x86 /proc/cpuinfo names, then aarch64 ones)
SIMD_FLAGS = ("sse2", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512bw", "avx512dq",
              "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
              "asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm")
ENV_VARS = ("DSALITE_KERNELS", "DSALITE_KERNEL_ISA", "DSALITE_KERNEL_CACHE", "DSALITE_BLAS", "DSALITE_OPENBLAS_CORETYPE",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
            "OPENBLAS_CORETYPE", "TORCHINDUCTOR_CPP_MARCH", "CXX", "DSALITE_MALLOC", "GLIBC_TUNABLES")


def _x86_level(flags: set[str]) -> str:
    """The x86-64 micro-architecture level the flags reach (v1..v4)."""
    from dsalite import kernels

    isas = kernels.cpu_isas()
    if "avx512" in isas:
        return "x86-64-v4"
    if "avx2" in isas:
        return "x86-64-v3"
    return "x86-64-v2" if {"sse4_2", "popcnt", "ssse3"} <= flags else "x86-64"


def _compiler(cxx: str | None) -> str:
    if cxx is None:
        return "none found (set CXX)"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{cxx} (does not run)"
    return f"{cxx} ({out.splitlines()[0].strip() if out else '?'})"


def _torch_info() -> dict:
    import torch

    cfg = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", cfg)
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", cfg)
    dnn = re.search(r"MKL-DNN v([\d.]+)", cfg)
    return {"version": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas": (blas.group(1) if blas else "?") + (f" {mkl.group(1)}" if mkl else ""),
            "onednn": dnn.group(1) if dnn else None, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads()}


def report(measure_blas: bool = True) -> dict:
    """Everything `dsalite env` prints, as a dict (JSON-able)."""
    from dsalite import kernels
    from dsalite.kernels import blas, wisdom

    cpu = wisdom.cpu_model()
    flags = set(cpu.pop("flags"))
    rep = {"cpu": dict(cpu, simd=[f for f in SIMD_FLAGS if f in flags], flag_count=len(flags)),
           "python": platform.python_version(), "platform": platform.platform(), "torch": _torch_info(),
           "compiler": _compiler(kernels.compiler())}
    if platform.machine().lower() in ("x86_64", "amd64"):
        rep["cpu"]["x86_level"] = _x86_level(flags)
    t0 = time.perf_counter()
    decision = kernels.decision()  # builds (and calibrates) on first use, as a model's first forward would
    rep["kernels"] = {"cpu_runs": kernels.cpu_isas(), "requested": _safe(kernels.requested_isa), **decision,
                      "decided_in_s": round(time.perf_counter() - t0, 2)}
    rep["blas"] = blas.decision()
    if measure_blas:
        try:
            rates = blas._rates(blas._load())
            rep["blas"]["gflops_one_thread"] = {k: round(v, 1) for k, v in rates.items()}
        except (ImportError, OSError) as e:
            rep["blas"]["gflops_one_thread"] = {"error": str(e)}
    rep["threads"] = {
        "torch": rep["torch"]["threads"],
        "kernel_split": f"query rows split into up to {rep['torch']['threads']} parts of >= 32 rows, one per thread "
                        "(the calling thread runs one)",
        "openblas": "single-threaded library; product rows split over the same threads (>= "
                    f"{blas.MIN_ROWS} rows a part), products under {blas.MIN_WORK} multiply-adds stay with torch",
    }
    rep["malloc"] = _malloc()
    rep["env"] = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
    return rep


def _malloc() -> str:
    from dsalite.kernels import memory

    if memory.mode() == "kept":
        return "freed memory kept for reuse (no page faults on reallocation; resident memory stays at its peak)"
    return "glibc's default: large freed blocks go back to the kernel (each reuse faults its pages in again)"


def _safe(fn):
    try:
        return fn()
    except ValueError as e:
        return f"error: {e}"


def format_report(rep: dict) -> str:
    cpu, t, k, b = rep["cpu"], rep["torch"], rep["kernels"], rep["blas"]
    ident = ", ".join(f"{n} {cpu[key]}" for n, key in (("family", "family"), ("model", "model_id"),
                                                       ("stepping", "stepping")) if cpu.get(key))
    lines = [
        f"CPU        {cpu['model']} ({cpu['vendor'] or '?'}{', ' + ident if ident else ''}), {cpu['arch']}, "
        f"{cpu['cores']} cores",
        f"ISA        {' '.join(cpu['simd']) or 'no SIMD flags reported'}"
        + (f"  [{cpu['x86_level']}]" if "x86_level" in cpu else "") + f"  ({cpu['flag_count']} flags in all)",
        f"software   Python {rep['python']}, torch {t['version']} (CPU capability {t['cpu_capability']}, BLAS "
        f"{t['blas']}{', oneDNN ' + t['onednn'] if t['onednn'] else ''}), {rep['platform']}",
        f"compiler   {rep['compiler']}",
        f"kernels    build {k.get('build', '-')} (this CPU runs: {', '.join(k['cpu_runs'])}; requested: "
        f"{k['requested']})",
        f"           path: {'C++ kernels' if k['use'] else 'PyTorch twins'} -- {k['why']}",
    ]
    cal = k.get("calibration")
    if cal:
        lines.append(f"           calibration ({cal.get('threads', 1)} thread, cached per CPU model and build):")
        lines.append(f"             {'case':<46} {'kernel ms':>10} {'PyTorch ms':>11} {'speedup':>8}")
        for name, c in cal["cases"].items():
            lines.append(f"             {name:<46} {c['kernel_ms']:>10.3f} {c['torch_ms']:>11.3f} "
                         f"{c['speedup']:>7.2f}x")
    rates = b.get("gflops_one_thread", {})
    rate_txt = ""
    if "torch" in rates:
        rate_txt = f"; measured now, one thread: torch {rates['torch']:.0f}, OpenBLAS {rates['openblas']:.0f} GFLOP/s"
    lines += [
        f"BLAS       {b['blas']}{' (core type ' + b['coretype'] + ')' if b.get('coretype') else ''} -- {b['why']}"
        + rate_txt,
        f"threads    torch {t['threads']} intra-op / {t['interop_threads']} inter-op; kernels: "
        f"{rep['threads']['kernel_split']}; OpenBLAS: {rep['threads']['openblas']}",
        f"malloc     {rep['malloc']}",
        "env        " + (", ".join(f"{k_}={v}" for k_, v in rep["env"].items()) or "no overrides set"),
    ]
    return "\n".join(lines)


def run(args) -> int:
    if getattr(args, "recalibrate", False):
        from dsalite.kernels import wisdom

        gone = wisdom.forget()
        print(f"forgot {len(gone)} cached measurement(s); measuring again", file=sys.stderr)
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    rep = report(measure_blas=not getattr(args, "no_measure", False))
    print(json.dumps(rep, indent=1) if getattr(args, "json", False) else format_report(rep))
    return 0


def summary_lines() -> list[str]:
    """A short header for benchmark output: CPU, ISA, kernel build and path, BLAS, threads."""
    rep = report(measure_blas=False)
    cpu, k, b, t = rep["cpu"], rep["kernels"], rep["blas"], rep["torch"]
    return [
        f"# machine: {cpu['model']} ({cpu['vendor'] or cpu['arch']}"
        + (f" family {cpu['family']} model {cpu['model_id']}" if cpu.get("family") else "") + f"), {cpu['cores']} cores; ISA "
        f"{cpu.get('x86_level', cpu['arch'])}: {' '.join(cpu['simd'])}",
        f"# torch {t['version']} (CPU capability {t['cpu_capability']}, {t['blas']}), {t['threads']} thread(s)",
        f"# kernels: {'C++ ' + k.get('build', '') if k['use'] else 'PyTorch paths'} -- {k['why']}",
        f"# BLAS: {b['blas']} -- {b['why']}",
        f"# malloc: {rep['malloc']}",
    ] + ([f"# overrides: {', '.join(f'{n}={v}' for n, v in rep['env'].items())}"] if rep["env"] else [])
