"""Decode step latency vs context length: dsalite's engine vs HF transformers' DynamicCache, same weights.

Bench-small GLM config (hf-reference §10, latent cache) or, with --model v4, the bench DeepSeek-V4 config (window +
compressor cache), fp32, batch 1, one thread. For each context T the models first prefill
T tokens (not timed), then run `--steps` single-token greedy decode steps, taking turns in blocks of 8 steps so that
all see the same load; the median step time is reported. dsalite runs on the paths this machine chose (its C++
kernels where they are faster); a second process times it again with DSALITE_KERNELS=0 (the PyTorch twins), printed
beside it. dsalite's logits are checked against transformers' on a short prompt before anything is timed.

    .venv/bin/python bench/decode.py [--model glm|v4] [--contexts 512,2048,4096,8192] [--steps 16] [--isa native|avx2]
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
from common import MODELS, add_isa_argument, dsalite_from_hf, header, hf_model, use_isa  # noqa: E402

from dsalite.inference.runner import Runner, new_cache  # noqa: E402


def dsalite_stepper(model, ids, steps: int, compile: bool = False):
    """Prefill ids (untimed); return one greedy decode step of the engine as a function."""
    T = ids.shape[1]
    runner = Runner(model, new_cache(model, 1, T + steps + 4), prefill_chunk=2048, compile=compile)
    with torch.no_grad():
        logits, _ = runner.feed(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(T)[None])
    state = [logits[:, -1].argmax(-1, keepdim=True), T]

    @torch.no_grad()
    def step():
        logits, _ = runner.feed(state[0], torch.ones(1, 1, dtype=torch.bool), torch.tensor([[state[1]]]))
        state[:] = [logits[:, -1].argmax(-1, keepdim=True), state[1] + 1]

    for _ in range(2):  # untimed: the compiled runner compiles on its first steps
        step()
    return step


def hf_stepper(model, ids, steps: int):
    """Same for HF: prefill into a DynamicCache, then one greedy step per call."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    state = [out.logits[:, -1:].argmax(-1)]

    @torch.no_grad()
    def step():
        state[0] = model(state[0], past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    return step


def step_times(steppers, steps: int, clock, block: int = 8) -> list[float]:
    """Median ms per step of each stepper. The steppers take turns in blocks of `block` consecutive steps, so that
    all see the same load and each still decodes as a real generation loop does: step after step, its weights and
    cache warm (interleaving single steps would evict them before every step and time a cold start instead)."""
    ts = [[] for _ in steppers]
    for r in range(0, steps, block):
        for i, f in enumerate(steppers):
            for _ in range(min(block, steps - r)):
                t0 = clock()
                f()
                ts[i].append(clock() - t0)
    return [statistics.median(t) * 1e3 for t in ts]


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
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the compiled runner (Runner(compile=True); its first steps compile for seconds and "
                         "are not timed)")
    ap.add_argument("--skip-hf-above", type=int, default=8192, help="skip HF for longer contexts (default 8192)")
    ap.add_argument("--no-pytorch-path", action="store_true",
                    help="skip the second process timing dsalite with DSALITE_KERNELS=0 (its PyTorch paths)")
    add_isa_argument(ap)
    ap.add_argument("--dsalite-only", action="store_true", help=argparse.SUPPRESS)  # the second process: JSON out
    a = ap.parse_args()
    use_isa(a.isa)
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.cpu_time else time.perf_counter
    bench, title = MODELS[a.model]
    compiled = not a.no_compile
    contexts = [int(x) for x in a.contexts.split(",")]
    if not a.dsalite_only:
        header(f"decode, {title}, fp32, batch 1, {a.threads} thread(s), median of {a.steps} steps"
               + (", CPU time" if a.cpu_time else ""))
    twin = {}
    if not a.dsalite_only and not a.no_pytorch_path:  # first, so its subprocess does not share the cores with ours
        args = [x for x in sys.argv[1:] if x != "--no-pytorch-path"]
        out = subprocess.run([sys.executable, __file__, *args, "--dsalite-only"], capture_output=True, text=True,
                             check=True, env=dict(os.environ, DSALITE_KERNELS="0"))
        twin = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    hf = hf_model(bench)
    ours = dsalite_from_hf(hf)
    if a.dsalite_only:
        del hf
    else:
        print(f"{'context':>8} {'HF ms/token':>12} {'dsalite ms/token':>17} {'speedup':>8}"
              + (f" {'compiled ms/token':>18} {'speedup':>8}" if compiled else "")
              + (f" {'PyTorch-path ms/token':>22}" + (f" {'compiled':>9}" if compiled else "") if twin else ""))
    warm = torch.randint(0, bench["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    step_times([dsalite_stepper(ours, warm, 2)] + ([] if a.dsalite_only else [hf_stepper(hf, warm, 2)]), 2, clock)
    base, record = None, {}
    for T in contexts:
        ids = torch.randint(0, bench["vocab_size"], (1, T), generator=torch.Generator().manual_seed(T))
        steppers = [dsalite_stepper(ours, ids, a.steps)]
        if compiled:
            steppers.append(dsalite_stepper(ours, ids, a.steps, compile=True))
        with_hf = T <= a.skip_hf_above and not a.dsalite_only
        if with_hf:
            steppers.append(hf_stepper(hf, ids, a.steps))
        times = step_times(steppers, a.steps, clock)
        d, c, h = times[0], times[1] if compiled else None, times[-1] if with_hf else None
        record[T] = [d, c]
        if a.dsalite_only:
            continue
        row = f"{T:>8} {h or 0:>12.2f} {d:>17.2f} {h / d if h else 0:>7.1f}x"
        if compiled:
            row += f" {c:>18.2f} {h / c if h else 0:>7.1f}x"
        if T in twin:
            row += f" {twin[T][0]:>22.2f}" + (f" {twin[T][1]:>9.2f}" if compiled else "")
        print(row, flush=True)
        best = c if compiled else d
        base = base or best
    if a.dsalite_only:
        print(json.dumps(record))
        return
    print(f"dsalite step time at the longest context / shortest: {best / base:.2f}x")

if __name__ == "__main__":
    main()
