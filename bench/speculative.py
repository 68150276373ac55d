"""MTP speculative decoding: speedup and acceptance on a trained checkpoint (default: the `make demo` model).

Runs greedy decoding of the same prompts plainly and with `speculative="mtp"` in one process, checks that the
outputs are identical, and prints decode tokens/s for both, the speedup and the MTP acceptance rate.

With --compile both runs use the compiled engine (`compile=True`); a warm-up generation per mode compiles first and
is not timed.

    .venv/bin/python bench/speculative.py [PATH] [--new 128] [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

PROMPTS = ["ROMEO.\n", "KING HENRY.\nWhat", "HAMLET.\nTo be", "First Citizen.\nBefore we proceed",
           "MACBETH.\nIs this a dagger", "JULIET.\nO Romeo"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default="out/demo/hf", help="checkpoint with MTP weights and tokenizer.json "
                    "(default out/demo/hf, written by `make demo`)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per prompt (default 128)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode steps of both runs")
    a = ap.parse_args()
    import dsalite
    from dsalite.inference.runner import Stats
    from tokenizers import Tokenizer

    torch.set_num_threads(a.threads)
    model = dsalite.from_pretrained(a.path).eval()
    tok = Tokenizer.from_file(os.path.join(a.path, "tokenizer.json"))
    plain_tps, spec_tps, acc = [], [], Stats()
    if a.compile:
        warm = torch.tensor([tok.encode(PROMPTS[0]).ids])
        for mode in (None, "mtp"):
            dsalite.generate(model, warm, max_new_tokens=8, speculative=mode, compile=True)
    for p in PROMPTS:
        ids = torch.tensor([tok.encode(p).ids])
        runs = {}
        for mode in (None, "mtp"):
            st = Stats()
            runs[mode] = dsalite.generate(model, ids, max_new_tokens=a.new, speculative=mode, stats=st,
                                          compile=a.compile)
            (spec_tps if mode else plain_tps).append(st.decode_tokens / st.decode_s)
            if mode:
                acc.drafted += st.drafted
                acc.accepted += st.accepted
        assert torch.equal(runs[None], runs["mtp"]), f"speculative output differs from plain greedy for {p!r}"
    plain, spec = statistics.median(plain_tps), statistics.median(spec_tps)
    print(f"{a.path}: {len(PROMPTS)} prompts × {a.new} greedy tokens, {a.threads} thread(s)"
          f"{', compiled' if a.compile else ''}; outputs identical")
    print(f"plain decode        {plain:8.1f} tok/s (median over prompts)")
    print(f"MTP speculative     {spec:8.1f} tok/s")
    print(f"speedup             {spec / plain:8.2f}x   acceptance {acc.acceptance * 100:.1f}% "
          f"({acc.accepted}/{acc.drafted})")


if __name__ == "__main__":
    main()
