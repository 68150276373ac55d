"""The C++ kernels against their PyTorch twins, and the register-blocking sweep that picks each target's defaults.

Without --sweep: the calibration's cases (`dsalite.kernels.calibrate`: indexer selection and sparse attention, forward
and forward + backward, at bench-small and MLA widths) on one kernel build, kernel against PyTorch twin, one thread,
best of --reps calls, the fastest of --rounds rounds taking turns.

With --sweep: every register blocking in the grid below is built for the target (`-DDSA_<NAME>=n`, see the top of
`dsalite/kernels/dsa_select.cpp`) and timed on the cases it affects, all builds taking turns in one process; the
table gives each one's time over the default's (below 1: faster than the default). The defaults in the source are
the winners of this sweep on the machines at hand; run it on a new kind of CPU and change them there when a blocking
wins clearly on every case.

    .venv/bin/python bench/kernels.py [--isa native|avx512|avx2|portable] [--sweep [--groups score,dot]] [--rounds 5]
                                   [--reps 5]

--isa names the kernel target only; for twins held to AVX2 as well (an AVX2-only CPU's PyTorch), run it under the
stand-in environment of the other benches: `bench/prefill.py --isa avx2` sets it, or set its variables by hand
(`bench/common.py`, STANDINS).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header  # noqa: E402

from dsalite import kernels  # noqa: E402
from dsalite.kernels import calibrate  # noqa: E402

# blocking name -> (the cases it changes, the candidate values as multiples of the vector width or plain counts)
GRID = {
    "score": ("select", lambda vw: [dict(SCORE_KEYS=k, SCORE_HEADS=h) for k in (vw, 2 * vw, 4 * vw, 8 * vw)
                                    if k <= 64 for h in (1, 2, 3, 4)]),
    "dot": ("attention", lambda vw: [dict(DOT_ACC=a, DOT_HEADS=h) for a in (4, 8, 12, 16) for h in (1, 2, 4)
                                     if h <= a and a % h == 0]),
    "rows": ("attention", lambda vw: [dict(ROW_VECS=v, ROW_HEADS=h) for v in (1, 2, 4) for h in (1, 2, 4, 8)]),
    "outer": ("forward + backward", lambda vw: [dict(OUTER_HEADS=h) for h in (1, 2, 4, 8)]),
}


def build(isa: str, overrides: dict) -> ctypes.CDLL:
    """The kernels for `isa` with some of the blocking overridden (cached like every build)."""
    extra = tuple(f"-DDSA_{k}={v}" for k, v in sorted(overrides.items()))
    return kernels._declare(ctypes.CDLL(str(kernels._build(kernels.compiler(), isa, extra))))


def compare(isa: str, rounds: int, reps: int) -> None:
    lib = kernels.library(isa)
    runs = calibrate.cases()
    blockings = calibrate.scoring_blockings(lib)
    t = calibrate.in_turns({"default": (lib, 0), "alternative": (lib, 1), "pytorch": None}, runs, rounds, reps,
                           budget=float("inf"))
    print(f"\nbuild {kernels.build_info(lib)}; kernel columns: indexer scoring blocking {blockings[0]} (default) and "
          f"{blockings[1]} (alternative; the other cases do not use it)")
    print(f"{'case':<48}{'kernel ms':>11}{'alt. ms':>9}{'PyTorch ms':>12}{'speedup':>9}")
    for name in runs:
        k, a, p = t["default", name], t["alternative", name], t["pytorch", name]
        print(f"{name:<48}{k * 1e3:>11.3f}{a * 1e3:>9.3f}{p * 1e3:>12.3f}{p / min(k, a):>8.2f}x")
    print("speedup: PyTorch over the faster blocking")
    lib.dsa_set_score_blocking(0)


def sweep(isa: str, rounds: int, reps: int, groups: list[str]) -> None:
    default = kernels.library(isa)
    vw = int(kernels.build_info(default).split()[1].removeprefix("vw="))
    print(f"\ndefault build {kernels.build_info(default)}")
    all_runs = calibrate.cases()
    for group in groups:
        cases_of, values = GRID[group]
        runs = {name: fn for name, fn in all_runs.items() if cases_of in name}
        contenders = {"default": (default, 0)}  # every build on its default scoring blocking
        for overrides in values(vw):
            label = " ".join(f"{k.lower()}={v}" for k, v in overrides.items())
            try:
                contenders[label] = (build(isa, overrides), 0)
            except Exception as e:  # a blocking the compiler refuses (a static_assert) is left out, said so
                print(f"  {label}: not built ({str(getattr(e, 'stderr', e)).strip().splitlines()[-1][:100]})")
        t = calibrate.in_turns(contenders, runs, rounds, reps, budget=float("inf"))
        names = list(runs)
        print(f"\n{group}: time / default's (below 1 is faster); default ms: "
              + ", ".join(f"{n} {t['default', n] * 1e3:.3f}" for n in names))
        print(f"{'blocking':<34}{'build':<44}" + "".join(f"{i:>8}" for i in range(1, len(names) + 1)) + f"{'worst':>8}")
        for c, (lib, _) in contenders.items():
            ratios = [t[c, n] / t["default", n] for n in names]
            print(f"{c:<34}{kernels.build_info(lib).split(' ', 2)[2]:<44}"
                  + "".join(f"{r:>8.3f}" for r in ratios) + f"{max(ratios):>8.3f}")
        print("  columns: " + "; ".join(f"{i} {n}" for i, n in enumerate(names, 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=["native", *kernels.ISAS], default="native",
                    help="the kernel target to build and time (default: the best this CPU runs, or "
                         "DSALITE_KERNEL_ISA when set)")
    ap.add_argument("--sweep", action="store_true",
                    help="time every register blocking of the grid against the default instead")
    ap.add_argument("--groups", default=",".join(GRID),
                    help=f"with --sweep: the blockings to sweep, comma-separated (default {','.join(GRID)})")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of turns; the fastest round is reported")
    ap.add_argument("--reps", type=int, default=5, help="calls per turn; the fastest is kept")
    args = ap.parse_args()
    isa = kernels.requested_isa() if args.isa == "native" else args.isa
    torch.set_num_threads(1)
    header(f"kernels, target {isa}, 1 thread, best of {args.reps} calls in each of {args.rounds} rounds")
    if args.sweep:
        groups = args.groups.split(",")
        if unknown := set(groups) - set(GRID):
            ap.error(f"--groups: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(GRID)}")
        sweep(isa, args.rounds, args.reps, groups)
    else:
        compare(isa, args.rounds, args.reps)


if __name__ == "__main__":
    main()
