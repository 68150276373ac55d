"""Decode step latency vs context length: dsalite's engine vs HF transformers' DynamicCache, same weights.

Bench-small GLM config (hf-reference §10, latent cache) or, with --model v4, the bench DeepSeek-V4 config (window +
compressor cache), fp32, batch 1, one thread. For each context T the models first prefill
T tokens (not timed), then run `--steps` single-token greedy decode steps, taking turns in blocks of 8 steps so that
all see the same load; the median step time is reported. dsalite is timed on both of its paths in the same process,
interleaved with the rest: its C++ kernels and their PyTorch twins (`kernels.forced`), eager and compiled; the
speedups over HF are those of the path this machine chose (`dsalite env`), and the last columns give kernel / PyTorch
step-time ratios (below 1: the kernels are faster). dsalite's logits are checked against transformers' on a short
prompt before anything is timed.

    .venv/bin/python bench/decode.py [--model glm|v4] [--contexts 512,2048,4096,8192] [--steps 16] [--isa native|avx2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import MODELS, add_machine_arguments, dsalite_from_hf, header, hf_model, use_machine  # noqa: E402

from dsalite import kernels  # noqa: E402
from dsalite.inference.runner import Runner, new_cache  # noqa: E402


def on_path(kernel: bool | None):
    """The block runs on the kernels (True), on the PyTorch twins (False) or on this machine's choice (None)."""
    return contextlib.nullcontext() if kernel is None else kernels.forced(kernel)


_RUNNERS: dict = {}


def runner_class(kernel: bool | None) -> type:
    """A Runner subclass per path whose `_forward` has a code object of its own. torch.compile keeps its graphs per
    code object; were both paths' graphs in one list, the one looked up second would pay the first one's failing
    guard checks on every step (0.1–0.3 ms on bench-small), a cost no process running one path pays."""
    if kernel not in _RUNNERS:
        def _forward(self, *args):
            return Runner._forward(self, *args)

        code = _forward.__code__.replace(co_name=f"_forward_{kernel}")
        _RUNNERS[kernel] = type(f"Runner_{kernel}", (Runner,), {"_forward": types.FunctionType(code, globals())})
    return _RUNNERS[kernel]


def dsalite_stepper(model, ids, steps: int, compile: bool = False, kernel: bool | None = None):
    """Prefill ids (untimed); return one greedy decode step of the engine as a function, on the given path."""
    T = ids.shape[1]
    with on_path(kernel), torch.no_grad():
        runner = runner_class(kernel)(model, new_cache(model, 1, T + steps + 4), prefill_chunk=2048, compile=compile)
        logits, _ = runner.feed(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(T)[None])
    state = [logits[:, -1].argmax(-1, keepdim=True), T]

    @torch.no_grad()
    def step():
        with on_path(kernel):
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
    """Median ms per step of each stepper. The steppers take turns in blocks of `block` consecutive steps, starting each
    round with the next one, so that all see the same load and each still decodes as a real generation loop does: step
    after step, its weights and cache warm (interleaving single steps would evict them before every step and time a
    cold start instead)."""
    ts = [[] for _ in steppers]
    n = len(steppers)
    for r in range(0, steps, block):
        for i in [(r // block + j) % n for j in range(n)]:  # each round starts with the next one: no fixed order
            f = steppers[i]
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
                    help="time dsalite on this machine's chosen path only (not both the kernels and their PyTorch "
                         "twins)")
    add_machine_arguments(ap)
    a = ap.parse_args()
    use_machine(a)
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.cpu_time else time.perf_counter
    bench, title = MODELS[a.model]
    modes = [False] if a.no_compile else [False, True]  # compile
    contexts = [int(x) for x in a.contexts.split(",")]
    header(f"decode, {title}, fp32, batch 1, {a.threads} thread(s), median of {a.steps} steps"
           + (", CPU time" if a.cpu_time else ""))
    chosen = kernels.decision()["use"]
    paths = [chosen] if a.no_pytorch_path else [True, False]  # kernels, PyTorch twins
    if True in paths:
        try:
            kernels.library()
        except (OSError, ValueError) as e:
            print(f"no kernel build here ({e}): timing the PyTorch path only")
            paths = [False]
    variants = [(k, c) for k in paths for c in modes]  # (kernel path, compiled)
    name = lambda k, c: ("kernels" if k else "PyTorch") + (" compiled" if c else " eager")  # noqa: E731
    hf = hf_model(bench)
    ours = dsalite_from_hf(hf)
    print(f"chosen path on this machine: {'kernels' if chosen else 'PyTorch twins'}; ms per token:")
    print(f"{'context':>8} {'HF':>9}" + "".join(f" {name(k, c):>17}" for k, c in variants)
          + f" {'speedup eager':>14}" + (f" {'compiled':>9}" if True in modes else "")
          + ("" if len(paths) < 2 else f" {'kern/PyT eager':>15}" + (f" {'compiled':>9}" if True in modes else "")))
    warm = torch.randint(0, bench["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    step_times([dsalite_stepper(ours, warm, 2, kernel=k) for k in paths] + [hf_stepper(hf, warm, 2)], 2, clock)
    base = None
    for T in contexts:
        ids = torch.randint(0, bench["vocab_size"], (1, T), generator=torch.Generator().manual_seed(T))
        steppers = [dsalite_stepper(ours, ids, a.steps, compile=c, kernel=k) for k, c in variants]
        with_hf = T <= a.skip_hf_above
        if with_hf:
            steppers.append(hf_stepper(hf, ids, a.steps))
        times = step_times(steppers, a.steps, clock)
        t = dict(zip(variants, times))
        h = times[-1] if with_hf else None
        row = f"{T:>8} {h or 0:>9.2f}" + "".join(f" {t[v]:>17.2f}" for v in variants)
        row += "".join(f" {(h / t[(chosen if chosen in paths else paths[0], c)] if h else 0):>{w}.1f}x"
                       for c, w in zip(modes, (13, 8)))
        if len(paths) == 2:
            row += "".join(f" {t[(True, c)] / t[(False, c)]:>{w}.2f}" for c, w in zip(modes, (15, 9)))
        print(row, flush=True)
        best = min(t[(chosen if chosen in paths else paths[0], c)] for c in modes)
        base = base or best
    print(f"dsalite step time (chosen path, fastest mode) at the longest context / shortest: {best / base:.2f}x")


if __name__ == "__main__":
    main()
