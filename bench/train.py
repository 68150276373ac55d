"""Training throughput: tokens/s of one full step (forward + backward + AdamW) for dsalite vs HF transformers on the
same model, batch and sequence length, and dsalite's model-FLOPs utilisation against the fp32 GEMM peak measured in
the same subprocess right after the steps (the faster of torch's BLAS and dsalite's) and against the idle-machine
reference of the env notes (175 GFLOP/s per core, an Intel Xeon with MKL): on a shared machine the in-run peak drops
with the load, so both are printed. On a non-Intel x86 CPU dsalite's products run on OpenBLAS (`kernels.blas`) while
HF's run on torch's MKL; `--dsalite-blas torch` measures dsalite on torch's BLAS too.

Both sides train with the plain causal-LM loss, each through its own training path (HF's `labels=`; dsalite's
trainer's fused head + cross-entropy, `head_lm_loss`), and the same optimizer (fused AdamW, as dsalite's trainer
builds it) so the work is the same; dsalite's numbers use `Transformer.flops_per_token` (attention
over the top-k keys a DSA layer really uses). Each measurement runs in a fresh subprocess with one thread (the stable
setting on a shared 2-core machine) and counts the process's CPU time, so time spent waiting for a core while other
jobs run is left out (wall time with --threads > 1); medians are reported. Each round also times dsalite with
DSALITE_KERNELS=0 (its PyTorch twins instead of the C++ kernels), printed beside it. dsalite's logits are checked
against transformers' on a short prompt before anything is timed.

    .venv/bin/python bench/train.py [--configs small,medium] [--seq 2048] [--batch 1] [--reps 3] [--rounds 3]
                                    [--threads 1] [--isa native|avx2]
    .venv/bin/python bench/train.py --model v4 [...]   # the bench DeepSeek-V4 config (config "v4")

DeepSeek-V4 (--model v4, `presets.BENCH_V4`: sliding / CSA / HCA / CSA layers, window 128, CSA top-64 of S/4 entries,
HCA S/128, hash routing on layer 0, 4 mHC streams): HF trains its `DeepseekV4ForCausalLM`, dsalite its V4 model with
the same fused head + cross-entropy; FLOPs per token count the window, the selected entries, the compressors, the
indexer and mHC (`flops_per_token`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_machine_arguments, dsalite_from_hf, header, hf_model, use_machine  # noqa: E402

from dsalite.presets import BENCH_MEDIUM, BENCH_SMALL, BENCH_V4  # noqa: E402

CONFIGS = {"small": BENCH_SMALL, "medium": BENCH_MEDIUM, "v4": BENCH_V4}
REFERENCE_PEAK = 175.0  # GFLOP/s per core, fp32 GEMM on an idle machine (env notes §1)


def step_time(fn, reps: int, threads: int, warmup: int = 1) -> float:
    """Median seconds per call: the process's CPU time with one thread (the time the call really ran), wall time
    with more (CPU time would add the threads up)."""
    clock = time.process_time if threads == 1 else time.perf_counter
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return statistics.median(ts)


def gemm_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """Measured fp32 matmul GFLOP/s (median), the hardware reference for MFU: the faster of torch's BLAS and the one
    dsalite uses (`dsalite.kernels.blas`, OpenBLAS on non-Intel x86), so MFU is against the best GEMM at hand."""
    from dsalite.kernels import blas

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    t = min(step_time(lambda: torch.matmul(a, b, out=c), reps, threads, warmup=2),
            step_time(lambda: blas.mm(a, b, out=c), reps, threads, warmup=2))
    return 2 * n**3 / t / 1e9


def one(which: str, config: str, S: int, batch: int, reps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    hf = hf_model(cfg)
    model = hf if which == "hf" else dsalite_from_hf(hf)
    if which != "hf":
        del hf
    model.train()
    ids = torch.randint(0, cfg["vocab_size"], (batch, S), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    if which == "hf":
        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from dsalite.training.losses import IGNORE, head_lm_loss

        labels = torch.cat([ids[:, 1:], torch.full((batch, 1), IGNORE)], dim=1)

        def step():  # the trainer's loss: head and cross-entropy fused, no [S, V] logits
            head_lm_loss(model, model(ids, compute_logits=False).last_hidden, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    t = step_time(step, reps, threads)
    rec = {"which": which, "config": config, "S": S, "tok_s": batch * S / t}
    if which != "hf":
        from dsalite.kernels import blas

        rec["blas"] = "OpenBLAS" if blas.library() is not None else "torch"
        rec["flops_per_token"] = model.flops_per_token(S, training=True, mtp=False)
        rec["gemm_peak"] = gemm_peak(threads)  # right after the steps, under the same load
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["glm", "v4"], default="glm",
                    help="glm: the GLM bench configs (default); v4: the bench DeepSeek-V4 config")
    ap.add_argument("--configs", default=None, help="comma-separated: small (D 256), medium (D 1024), v4 (D 256 "
                    "DeepSeek-V4); default small,medium, or v4 with --model v4")
    ap.add_argument("--seq", type=int, default=2048, help="sequence length S (default 2048)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per subprocess, median taken (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="HF/dsalite subprocess pairs per config (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--dsalite-blas", choices=["auto", "torch", "openblas"], default="auto",
                    help="DSALITE_BLAS for the dsalite side: auto (OpenBLAS on non-Intel x86, as the library "
                         "decides), torch (torch's own BLAS, as HF uses), openblas (default auto)")
    ap.add_argument("--no-pytorch-path", action="store_true",
                    help="skip timing dsalite with DSALITE_KERNELS=0 (its PyTorch paths)")
    add_machine_arguments(ap)
    ap.add_argument("--one", nargs=2, metavar=("WHICH", "CONFIG"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.configs = a.configs or ("v4" if a.model == "v4" else "small,medium")
    use_machine(a)
    torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.seq, a.batch, a.reps, a.threads)))
        return
    if a.dsalite_blas != "auto":
        os.environ["DSALITE_BLAS"] = a.dsalite_blas  # for the header, as for the subprocesses
    header(f"training step (fwd + bwd + AdamW), fp32, batch {a.batch} x S {a.seq}, {a.threads} thread(s); "
           f"{a.rounds} rounds of HF then dsalite subprocesses, {a.reps} steps each; medians over rounds")
    ref = REFERENCE_PEAK * a.threads
    runs = ["hf", "dsalite"] + ([] if a.no_pytorch_path else ["pytorch"])
    print(f"{'config':>8} {'BLAS':>9} {'HF tok/s':>9} {'dsalite tok/s':>14} {'speedup':>8} "
          + ("" if a.no_pytorch_path else f"{'PyTorch-path tok/s':>19} {'speedup':>8} ")
          + f"{'GFLOP/tok':>10} {'GFLOP/s':>8} {'GEMM peak':>10} {'MFU (measured peak)':>20} "
          f"{f'MFU ({ref:.0f} GFLOP/s)':>17}")
    for config in a.configs.split(","):
        rounds = []
        for _ in range(a.rounds):  # alternating, so a change in the machine's load hits every side alike
            r = {}
            for which in runs:  # "pytorch": dsalite with its kernels off
                env = dict(os.environ, DSALITE_BLAS=a.dsalite_blas)
                if which == "pytorch":
                    env["DSALITE_KERNELS"] = "0"
                out = subprocess.run([sys.executable, __file__, "--one", "hf" if which == "hf" else "dsalite", config,
                                      "--seq", str(a.seq), "--batch", str(a.batch), "--reps", str(a.reps),
                                      "--threads", str(a.threads)], capture_output=True, text=True, check=True,
                                     env=env)
                r[which] = json.loads(out.stdout.strip().splitlines()[-1])
            rounds.append(r)
        hf = statistics.median(r["hf"]["tok_s"] for r in rounds)
        ds = statistics.median(r["dsalite"]["tok_s"] for r in rounds)
        speedup = statistics.median(r["dsalite"]["tok_s"] / r["hf"]["tok_s"] for r in rounds)
        twin = ""
        if "pytorch" in runs:
            pt = statistics.median(r["pytorch"]["tok_s"] for r in rounds)
            pt_speedup = statistics.median(r["pytorch"]["tok_s"] / r["hf"]["tok_s"] for r in rounds)
            twin = f"{pt:>19.0f} {pt_speedup:>7.2f}x "
        peak = statistics.median(r["dsalite"]["gemm_peak"] for r in rounds)
        fpt = rounds[0]["dsalite"]["flops_per_token"]
        gflops = fpt * ds / 1e9
        print(f"{config:>8} {rounds[0]['dsalite']['blas']:>9} {hf:>9.0f} {ds:>14.0f} {speedup:>7.2f}x {twin}"
              f"{fpt / 1e9:>10.3f} {gflops:>8.1f} {peak:>10.0f} {gflops / peak:>20.1%} {gflops / ref:>17.1%}",
              flush=True)

if __name__ == "__main__":
    main()
