"""Generation: chunked prefill into the model's cache (`cache_class`), then batched decode steps, MTP speculation.

Layers (nano-vllm style, kept small): `Batch` is the sequence state (ids, finished flags, positions), `Runner`
turns tokens into logits through the model and the cache (the only code that touches tensors of the model),
`step()` is one decode iteration, and `generate()` loops it. Sequences of different lengths are left-padded;
padding never becomes a key. Prefill runs in chunks so peak memory stays bounded for long prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsalite.inference.cache import LatentCache
from dsalite.inference.cache_v4 import V4Cache
from dsalite.inference.sampling import SamplingParams, sample


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    cache_bytes_per_token: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self) -> str:
        pf = self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0
        dc = self.decode_tokens / self.decode_s if self.decode_s else 0.0
        s = (f"prefill {self.prefill_tokens} tokens in {self.prefill_s:.2f}s ({pf:.1f} tok/s), "
             f"decode {self.decode_tokens} tokens in {self.decode_s:.2f}s ({dc:.1f} tok/s), "
             f"cache {self.cache_bytes_per_token} B/token")
        if self.drafted:
            s += f", MTP acceptance {self.acceptance * 100:.1f}% ({self.accepted}/{self.drafted})"
        return s


def cache_class(cfg):
    """The cache a model's decode needs: V4's sliding window + compressor state for mHC models, else latents."""
    return V4Cache if cfg.hyper else LatentCache


def new_cache(model, batch: int, capacity: int):
    return cache_class(model.cfg)(model.cfg, batch, capacity, dtype=next(model.parameters()).dtype)


# Calls of at most this many new tokens per sequence (decode steps, speculative verification) take the compiled
# path when the runner compiles; prefill chunks always run eagerly (they are GEMM-bound, and every length would
# otherwise be a new graph).
COMPILED_MAX_TOKENS = 8


def _skip_parameter_guards(entries) -> list[bool]:
    """torch.compile guard filter: drop the per-call checks of every parameter's dtype/shape/strides, that no module
    gained a hook, and that no attribute shadows a module's (a thousand checks, most of a decode step's guard
    time); keep the checks of config values, types and the cache, so another model or config still recompiles."""
    return [not (e.guard_type in ("EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT")
                 or e.guard_type == "TENSOR_MATCH" and isinstance(e.value, torch.nn.Parameter)) for e in entries]


def compiled(fn):
    """fn through torch.compile for few-token calls: shapes symbolic (the context grows every step), most guards on
    the model's modules dropped (`_skip_parameter_guards`), one-row matrix products decomposed."""
    return torch.compile(fn, dynamic=True, options={
        "guard_filter_fn": _skip_parameter_guards,
        # one-row matrix products become inductor's own fused multiply-reduce loops instead of library GEMV calls:
        # reading the weights is all a decode step's products do, and those loops stream them about twice as fast
        "post_grad_fusion_options": {"decompose_mm_pass": {}},
    })


class Runner:
    """Model + cache: prefill in chunks, decode one token (or a few) per sequence.

    compile=True runs the few-token calls through torch.compile (inductor): on small models a decode step is mostly
    per-operation overhead, which compiling fuses away, and one-row products stream their weights faster. The first
    compiled call takes seconds; later calls at any context length reuse the graph (the cached length is a symbol,
    not a constant)."""

    def __init__(self, model, cache: LatentCache, prefill_chunk: int = 2048, compile: bool = False):
        self.model, self.cache, self.chunk = model, cache, prefill_chunk
        self._few = compiled(self._forward) if compile else self._forward

    def _forward(self, ids, positions, cached: int, mask, all_logits: bool):
        """One model call over ids [B, n] after `cached` tokens: (logits of every row or of the last one, last hidden
        states [B, n, D]). The cached length is an argument (not read from the cache) so that a compiled graph
        treats it as a symbol; the head runs inside, so a compiled step includes it."""
        self.cache.seq_len = cached
        h = self.model(ids, position_ids=positions, cache=self.cache, attention_mask=mask,
                       compute_logits=False).last_hidden
        return self.model.head(h if all_logits else h[:, -1:]), h

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, all_logits: bool = False):
        """Append ids [B, S] to the cache (in chunks); return (logits [B, S or 1, V], last_hidden [B, S, D])."""
        logits, hidden = [], []
        for s0 in range(0, ids.shape[1], self.chunk):
            sl = slice(s0, s0 + self.chunk)
            self.cache.append_tokens(valid[:, sl], positions[:, sl])
            n = ids[:, sl].shape[1]
            plain = bool(valid.all()) and self.cache.seq_len == 0
            mask = None if plain else self.cache.valid(n)
            run = self._few if n <= COMPILED_MAX_TOKENS and not plain else self._forward
            lg, h = run(ids[:, sl], positions[:, sl], self.cache.seq_len, mask, all_logits)
            logits.append(lg)
            hidden.append(h)
        return torch.cat(logits if all_logits else logits[-1:], 1), torch.cat(hidden, 1)


