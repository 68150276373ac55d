"""Decode step latency vs context length: dsalite's engine vs HF transformers' DynamicCache, same weights.

Bench-small GLM config (hf-reference §10, latent cache) or, with --model v4, the bench DeepSeek-V4 config (window +
compressor cache), fp32, batch 1, one thread. For each context T both models first prefill
T tokens (not timed), then run `--steps` single-token decode steps; the median step time is reported.

    .venv/bin/python bench/decode.py [--model glm|v4] [--contexts 512,2048,4096,8192] [--steps 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import MODELS, dsalite_from_hf, hf_model  # noqa: E402

from dsalite.inference.engine import Runner, new_cache  # noqa: E402


@torch.no_grad()
def dsalite_steps(model, ids, steps: int, clock=time.perf_counter) -> list[float]:
    T = ids.shape[1]
    runner = Runner(model, new_cache(model, 1, T + steps + 1), prefill_chunk=2048)
    runner.feed(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(T)[None])
    tok, ts = ids[:, -1:], []
    for i in range(steps):
        t0 = clock()
        logits, _ = runner.feed(tok, torch.ones(1, 1, dtype=torch.bool), torch.tensor([[T + i]]))
        tok = logits[:, -1].argmax(-1, keepdim=True)
        ts.append(clock() - t0)
    return ts


@torch.no_grad()
def hf_steps(model, ids, steps: int, clock=time.perf_counter) -> list[float]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok, ts = out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        t0 = clock()
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        ts.append(clock() - t0)
    return ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="glm",
                    help="architecture: glm (GLM-5 DSA, latent cache, default) or v4 (DeepSeek-V4, window + "
                         "compressor cache)")
    ap.add_argument("--contexts", default="512,2048,4096,8192", help="context lengths (default 512,2048,4096,8192)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per context, median reported (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time steps with the process's CPU time instead of wall-clock (steadier when other "
                         "processes share the cores; with 1 thread it equals the wall time of an idle machine)")
    ap.add_argument("--skip-hf-above", type=int, default=8192, help="skip HF for longer contexts (default 8192)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.cpu_time else time.perf_counter
    bench, title = MODELS[a.model]
    hf = hf_model(bench)
    ours = dsalite_from_hf(hf)
    print(f"decode, {title}, fp32, batch 1, {a.threads} thread(s), median of {a.steps} steps"
          + (", CPU time" if a.cpu_time else ""))
    print(f"{'context':>8} {'HF ms/token':>12} {'dsalite ms/token':>17} {'speedup':>8}")
    warm = torch.randint(0, bench["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    dsalite_steps(ours, warm, 2), hf_steps(hf, warm, 2)  # the first forwards are slow (lazy init), untimed
    base = None
    for T in (int(x) for x in a.contexts.split(",")):
        ids = torch.randint(0, bench["vocab_size"], (1, T), generator=torch.Generator().manual_seed(T))
        d = statistics.median(dsalite_steps(ours, ids, a.steps, clock)) * 1e3
        base = base or d
        if T <= a.skip_hf_above:
            h = statistics.median(hf_steps(hf, ids, a.steps, clock)) * 1e3
            print(f"{T:>8} {h:>12.2f} {d:>17.2f} {h / d:>7.1f}x", flush=True)
        else:
            print(f"{T:>8} {'-':>12} {d:>17.2f} {'-':>8}", flush=True)
    print(f"dsalite step time at the longest context / shortest: {d / base:.2f}x")


if __name__ == "__main__":
    main()
