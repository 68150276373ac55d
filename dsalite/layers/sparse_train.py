"""Trainable attention over selected keys, computed as masked GEMMs with a hand-written, recomputing backward.

Legend: B batch, S queries, T keys, H query heads, Hk key heads (H, or 1 for a latent shared by all heads),
D key width, Dv value width, K selected keys per query.
Same result as `sparse_attention` (the tests compare values and gradients). Why a second path: under autograd the
gather path keeps a [S, K, ...] copy of the gathered keys per chunk and its backward scatters zero-filled sums into
them, which is memory-bound; here each query block multiplies against the keys it can see with one GEMM per key
head, masks everything outside the selection, and the backward recomputes the block's probabilities
(FlashAttention-style), so only the inputs are stored. The cost is that of the causal keys (like the indexer's
scoring), at GEMM speed, with three fused element-wise passes per block; memory stays one [H, s, t] block.
Training uses it with per-head keys (MLA expanded through kv_b_proj), which costs fewer FLOPs per query-key pair
than the absorbed form whenever n + p + v < 2r + p (true for every released GLM / DeepSeek shape).
"""

from __future__ import annotations

import torch

# Queries per block are chosen so one [H, s, t] probability block stays near this many fp32 elements.
BLOCK_BUDGET = 1 << 20


def _blocks(S: int, H: int, T: int):
    step = max(1, BLOCK_BUDGET // max(1, H * T))
    for s0 in range(0, S, step):
        yield s0, min(S, s0 + step)


def _selection(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
    """idx [s, K] (-1 = none) → (mask [s, t] over the first t = largest index + 1 keys, t)."""
    t = int(idx.max()) + 1 if idx.numel() else 0
    m = torch.zeros(idx.shape[0], t + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(1, torch.where(idx < 0, t, idx), True)
    return m[:, :t], t


def _rows(x: torch.Tensor, hk: int) -> torch.Tensor:
    """[s, H, d] → [Hk, rows, d]: per key head, the query rows that use it ((s, H) order when Hk = 1)."""
    s, H, d = x.shape
    return x.reshape(1, s * H, d) if hk == 1 else x.transpose(0, 1)


def _unrows(x: torch.Tensor, s: int, H: int) -> torch.Tensor:
    """Inverse of _rows: [Hk, rows, d] → [s, H, d]."""
    return x.reshape(s, H, -1) if x.shape[0] == 1 else x.transpose(0, 1)


def _probs(q, k, idx, scale):
    """q [s, H, D], k [Hk, T, D], idx [s, K] → (probabilities [Hk, rows, t], t); unselected keys get 0."""
    s, H, _ = q.shape
    hk = k.shape[0]
    mask, t = _selection(idx)
    if t == 0:
        return None, 0
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    if hk == 1:
        bias = bias.repeat_interleave(H, dim=0)  # rows are (s, H)
    lg = torch.baddbmm(bias, _rows(q * scale, hk), k[:, :t].transpose(1, 2))  # the mask rides on the GEMM
    p = torch.softmax(lg, dim=-1)
    if not bool((idx >= 0).any(-1).all()):  # a query that sees no key: zeros, not NaN
        p = p.nan_to_num_(0.0)
    return p, t


class MaskedAttention(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, q, k, v, idx, scale: float):
        """q [B,S,H,D], k [B,Hk,T,D], v [B,Hk,T,Dv], idx [B,S,K] → [B,S,H,Dv]."""
        B, S, H, _ = q.shape
        out = q.new_zeros(B, S, H, v.shape[-1])
        for b in range(B):
            for s0, s1 in _blocks(S, H, k.shape[2]):
                p, t = _probs(q[b, s0:s1], k[b], idx[b, s0:s1], scale)
                if t:
                    out[b, s0:s1] = _unrows(torch.bmm(p, v[b, :, :t]), s1 - s0, H)
        ctx.save_for_backward(q, k, v, idx)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dout):
        q, k, v, idx = ctx.saved_tensors
        scale = ctx.scale
        B, S, H, _ = q.shape
        hk = k.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b in range(B):
            for s0, s1 in _blocks(S, H, k.shape[2]):
                p, t = _probs(q[b, s0:s1], k[b], idx[b, s0:s1], scale)  # recomputed, never stored
                if not t:
                    continue
                do = _rows(dout[b, s0:s1], hk)  # [Hk, rows, Dv]
                dv[b, :, :t] += torch.bmm(p.transpose(1, 2), do)
                dp = torch.bmm(do, v[b, :, :t].transpose(1, 2))
                ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # p·(dp − Σ p·dp), fused
                dq[b, s0:s1] = _unrows(torch.bmm(ds, k[b, :, :t]), s1 - s0, H) * scale
                dk[b, :, :t] += torch.bmm(ds.transpose(1, 2), _rows(q[b, s0:s1], hk)) * scale
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
    return MaskedAttention.apply(q, kh, vh, idx, scale)
