"""MTP speculative decoding: speedup and acceptance on a trained checkpoint (default: the `make demo` model).

--model v4 first trains a tiny DeepSeek-V4 (preset `deepseek-v4-tiny`: sliding / CSA / HCA layers, hash routing,
4 mHC streams, one MTP layer) briefly on the built-in Shakespeare corpus with `dsalite train` (CE + MTP loss,
`--train-steps`, kept in out/bench-v4-mtp and reused), then measures it the same way.

Runs greedy decoding of the same prompts plainly and with `speculative="mtp"` in one process, checks that the
outputs are identical, and prints decode tokens/s for both, the speedup and the MTP acceptance rate.

With --compile both runs use the compiled engine (`compile=True`); a warm-up generation per mode compiles first and
is not timed.

    .venv/bin/python bench/speculative.py [PATH] [--new 128] [--threads 1] [--compile]
    .venv/bin/python bench/speculative.py --model v4 [--train-steps 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

V4_OUT = "out/bench-v4-mtp"
V4_RECIPE = """
[model]
preset = "deepseek-v4-tiny"
seed = 0
init_std = 0.02

[data]
vocab_size = 512
seq_len = 128
batch_size = 8

[train]
stage = "pretrain"
max_steps = {steps}
optimizer = "adamw"
lr = 3e-3
warmup_steps = 20
mtp_coeff = 0.3
save_every = {steps}
keep_last = 1
threads = 1
"""

PROMPTS = ["ROMEO.\n", "KING HENRY.\nWhat", "HAMLET.\nTo be", "First Citizen.\nBefore we proceed",
           "MACBETH.\nIs this a dagger", "JULIET.\nO Romeo"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default=None, help="checkpoint with MTP weights and tokenizer.json "
                    "(default out/demo/hf, written by `make demo`; with --model v4, out/bench-v4-mtp/hf)")
    ap.add_argument("--model", choices=["checkpoint", "v4"], default="checkpoint",
                    help="checkpoint: PATH as it is; v4: train a tiny DeepSeek-V4 with MTP first (unless PATH exists)")
    ap.add_argument("--train-steps", type=int, default=200, help="--model v4: training steps (default 200)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per prompt (default 128)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode steps of both runs")
    a = ap.parse_args()
    import dsalite
    from dsalite.inference.runner import Stats
    from tokenizers import Tokenizer

    if a.path is None:
        a.path = os.path.join(V4_OUT, "hf") if a.model == "v4" else "out/demo/hf"
    if a.model == "v4" and not os.path.exists(os.path.join(a.path, "config.json")):
        train_v4(os.path.dirname(a.path), a.train_steps)
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


def train_v4(out: str, steps: int) -> None:
    """`dsalite train` of the tiny V4 preset (CE + MTP) for `steps` steps into out/ (its HF export in out/hf)."""
    from dsalite.cli import main as cli

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(V4_RECIPE.format(steps=steps))
    try:
        if cli(["train", f.name, "--out", out]) != 0:
            raise SystemExit(f"training the tiny V4 into {out} failed")
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    main()
