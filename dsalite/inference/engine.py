"""Generation: chunked prefill into the model's cache (`cache_class`), then batched decode steps, MTP speculation.

Layers (nano-vllm style, kept small): `Batch` is the sequence state (ids, finished flags, positions), the `Runner`
(runner.py) turns tokens into logits through the model and the cache, and `generate()` loops decode steps over it
(speculative.py drives the same runner for MTP speculation). Sequences of different lengths are left-padded;
padding never becomes a key. Prefill runs in chunks so peak memory stays bounded for long prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsalite.inference.runner import Runner, Stats, cache_class, left_pad, new_cache
from dsalite.inference.sampling import SamplingParams, sample
from dsalite.inference.speculative import mtp_generate


@dataclass
class Batch:
    """Per-sequence state: tokens so far, next position, finished flags."""
    ids: list[list[int]]
    next_pos: torch.Tensor  # [B]
    finished: torch.Tensor  # [B] bool
    new: list[list[int]] = field(default_factory=list)


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,  # [B, S], left-padded when the prompts differ in length
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,  # [B, S] 1 = token, 0 = left padding
    seed: int | None = None,
    speculative: str | None = None,  # None | "mtp"
    prefill_chunk: int = 2048,
    on_token: Callable[[int, int], None] | None = None,  # called (sequence, token) as tokens are produced
    should_stop: Callable[[int, list[int]], bool] | None = None,  # (sequence, new ids) → stop that sequence
    stats: Stats | None = None,
    compile: bool = False,  # torch.compile the decode steps: seconds to compile, then faster steps
) -> torch.Tensor:
    """Input ids followed by up to max_new_tokens new ids per row (rows that stop early are padded with their
    last id), like HF `generate`. Greedy when temperature == 0."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length >= 1], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    V = model.cfg.vocab_size
    if int(input_ids.max()) >= V or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {V})")
    params = SamplingParams(temperature, top_k, top_p)
    gen = torch.Generator(input_ids.device).manual_seed(seed) if seed is not None else None
    stats = stats if stats is not None else Stats()
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
    kind = cache_class(model.cfg)
    if speculative == "mtp" and not (kind.rewinds or hasattr(kind, "snapshot")):
        raise ValueError(f"speculative='mtp' needs a cache that rewinds rejected drafts; {kind.__name__} cannot "
                         f"({model.cfg.model_type}); use speculative=None")
    if speculative == "mtp":
        return mtp_generate(model, input_ids, max_new_tokens, params, _eos_set(eos_token_id), attention_mask,
                            gen, prefill_chunk, on_token, should_stop, stats, compile)

    B, S = input_ids.shape
    valid, positions = left_pad(input_ids, attention_mask)
    cache = new_cache(model, B, S + max_new_tokens)
    stats.cache_bytes_per_token = cache.bytes_per_token()
    runner = Runner(model, cache, prefill_chunk, compile)
    eos = _eos_set(eos_token_id)

    t0 = time.perf_counter()
    logits, _ = runner.feed(input_ids, valid, positions)
    stats.prefill_tokens += int(valid.sum())
    stats.prefill_s += time.perf_counter() - t0

    dev = input_ids.device
    batch = Batch([[] for _ in range(B)], positions[:, -1] + 1, torch.zeros(B, dtype=torch.bool, device=dev))
    out = input_ids.clone()
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        tok = sample(logits[:, -1], params, gen)  # [B]
        tok = torch.where(batch.finished, out[:, -1], tok)
        for b in range(B):
            if batch.finished[b]:
                continue
            t = int(tok[b])
            batch.ids[b].append(t)
            stats.decode_tokens += 1
            if on_token:
                on_token(b, t)
            if t in eos or (should_stop is not None and should_stop(b, batch.ids[b])):
                batch.finished[b] = True
        out = torch.cat([out, tok[:, None]], 1)
        if bool(batch.finished.all()) or step == max_new_tokens - 1:
            break
        logits, _ = runner.feed(tok[:, None], torch.ones(B, 1, dtype=torch.bool, device=dev),
                                   batch.next_pos[:, None])
        batch.next_pos += 1
    stats.decode_s += time.perf_counter() - t0
    return out
