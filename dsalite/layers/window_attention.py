"""Sliding-window attention plus selected extra keys and per-head sinks, reading the window in place (DeepSeek-V4).

Legend: B batch, S queries (= the tokens), H heads, c width of the single shared K=V head, Wn window, E extra keys
(compressed entries), K picks per query, Q queries per block.
Same result as `sparse_attention(q, cat[kv, extra], c, cat[window indices, picks + S], scale, sinks)` — the tests
hold it to that reference — but a block of Q queries sees one contiguous slice of at most Q + Wn − 1 window keys, so
the window costs one small matmul per block and no copy; only the K picked entries per query are gathered.
"""

from __future__ import annotations

import torch

BLOCK = 128  # queries per block


def window_attention(
    q: torch.Tensor,  # [B, S, H, c]
    kv: torch.Tensor,  # [B, T, c] keys = values; the queries are the last S of them (T − S cached before)
    window: int,  # a query sees itself and the window − 1 tokens before it
    scale: float,
    sinks: torch.Tensor,  # [H] logit in every row's softmax denominator
    extra: torch.Tensor | None = None,  # [B, E, c] more keys = values
    picks: torch.Tensor | None = None,  # [B, S, K] indices into extra, −1 = none
    key_valid: torch.Tensor | None = None,  # [B, T] bool, False = padding (hidden as a window key)
    segments: torch.Tensor | None = None,  # [B, T] packed documents: a window never reaches into another one
) -> torch.Tensor:  # [B, S, H, c]
    B, S, H, c = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax and value sums: fp32 at least (fp64 stays fp64)
    off = kv.shape[1] - S
    out = q.new_empty(B, S, H, c)
    pos = torch.arange(kv.shape[1], device=q.device)
    rows = torch.arange(B, device=q.device)[:, None, None]
    for s0 in range(0, S, BLOCK):
        s1 = min(S, s0 + BLOCK)
        k0 = max(0, off + s0 - window + 1)
        qb, keys = q[:, s0:s1], kv[:, k0 : off + s1]  # [B, Q, H, c], [B, n, c]
        qi, ki = pos[off + s0 : off + s1, None], pos[None, k0 : off + s1]
        vis = ((ki <= qi) & (ki > qi - window))[None]  # [1, Q, n]
        if key_valid is not None:
            vis = vis & key_valid[:, None, k0 : off + s1]
        if segments is not None:
            vis = vis & (segments[:, off + s0 : off + s1, None] == segments[:, None, k0 : off + s1])
        parts = [(torch.einsum("bqhc,bnc->bqhn", qb, keys) * scale).masked_fill(~vis[:, :, None], float("-inf"))]
        if picks is not None:
            ids = picks[:, s0:s1]
            ents = extra[rows, ids.clamp(min=0)]  # [B, Q, K, c] (no reshape: its K may be a symbol, see below)
            le = torch.einsum("bqhc,bqkc->bqhk", qb, ents) * scale
            parts.append(le.masked_fill(~(ids >= 0)[:, :, None], float("-inf")))
        parts.append(sinks[None, None, :, None].expand(B, s1 - s0, H, 1))
        # fp32 sinks promote the logits to fp32 (HF's eager path concatenates the same way); the sink keeps every
        # row's denominator finite, so a query with no visible key gets zeros, not NaN
        p = torch.softmax(torch.cat(parts, dim=-1), dim=-1, dtype=acc).to(q.dtype)
        n = keys.shape[1]
        # value products accumulate in fp32 and round once, like HF's single matmul over all keys
        o = torch.einsum("bqhn,bnc->bqhc", p[..., :n].to(acc), keys.to(acc))
        if picks is not None:
            o = o + torch.einsum("bqhk,bqkc->bqhc", p[..., n:-1].to(acc), ents.to(acc))
        out[:, s0:s1] = o.to(q.dtype)
    return out
