"""Trainable attention over selected keys where the CPU kernel (`sparse_attention.LatentKernelAttention`) does not
run (other devices, bf16 autocast, no compiler): masked GEMMs with a hand-written backward (`MaskedAttention`).

Legend: B batch, S queries, T keys, H query heads, Hk key heads (H, or 1 for a latent shared by all heads),
D key width, Dv value width, K selected keys per query.
Same result as `sparse_attention` (the tests compare values and gradients). Why a second path: under autograd the
gather path keeps a [S, K, ...] copy of the gathered keys per chunk and its backward scatters zero-filled sums into
them, which is memory-bound; here each query block multiplies against the keys it can see with one GEMM per key
head; the softmax and its backward run on the K selected entries only (gathered from the block), and their results
are scattered back into the block for the other GEMMs. The forward keeps only the selected probabilities
([B, S·H, K], the size of one gathered selection), so the backward neither stores nor recomputes the logits. The
cost is that of the causal keys (like the indexer's scoring), at GEMM speed, with two full-block element-wise passes
(zeroing) instead of a masked softmax and its backward; memory stays one [H, s, t] block.
MLA uses it with per-head keys (expanded through kv_b_proj), which costs fewer FLOPs per query-key pair than the
absorbed form whenever n + p + v < 2r + p (true for every released GLM / DeepSeek shape). The kernel instead reads
each selected latent row once for all heads (S·K rows, not the causal S·T/2 per head at GEMM speed), which is what
wins on a CPU.
"""

from __future__ import annotations

import torch

# 64 queries per block measured fastest at S = 2048 for 4 and 8 heads (more spill the block's element-wise passes out
# of cache, fewer make the GEMMs too thin); many heads or keys shrink the block so one [H, s, t] probability block
# stays within BLOCK_BUDGET fp32 elements.
QUERIES_PER_BLOCK = 64
BLOCK_BUDGET = 1 << 22


def _blocks(S: int, H: int, T: int):
    step = max(1, min(QUERIES_PER_BLOCK, BLOCK_BUDGET // max(1, H * T)))
    for s0 in range(0, S, step):
        yield s0, min(S, s0 + step)


def _rows(x: torch.Tensor, hk: int) -> torch.Tensor:
    """[s, H, d] → [Hk, rows, d]: per key head, the query rows that use it ((s, H) order when Hk = 1)."""
    s, H, d = x.shape
    return x.reshape(1, s * H, d) if hk == 1 else x.transpose(0, 1)


def _unrows(x: torch.Tensor, s: int, H: int) -> torch.Tensor:
    """Inverse of _rows: [Hk, rows, d] → [s, H, d]."""
    return x.reshape(s, H, -1) if x.shape[0] == 1 else x.transpose(0, 1)


def _columns(idx: torch.Tensor, H: int, hk: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """idx [s, K] (-1 = none) → (column of every selected key per row of `_rows`, [Hk, rows, K], -1 clamped to
    column 0; which of those are real, None when all are; t = largest index + 1, the keys the block multiplies
    against)."""
    t = int(idx.max()) + 1 if idx.numel() else 0
    valid = idx >= 0
    padded = not bool(valid.all())
    if hk == 1:
        cols = idx.clamp(min=0).repeat_interleave(H, dim=0)[None]
        return cols, valid.repeat_interleave(H, dim=0)[None] if padded else None, t
    return idx.clamp(min=0)[None].expand(hk, -1, -1), valid[None].expand(hk, -1, -1) if padded else None, t


class MaskedAttention(torch.autograd.Function):
    """Per block: logits = one GEMM per key head against the first t keys; the softmax runs over the K selected
    logits only (gathered), and its probabilities are scatter-added into the zeroed logits block for the value GEMM.
    Adding makes padding slots (probability 0, clamped onto column 0) harmless and counts a key listed twice twice,
    as the gather path does."""

    @staticmethod
    def forward(ctx, q, k, v, idx, scale: float):
        """q [B,S,H,D], k [B,Hk,T,D], v [B,Hk,T,Dv], idx [B,S,K] → [B,S,H,Dv]."""
        B, S, H, _ = q.shape
        hk, K = k.shape[1], idx.shape[-1]
        out = q.new_zeros(B, S, H, v.shape[-1])
        p_sel = q.new_zeros(B, S * H, K)  # per block: the block's rows of `_rows`, in that order; 0 on padding
        for b in range(B):
            for s0, s1 in _blocks(S, H, k.shape[2]):
                cols, valid, t = _columns(idx[b, s0:s1], H, hk)
                if not t:
                    continue
                lg = torch.bmm(_rows(q[b, s0:s1] * scale, hk), k[b, :, :t].transpose(1, 2))  # [Hk, rows, t]
                lg_sel = lg.gather(-1, cols)
                if valid is not None:
                    lg_sel.masked_fill_(~valid, float("-inf"))
                p = torch.softmax(lg_sel, dim=-1)
                if valid is not None and not bool((idx[b, s0:s1] >= 0).any(-1).all()):  # a query seeing no key: 0
                    p = p.nan_to_num_(0.0)
                p_sel[b, s0 * H : s1 * H].view(hk, -1, K).copy_(p)
                probs = lg.zero_().scatter_add_(-1, cols, p)
                out[b, s0:s1] = _unrows(torch.bmm(probs, v[b, :, :t]), s1 - s0, H)
        ctx.save_for_backward(q, k, v, idx, p_sel)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, p_sel = ctx.saved_tensors
        scale = ctx.scale
        B, S, H, _ = q.shape
        hk, K = k.shape[1], idx.shape[-1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b in range(B):
            for s0, s1 in _blocks(S, H, k.shape[2]):
                cols, _, t = _columns(idx[b, s0:s1], H, hk)
                if not t:
                    continue
                p = p_sel[b, s0 * H : s1 * H].view(hk, -1, K)
                block = q.new_zeros(hk, p.shape[1], t).scatter_add_(-1, cols, p)  # the forward's probabilities
                do = _rows(dout[b, s0:s1], hk)  # [Hk, rows, Dv]
                dv[b, :, :t].baddbmm_(block.transpose(1, 2), do)  # accumulated inside the GEMM
                dp = torch.bmm(do, v[b, :, :t].transpose(1, 2)).gather(-1, cols)  # selected entries only
                ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale  # softmax backward over the selection
                block = block.zero_().scatter_add_(-1, cols, ds)
                dq[b, s0:s1] = _unrows(torch.bmm(block, k[b, :, :t]), s1 - s0, H)
                dk[b, :, :t].baddbmm_(block.transpose(1, 2), _rows(q[b, s0:s1], hk))
        return dq, dk, dv, None, None


def masked_attention(q, k, v, idx, scale: float) -> torch.Tensor:
    """q [B,S,H,D]; k [B,T,Hk,D]; v [B,T,Hk,Dv], or an int Dv when the values are the first Dv channels of k
    (MLA's latent); idx [B,S,K] (-1 = none) → [B,S,H,Dv]."""
    kh = k.transpose(1, 2).contiguous()  # [B, Hk, T, D]
    if isinstance(v, int):
        dv = v
        vh = kh[..., :dv]
    else:
        vh = v.transpose(1, 2).contiguous()
    dev = q.device.type
    if not torch.is_autocast_enabled(dev):
        return MaskedAttention.apply(q, kh, vh, idx, scale)
    with torch.autocast(dev, enabled=False):  # under autocast (any device) the selection's softmax runs in fp32
        return MaskedAttention.apply(q.float(), kh.float(), vh.float(), idx, scale)
