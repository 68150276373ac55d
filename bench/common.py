"""Shared bench helpers: the bench-small GLM config of hf-reference §10, timing with medians, peak memory, the
header that says where a bench ran (`header`), dsalite loaded strictly from the HF model and checked against its
logits before anything is timed (`dsalite_from_hf`), stand-ins for other CPUs (`--isa`) and the allocator setting
both sides share (`--malloc`), applied by `use_machine`."""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time

import torch

from dsalite.presets import BENCH_SMALL, BENCH_V4

# --model choices of the benches: config and the one-line description their tables print
MODELS = {
    "glm": (BENCH_SMALL, "bench-small GLM (D 256, 4 layers, 8 experts top-2, index_topk 256)"),
    "v4": (BENCH_V4, "bench DeepSeek-V4 (D 256, sliding/CSA/HCA/CSA, window 128, CSA top-64 of S/4, HCA S/128, "
                     "4 mHC streams)"),
}


def hf_model(cfg: dict):
    import transformers as tf

    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    Cfg, Model = {"glm_moe_dsa": (tf.GlmMoeDsaConfig, tf.GlmMoeDsaForCausalLM),
                  "deepseek_v4": (tf.DeepseekV4Config, tf.DeepseekV4ForCausalLM)}[cfg["model_type"]]
    torch.manual_seed(0)
    m = Model(Cfg(**kw)).eval()
    m.config._attn_implementation = "eager"
    return m


def dsalite_from_hf(hf, check: bool = True):
    """dsalite's model with the HF model's weights, loaded strictly (a renamed or missing tensor fails here instead of
    benchmarking random weights) and, with check, compared with HF's logits on a short prompt first."""
    from dsalite.config import ModelConfig
    from dsalite.model import build_model

    m = build_model(ModelConfig.from_hf(hf.config.to_dict())).eval()
    m.load_state_dict(hf.state_dict(), strict=True)
    if check:
        check_logits(hf, m)
    return m


def check_logits(hf, model, S: int = 300, rtol: float = 1e-4) -> float:
    """Raise unless dsalite's logits equal HF's (fp32, within rtol of the largest logit) on an S-token prompt; S
    beyond index_topk (256 in the bench configs) makes the indexer's selection sparse. Returns the max difference."""
    ids = torch.randint(0, hf.config.vocab_size, (1, S), generator=torch.Generator().manual_seed(12345))
    with torch.no_grad():
        want = hf(ids).logits.float()
        got = model(ids).logits.float()
    err = (got - want).abs().max().item()
    tol = rtol * max(1.0, want.abs().max().item())
    if not err <= tol:  # also catches NaN
        raise SystemExit(f"bench: dsalite's logits differ from transformers' by {err:.3g} (tolerance {tol:.3g}) on "
                         f"a {S}-token prompt: the benchmark would time a different model")
    return err


# Environment that makes this machine stand in for a CPU without AVX-512 (AVX2 + FMA, as AMD Zen 2/3 or Intel
# Haswell..Alder Lake): dsalite's kernels built -march=x86-64-v3, torch's own kernels, MKL and oneDNN held to AVX2,
# inductor's generated code too, OpenBLAS on its Haswell kernels. Register limits and vector width are then those of
# such a CPU; caches, clocks and port counts stay this machine's. "portable": an x86-64 baseline CPU (SSE only).
STANDINS = {
    "avx2": {"DSALITE_KERNEL_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",
             "DSALITE_OPENBLAS_CORETYPE": "Haswell"},
    "portable": {"DSALITE_KERNEL_ISA": "portable", "ATEN_CPU_CAPABILITY": "default",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41", "TORCHINDUCTOR_CPP_MARCH": "x86-64",
                 "DSALITE_OPENBLAS_CORETYPE": "Nehalem"},
}


def add_machine_arguments(ap) -> None:
    """--isa (a stand-in for another CPU) and --malloc (how freed memory is handled, the same for both sides)."""
    ap.add_argument("--isa", choices=["native", *STANDINS], default="native",
                    help="run as a stand-in for another CPU: avx2 (no AVX-512: kernels, torch, MKL, oneDNN and "
                         "inductor held to AVX2) or portable (SSE only); default native (this CPU as it is)")
    ap.add_argument("--malloc", choices=["keep", "glibc"], default="keep",
                    help="keep (default): every process of the run, dsalite's and the reference's, keeps freed "
                         "memory for reuse (glibc tunables, `dsalite.kernels.memory`), so neither pays page faults "
                         "for re-allocating its buffers; glibc: glibc's default for both, which unmaps large freed "
                         "blocks (on a VM, where faults are slow, this makes transformers 2-3x slower)")


def use_machine(args) -> None:
    """Re-run this process with the environment of --isa and --malloc (a no-op when it is already set): the
    libraries read it when they load, so it must be there from the start; subprocesses inherit it."""
    from dsalite.kernels import memory

    env = dict(STANDINS.get(args.isa, {}))
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if args.malloc == "keep":
        env["GLIBC_TUNABLES"] = tunables if memory.tunables() in tunables else memory.tunables()
    else:
        env["DSALITE_MALLOC"] = "glibc"
        if memory.tunables() in tunables:
            env["GLIBC_TUNABLES"] = tunables.replace(memory.tunables(), "").strip(":")
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def header(title: str) -> None:
    """The bench's title, then where it runs: CPU model and ISA, torch, the kernel build and path, the BLAS, and why
    each was chosen (`dsalite env` has the details)."""
    from dsalite import doctor

    print(title)
    for line in doctor.summary_lines():
        print(line)
    sys.stdout.flush()


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
