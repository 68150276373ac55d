"""Prefill (one full forward) latency and peak memory: dsalite vs HF transformers, same weights, one process.

Runs the bench-small GLM config of hf-reference §10 (index_topk 256, so DSA is active for S > 256) in fp32, batch 1,
one thread (the stable setting on a shared 2-core machine), and prints medians and the ratio HF / dsalite.
dsalite runs the engine's prefill (its cache, chunks of --chunk tokens); HF one forward with logits_to_keep=1.
Each point reports the median wall-clock time and the median CPU time of the process (time.process_time): on a shared
machine other work stretches the wall clock, while CPU time stays close to the quiet-machine figure.
Peak memory is measured as the growth of the process's peak RSS during each model's own runs, so each length runs
in a fresh subprocess. dsalite runs twice: on the paths this machine chose (its C++ kernels where they are faster)
and with DSALITE_KERNELS=0 (the PyTorch twins), so the table shows what the kernels gain here. Before timing,
dsalite's logits are checked against transformers' on a short prompt (`common.check_logits`).

    .venv/bin/python bench/prefill.py [--seqs 512,2048,4096] [--reps 3] [--threads 1] [--isa native|avx2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import MODELS, add_machine_arguments, dsalite_from_hf, header, hf_model, peak_rss_gb, use_machine  # noqa: E402


def median_wall_and_cpu(fn, reps: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall-clock and median CPU seconds of fn() over reps runs, after warmup runs."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def prefill(model, ids, chunk: int):
    from dsalite.inference.runner import Runner, new_cache

    S = ids.shape[1]
    runner = Runner(model, new_cache(model, 1, S), prefill_chunk=chunk)
    return runner.feed(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(S)[None])


def one(which: str, S: int, reps: int, threads: int, chunk: int, arch: str = "glm") -> dict:
    torch.set_num_threads(threads)
    bench = MODELS[arch][0]
    hf = hf_model(bench)
    model = hf if which == "hf" else dsalite_from_hf(hf)
    if which != "hf":
        del hf
    ids = torch.randint(0, bench["vocab_size"], (1, S), generator=torch.Generator().manual_seed(0))
    base = peak_rss_gb()
    with torch.no_grad():
        if which == "hf":
            t, c = median_wall_and_cpu(lambda: model(ids, logits_to_keep=1), reps, warmup=1)
        else:  # the engine's prefill: latent (V4: window + compressor) cache, chunks of `chunk` tokens
            t, c = median_wall_and_cpu(lambda: prefill(model, ids, chunk), reps, warmup=1)
    return {"which": which, "S": S, "seconds": t, "cpu_seconds": c, "peak_gb": peak_rss_gb() - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="512,2048,4096", help="comma-separated prompt lengths (default 512,2048,4096)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per point, median reported (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--chunk", type=int, default=2048, help="dsalite prefill chunk in tokens (default 2048)")
    ap.add_argument("--model", choices=sorted(MODELS), default="glm",
                    help="architecture: glm (GLM-5 DSA, default) or v4 (DeepSeek-V4); both through the engine's "
                         "chunked prefill")
    ap.add_argument("--no-pytorch-path", action="store_true",
                    help="skip the run of dsalite with DSALITE_KERNELS=0 (its PyTorch paths)")
    add_machine_arguments(ap)
    ap.add_argument("--one", nargs=2, metavar=("WHICH", "S"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    use_machine(a)
    torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), a.reps, a.threads, a.chunk, a.model)))
        return
    header(f"prefill, {MODELS[a.model][1]}, fp32, batch 1, {a.threads} thread(s), median of {a.reps}")
    runs = ["hf", "dsalite"] + ([] if a.no_pytorch_path else ["pytorch"])
    print(f"{'S':>6} {'HF ms':>10} {'dsalite ms':>11} {'speedup':>8} "
          + ("" if a.no_pytorch_path else f"{'PyTorch-path ms':>16} {'speedup':>8} {'kernel gain':>12} ")
          + f"{'HF CPU ms':>10} {'dsalite CPU ms':>15} {'CPU speedup':>12} {'HF peak GB':>11} {'dsalite peak GB':>16}")
    for S in (int(s) for s in a.seqs.split(",")):
        r = {}
        for which in runs:  # "pytorch": dsalite with its kernels off
            env = dict(os.environ, DSALITE_KERNELS="0") if which == "pytorch" else None
            out = subprocess.run([sys.executable, __file__, "--one", "hf" if which == "hf" else "dsalite", str(S),
                                  "--reps", str(a.reps), "--threads", str(a.threads), "--chunk", str(a.chunk),
                                  "--model", a.model], capture_output=True, text=True, check=True, env=env)
            r[which] = json.loads(out.stdout.strip().splitlines()[-1])
        h, d = r["hf"], r["dsalite"]
        row = f"{S:>6} {h['seconds'] * 1e3:>10.1f} {d['seconds'] * 1e3:>11.1f} {h['seconds'] / d['seconds']:>7.2f}x "
        if "pytorch" in r:
            p = r["pytorch"]
            row += (f"{p['seconds'] * 1e3:>16.1f} {h['seconds'] / p['seconds']:>7.2f}x "
                    f"{p['seconds'] / d['seconds']:>11.2f}x ")
        print(row + f"{h['cpu_seconds'] * 1e3:>10.1f} {d['cpu_seconds'] * 1e3:>15.1f} "
              f"{h['cpu_seconds'] / d['cpu_seconds']:>11.2f}x {h['peak_gb']:>11.2f} {d['peak_gb']:>16.2f}", flush=True)


if __name__ == "__main__":
    main()
