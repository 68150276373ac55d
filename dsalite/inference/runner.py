"""The model runner: the only inference code that touches the model's tensors.

`Runner` turns tokens into logits through the model and a cache (prefill in chunks so peak memory stays bounded,
decode one token or a few per sequence, optionally through torch.compile); `Stats` counts what it did. The engine
(`engine.py`, sequence state and the decode loop) and MTP speculation (`speculative.py`) both drive it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.fx.experimental import _config as fx_config

from dsalite import kernels
from dsalite.families import family
from dsalite.indexshare import NOT_GIVEN
from dsalite.inference.cache import LatentCache


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
    """The cache a model's decode needs: the family's own (V4: sliding window + compressor state), else latents."""
    return family(cfg.model_type).cache or LatentCache


def new_cache(model, batch: int, capacity: int):
    """An empty cache for `batch` sequences of up to `capacity` tokens, on the model's device and in its dtype."""
    w = model.head_weight()
    return cache_class(model.cfg)(model.cfg, batch, capacity, dtype=w.dtype, device=w.device)


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


def compiled(fn, backend: str | object = "inductor"):
    """fn through torch.compile for few-token calls: shapes symbolic (the context grows every step), most guards on
    the model's modules dropped (`_skip_parameter_guards`), one-row matrix products decomposed. Traced without duck
    sizing: with it, a batch that happens to equal a model dimension on the first call (16 rows and a rope table of 16
    frequencies) shares that dimension's symbol and is specialized with it — every other batch size recompiled.
    backend: inductor, or another torch.compile backend (tests count graphs with one)."""
    options = {
        "guard_filter_fn": _skip_parameter_guards,
        # one-row matrix products become inductor's own fused multiply-reduce loops instead of library GEMV calls:
        # reading the weights is all a decode step's products do, and those loops stream them about twice as fast
        "post_grad_fusion_options": {"decompose_mm_pass": {}},
    }
    graph = torch.compile(fn, dynamic=True, backend=backend, options=options if backend == "inductor" else None)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with fx_config.patch(use_duck_shape=False):
            return graph(*args, **kwargs)

    return call


class Runner:
    """Model + cache: prefill in chunks, decode one token (or a few) per sequence.

    compile=True runs the few-token calls through torch.compile (inductor): on small models a decode step is mostly
    per-operation overhead, which compiling fuses away, and one-row products stream their weights faster. The first
    compiled call takes seconds; later calls at any context length reuse the graph (the cached length is a symbol,
    not a constant)."""

    def __init__(self, model, cache: LatentCache, prefill_chunk: int = 2048, compile: bool = False):
        self.model, self.cache, self.chunk = model, cache, prefill_chunk
        self._few = compiled(self._forward) if compile else self._forward
        cfg = model.cfg
        most_work = getattr(cache, "batch", 0) * getattr(cache, "capacity", 0) * cfg.index_n_heads * cfg.index_head_dim
        if compile and getattr(cache, "index_tiles", None) and most_work < kernels.COMPILED_TILES_MIN_WORK:
            cache.drop_key_tiles()  # its compiled steps would never earn back keeping them
        # the trunk layer whose top-k the first MTP layer reuses (IndexShare), None when it selects its own
        mtp_topk = model.mtp_topk(0, list(range(model.cfg.num_hidden_layers))) if len(model.mtp) else NOT_GIVEN
        self.mtp_source = None if mtp_topk is NOT_GIVEN else mtp_topk

    def _forward(self, ids, positions, cached: int, mask, all_logits: bool):
        """One model call over ids [B, n] after `cached` tokens: (logits of every row or of the last one, last hidden
        states [B, n, D], the top-k an MTP drafter reuses). The cached length is an argument (not read from the
        cache) so that a compiled graph treats it as a symbol; the head runs inside, so a compiled step includes it."""
        self.cache.seq_len = cached
        out = self.model(ids, position_ids=positions, cache=self.cache, attention_mask=mask, compute_logits=False)
        h = out.last_hidden
        topk = NOT_GIVEN if self.mtp_source is None else out.topk[self.mtp_source]
        return self.model.head(h if all_logits else h[:, -1:]), out.mtp_input, topk

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, all_logits: bool = False,
             with_topk: bool = False):
        """Append ids [B, S] to the cache (in chunks); return (logits [B, S or 1, V], `Output.mtp_input` of the S
        tokens) and, with_topk, the top-k of the MTP layer's IndexShare source over them (NOT_GIVEN: it has none)."""
        logits, hidden, topks, first = [], [], [], self.cache.seq_len
        for s0 in range(0, ids.shape[1], self.chunk):
            sl = slice(s0, s0 + self.chunk)
            self.cache.append_tokens(valid[:, sl], positions[:, sl])
            n = ids[:, sl].shape[1]
            plain = bool(valid.all()) and self.cache.seq_len == 0
            mask = None if plain else self.cache.valid(n)
            run = self._few if n <= COMPILED_MAX_TOKENS and not plain else self._forward
            lg, h, tk = run(ids[:, sl], positions[:, sl], self.cache.seq_len, mask, all_logits)
            logits.append(lg)
            hidden.append(h)
            topks.append(tk)
        out = torch.cat(logits if all_logits else logits[-1:], 1), torch.cat(hidden, 1)
        return (*out, _cat_topk(topks, [h.shape[1] for h in hidden], first, ids.device)) if with_topk else out


def _cat_topk(parts: list, lengths: list[int], first: int, device):
    """Prefill chunks' top-k joined along the queries: None when every chunk saw all its keys, NOT_GIVEN when there
    is none; otherwise [B, S, K] where a dense chunk (context still within index_topk) is written out as its visible
    keys and short rows are padded with −1 ("no key"). Rows are of one unpadded sequence starting at cache index
    `first` (the speculative path's), so a query's cache index is its key limit."""
    if not parts or any(p is NOT_GIVEN for p in parts):
        return NOT_GIVEN
    if all(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    K = max(p.shape[-1] for p in parts if p is not None)
    B = next(p.shape[0] for p in parts if p is not None)
    rows, q0 = [], first
    for p, n in zip(parts, lengths):
        if p is None:
            q = torch.arange(q0, q0 + n, device=device)[:, None]
            keys = torch.arange(K, device=device)[None, :]
            p = keys.masked_fill(keys > q, -1).expand(B, n, K)
        elif p.shape[-1] < K:
            p = torch.nn.functional.pad(p, (0, K - p.shape[-1]), value=-1)
        rows.append(p)
        q0 += n
    return torch.cat(rows, 1)


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if attention_mask is not None and (valid[:, 1:].int() < valid[:, :-1].int()).any():
        raise ValueError("attention_mask must be left-padded (zeros before the tokens of each row)")
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return valid, positions