@dataclass
class Batch:
    """Per-sequence state: tokens so far, next position, finished flags."""
    ids: list[list[int]]
    next_pos: torch.Tensor  # [B]
    finished: torch.Tensor  # [B] bool
    new: list[list[int]] = field(default_factory=list)


def _left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if attention_mask is not None and (valid[:, 1:].int() < valid[:, :-1].int()).any():
        raise ValueError("attention_mask must be left-padded (zeros before the tokens of each row)")
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return valid, positions


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
    compile: bool = False,  # torch.compile the decode steps (MLA models): seconds to compile, then faster steps
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
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    stats = stats if stats is not None else Stats()
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
    kind = cache_class(model.cfg)
    if compile and kind is not LatentCache:
        raise ValueError(f"compile=True supports the latent cache (MLA models); {kind.__name__} "
                         f"({model.cfg.model_type}) decodes eagerly")
    if speculative == "mtp" and not kind.rewinds:
        raise ValueError(f"speculative='mtp' needs a cache that rewinds rejected drafts; {kind.__name__} cannot "
                         f"({model.cfg.model_type}); use speculative=None")
    if not kind.pads and attention_mask is not None and not bool(attention_mask.bool().all()):
        return _row_by_row(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                           eos_token_id, seed, prefill_chunk, on_token, should_stop, stats)
    if speculative == "mtp":
        from dsalite.inference.speculative import mtp_generate

        return mtp_generate(model, input_ids, max_new_tokens, params, _eos_set(eos_token_id), attention_mask,
                            gen, prefill_chunk, on_token, should_stop, stats, compile)

    B, S = input_ids.shape
    valid, positions = _left_pad(input_ids, attention_mask)
    cache = new_cache(model, B, S + max_new_tokens)
    stats.cache_bytes_per_token = cache.bytes_per_token()
    runner = Runner(model, cache, prefill_chunk, compile)
    eos = _eos_set(eos_token_id)

    t0 = time.perf_counter()
    logits, _ = runner.feed(input_ids, valid, positions)
    stats.prefill_tokens += int(valid.sum())
    stats.prefill_s += time.perf_counter() - t0

    batch = Batch([[] for _ in range(B)], positions[:, -1] + 1, torch.zeros(B, dtype=torch.bool))
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
        logits, _ = runner.feed(tok[:, None], torch.ones(B, 1, dtype=torch.bool), batch.next_pos[:, None])
        batch.next_pos += 1
    stats.decode_s += time.perf_counter() - t0
    return out


def _row_by_row(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                prefill_chunk, on_token, should_stop, stats) -> torch.Tensor:
    """A left-padded batch for a cache that cannot hold padding: each row alone (exact, not batched), then laid out
    as the batched result (input ids, new ids, rows that stopped early padded with their last id)."""
    _left_pad(input_ids, attention_mask)
    rows = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b : b + 1, attention_mask[b].bool()]
        cb = None if on_token is None else (lambda _, t, b=b: on_token(b, t))
        sb = None if should_stop is None else (lambda _, new, b=b: should_stop(b, new))
        out = generate(model, ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed=seed,
                       prefill_chunk=prefill_chunk, on_token=cb, should_stop=sb, stats=stats)
        rows.append(out[0, ids.shape[1] :])
    n = max(len(r) for r in rows)
    new = torch.stack([torch.cat([r, r[-1:].expand(n - len(r))]) for r in rows])  # [B, n]
    return torch.cat([input_ids, new], 1)

