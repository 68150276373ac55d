"""The end of `make demo`: a greedy sample from the trained model (the inference engine, with MTP speculative decoding)
and a map of everything the run wrote.

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

    import dsalite
    from dsalite.training.data import SPECIALS, load_tokenizer

    hf = os.path.join(a.out, "hf")
    torch.set_num_threads(1)
    model = dsalite.from_pretrained(hf).eval()
    tok = load_tokenizer(hf)
    ids = torch.tensor([[tok.token_to_id(SPECIALS[0])] + tok.encode(a.prompt).ids])
    with torch.no_grad():
        out = dsalite.generate(model, ids, max_new_tokens=a.tokens, eos_token_id=tok.token_to_id(SPECIALS[1]),
                               speculative="mtp")
    text = tok.decode(out[0, 1:].tolist())
    with open(os.path.join(a.out, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    first, last = recs[0], recs[-1]
    print(f"\ntrained {last['step']} steps, {last['tokens']:,} tokens: loss {first['loss']:.3f} -> {last['loss']:.3f}"
          f" (CE {first['ce']:.3f} -> {last['ce']:.3f})")
    print(f"sample (greedy, MTP speculative decoding, up to {a.tokens} new tokens):\n----\n{text}\n----")
    print("written:")
    for label, rel in (("HF checkpoint + tokenizer", "hf"), ("metrics (one JSON per step)", "metrics.jsonl"),
                       ("loss curves", "loss.png"), ("TensorBoard logs", "tensorboard"),
                       ("training checkpoints", "checkpoints")):
        print(f"  {label:<28} {os.path.join(a.out, rel)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
