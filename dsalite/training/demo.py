"""The end of `make demo`: a greedy sample from the trained model and a map of everything the run wrote.

    python -m dsalite.training.demo OUT [--prompt TEXT] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Sample from a `dsalite train` output directory and list its files.")
    ap.add_argument("out", help="the training output directory (holds hf/, metrics.jsonl, loss.png)")
    ap.add_argument("--prompt", default="ROMEO.\n", help="text to continue (default 'ROMEO.\\n')")
    ap.add_argument("--tokens", type=int, default=60, help="new tokens to generate greedily (default 60)")
    a = ap.parse_args(argv)

    from dsalite.checkpoint.pretrained import from_pretrained
    from dsalite.training.data import load_tokenizer
    from dsalite.training.trainer import greedy_sample

    hf = os.path.join(a.out, "hf")
    torch.set_num_threads(1)
    model = from_pretrained(hf)
    text = greedy_sample(model, load_tokenizer(hf), a.prompt, a.tokens)
    with open(os.path.join(a.out, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    first, last = recs[0], recs[-1]
    print(f"\ntrained {last['step']} steps, {last['tokens']:,} tokens: loss {first['loss']:.3f} -> {last['loss']:.3f}"
          f" (CE {first['ce']:.3f} -> {last['ce']:.3f})")
    print(f"sample (greedy, {a.tokens} tokens):\n----\n{text}\n----")
    print("written:")
    for label, rel in (("HF checkpoint + tokenizer", "hf"), ("metrics (one JSON per step)", "metrics.jsonl"),
                       ("loss curves", "loss.png"), ("TensorBoard logs", "tensorboard"),
                       ("training checkpoints", "checkpoints")):
        print(f"  {label:<28} {os.path.join(a.out, rel)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
