"""Text in, text out around the engine: the checkpoint's tokenizer.json (HF `tokenizers`), its chat template (jinja2,
sandboxed), stop strings, streaming to a terminal, and batches of prompts from a file."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

from dsalite.checkpoint.io import read_chat_template


class TokenizerNotFound(FileNotFoundError):
    pass


@dataclass
class TextModel:
    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str | None
    bos: str | None
    eos: str | None
    eos_ids: list[int]

    @classmethod
    def load(cls, path: str, eos_ids: list[int] | None = None) -> "TextModel":
        from tokenizers import Tokenizer

        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise TokenizerNotFound(f"{tj} not found: pass token ids with --prompt-ids, or add a tokenizer.json")
        tok = Tokenizer.from_file(tj)
        conf = _read_json(os.path.join(path, "tokenizer_config.json"))
        bos, eos = _token_str(conf.get("bos_token")), _token_str(conf.get("eos_token"))
        ids = list(eos_ids or [])
        if not ids:
            ids = checkpoint_eos_ids(path)
            if eos is not None and tok.token_to_id(eos) is not None and tok.token_to_id(eos) not in ids:
                ids.append(tok.token_to_id(eos))
        return cls(tok, read_chat_template(path, conf), bos, eos, ids)

    def render(self, prompt: str, chat: bool) -> str:
        if not chat or self.chat_template is None:
            return prompt
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
            bos_token=self.bos or "", eos_token=self.eos or "",
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def read_prompts(path: str) -> list[str]:
    """One prompt per line; a .jsonl file holds objects with a "prompt" field."""
    with open(path) as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    if path.endswith(".jsonl"):
        out = []
        for n, ln in enumerate(lines, 1):
            try:
                out.append(json.loads(ln)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with a \"prompt\" field") from None
        return out
    return lines


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def run(args) -> int:
    """`dsalite generate`: see cli.py for the options."""
    import dsalite
    from dsalite.inference.runner import Stats

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = dsalite.from_pretrained(args.path, dtype=dtype)
    if args.prompt_ids:
        prompts_ids = [[int(x) for x in args.prompt_ids.split(",")]]
        text = None
        eos = args.eos_id or checkpoint_eos_ids(args.path)
    else:
        text = TextModel.load(args.path, args.eos_id)
        prompts = ([args.prompt] if args.prompt is not None else []) + (read_prompts(args.prompts_file)
                                                                         if args.prompts_file else [])
        if not prompts:
            raise ValueError("nothing to generate from: give --prompt, --prompts-file or --prompt-ids")
        prompts_ids = [text.encode(text.render(p, not args.no_chat)) for p in prompts]
        eos = text.eos_ids
        if any(not p for p in prompts_ids):
            raise ValueError("a prompt encodes to zero tokens")
    stats = Stats()
    B = len(prompts_ids)
    L = max(map(len, prompts_ids))
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, p in enumerate(prompts_ids):
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
    stream = B == 1 and not args.no_stream and text is not None
    shown = [""]

    def on_token(b, t, new=[]):  # noqa: B006 — per-call accumulator for the streamed row
        if stream:
            new.append(t)
            s, _ = cut_at_stop(text.decode(new), args.stop or [])
            sys.stdout.write(s[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = s

    def should_stop(b, new_ids):
        return bool(args.stop) and text is not None and cut_at_stop(text.decode(new_ids), args.stop)[1]

    out = dsalite.generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, eos_token_id=eos or None, attention_mask=mask,
                           seed=args.seed, speculative=None if args.speculative == "none" else args.speculative,
                           prefill_chunk=args.prefill_chunk, on_token=on_token, should_stop=should_stop, stats=stats,
                           compile=args.compile)
    if stream:
        print()
    else:
        for b in range(B):
            new = out[b, L:].tolist()
            if text is None:
                print(" ".join(map(str, new)))
            else:
                s, _ = cut_at_stop(text.decode(new), args.stop or [])
                print(("" if B == 1 else f"[{b}] ") + s)
    print(stats.summary(), file=sys.stderr)
    return 0


def _read_json(p: str) -> dict:
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)


def checkpoint_eos_ids(path: str) -> list[int]:
    """EOS ids from generation_config.json, else config.json."""
    gen = _read_json(os.path.join(path, "generation_config.json"))
    e = gen.get("eos_token_id", _read_json(os.path.join(path, "config.json")).get("eos_token_id"))
    return [e] if isinstance(e, int) else list(e or [])


def _token_str(t) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t
