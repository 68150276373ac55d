"""MTP speculative decoding: the MTP layer drafts the token after next, the main model verifies it in the same forward
that produces the next distribution, and exact acceptance keeps the output distribution unchanged.

State after each iteration (m = index of the newest confirmed token t_m, not yet fed to the main model):
  main cache holds positions 0..m-1;  MTP cache holds entries i = (h_i, t_{i+1}) for i = 0..m-1, whose last one
  drafts d ≈ t_{m+1}.
One iteration feeds [t_m, d] to the main model (positions m, m+1): logits at m verify d, logits at m+1 give a bonus
token when d is accepted. Greedy: accept iff d is the argmax, so the output is identical to plain greedy decoding.
Sampling: accept with probability min(1, p(d)/q(d)), else draw from normalise(max(0, p − q)) (Leviathan et al. 2023).
Only the first MTP depth drafts, and only batch size 1 (acceptance differs per sequence).
"""

from __future__ import annotations

import time

import torch

from dsalite.inference.runner import Runner, Stats, cache_class, compiled, left_pad, new_cache
from dsalite.inference.sampling import SamplingParams, probs, probs_and_sample
from dsalite.layers.mask import Visibility


class MTPDrafter:
    """The first MTP layer with its own cache (the family's kind, for that one layer), fed confirmed (hidden, next
    token) pairs; it never holds a rejected token, so it never rewinds."""

    def __init__(self, model, capacity: int, dtype, compile: bool = False):
        cfg = model.cfg
        self.model, self.layer = model, model.mtp[0]
        self.cache = cache_class(cfg)(cfg, 1, capacity, layers=[cfg.num_hidden_layers], dtype=dtype,
                                      device=model.head_weight().device)
        self._step = compiled(self._draft) if compile else self._draft

    @torch.no_grad()
    def feed(self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, topk) -> torch.Tensor:
        """h [1, n, D] post-norm hidden states, next_ids [1, n], topk: the main model's top-k of these positions
        (`Runner.feed`'s, for an IndexShare-shared MTP layer) → draft logits [1, V] of the last entry."""
        n = h.shape[1]
        self.cache.append_tokens(torch.ones(1, n, dtype=torch.bool, device=h.device), positions)
        step = self._step if self.cache.seq_len else self._draft  # the prompt's entries run eagerly
        logits = step(h, next_ids, positions, self.cache.seq_len, self.cache.valid(n), topk)
        self.cache.advance(n)
        return logits

    def _draft(self, h, next_ids, positions, cached: int, valid, topk):
        """The MTP layer over n new entries after `cached` ones (an argument, so a compiled graph keeps it symbolic);
        logits [1, V] of the last entry."""
        self.cache.seq_len = cached
        n = h.shape[1]
        return draft_logits(self.model, h, next_ids, positions, Visibility(n, cached + n, cached, valid), self.cache,
                            topk)[:, -1]


def draft_logits(model, h, next_ids, positions, vis: Visibility, cache, topk) -> torch.Tensor:
    """The first MTP layer over entries (h_i, t_{i+1}) [B, n] at `positions`, its keys in `cache` as `vis` describes
    them → draft logits [B, n, V] (the entry at position i drafts t_{i+2}). Shared by the drafter above and the
    serving engine's per-sequence speculation (serve/runner.py), whose cache is paged."""
    ctx = model.context(next_ids, positions, vis, h.dtype, cache)
    _, logits, _ = model.mtp[0].step(h, next_ids, ctx, model.model.embed_tokens, model.head, topk)
    return logits


@torch.no_grad()
def mtp_generate(model, input_ids, max_new_tokens, params: SamplingParams, eos: set[int], attention_mask, gen,
                 prefill_chunk, on_token, should_stop, stats: Stats, compile: bool = False) -> torch.Tensor:
    if not len(model.mtp):
        raise ValueError("speculative='mtp' needs a model with MTP layers (num_nextn_predict_layers >= 1 and MTP "
                         "weights in the checkpoint)")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative='mtp' decodes one sequence at a time, got a batch of {input_ids.shape[0]}")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        input_ids = input_ids[:, attention_mask[0].bool()]
    S = input_ids.shape[1]
    dtype, dev = next(model.parameters()).dtype, input_ids.device
    cache = new_cache(model, 1, S + max_new_tokens + 2)
    stats.cache_bytes_per_token = cache.bytes_per_token()
    runner = Runner(model, cache, prefill_chunk, compile)
    drafter = MTPDrafter(model, S + max_new_tokens + 2, dtype, compile)

    t0 = time.perf_counter()
    valid, positions = left_pad(input_ids, None)
    logits, h, topk = runner.feed(input_ids, valid, positions, with_topk=True)
    _, t_m = probs_and_sample(logits[:, -1], params, gen)  # t_m: newest confirmed token
    new: list[int] = []
    d_logits = drafter.feed(h, torch.cat([input_ids[:, 1:], t_m[:, None]], 1), positions, topk)
    stats.prefill_tokens += S
    stats.prefill_s += time.perf_counter() - t0

    def emit(t: int) -> bool:
        new.append(t)
        stats.decode_tokens += 1
        if on_token:
            on_token(0, t)
        return t in eos or (should_stop is not None and should_stop(0, new)) or len(new) >= max_new_tokens

    t0 = time.perf_counter()
    m = S  # position of t_m
    done = emit(int(t_m))
    while not done:
        q, d = probs_and_sample(d_logits, params, gen)
        pos = torch.tensor([[m, m + 1]], device=dev)
        snap = None if cache.rewinds else cache.snapshot()  # V4: its compressor state cannot be cropped
        logits, h, topk = runner.feed(torch.stack([t_m, d], 1), torch.ones(1, 2, dtype=torch.bool, device=dev), pos,
                                      all_logits=True, with_topk=True)
        stats.drafted += 1
        p0 = probs(logits[:, 0], params)
        if _accept(p0, q, d, params, gen):
            stats.accepted += 1
            _, bonus = probs_and_sample(logits[:, 1], params, gen)
            done = emit(int(d)) or emit(int(bonus))
            if done:
                break
            d_logits = drafter.feed(h, torch.stack([d, bonus], 1), pos, topk)
            t_m, m = bonus, m + 2
        else:
            if snap is None:
                cache.crop(cache.seq_len - 1)  # forget d's entry
            else:  # back to before the verification, then t_m alone: the state plain decoding has
                cache.restore(snap)
                runner.feed(t_m[:, None], torch.ones(1, 1, dtype=torch.bool, device=dev), pos[:, :1])
            t_next = _resample(p0, q, params, gen)
            done = emit(int(t_next))
            if done:
                break
            d_logits = drafter.feed(h[:, :1], t_next[:, None], pos[:, :1], _rows(topk, 1))
            t_m, m = t_next, m + 1
    stats.decode_s += time.perf_counter() - t0
    return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=dev)], 1)


def _rows(topk, n: int):
    """The first n query rows of a top-k handed on to the drafter (None / NOT_GIVEN pass through)."""
    return topk[:, :n] if isinstance(topk, torch.Tensor) else topk


def _accept(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor, params: SamplingParams, gen) -> bool:
    if params.greedy:
        return bool(p.argmax(-1) == d)
    ratio = (p[0, d] / q[0, d].clamp(min=1e-20)).clamp(max=1.0)
    return bool(torch.rand(1, generator=gen, device=p.device) < ratio)


def _resample(p: torch.Tensor, q: torch.Tensor, params: SamplingParams, gen) -> torch.Tensor:
    """The correction distribution after a rejection: normalise(max(0, p − q)); greedy: p's argmax."""
    if params.greedy:
        return p.argmax(-1)
    r = (p - q).clamp(min=0)
    r = r / r.sum(-1, keepdim=True) if float(r.sum()) > 0 else p
    return torch.multinomial(r, 1, generator=gen).squeeze(-1)
