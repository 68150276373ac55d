"""Trainable attention over selected keys, computed as masked GEMMs with a hand-written backward.

Legend: B batch, S queries, T keys, H query heads, Hk key heads (H, or 1 for a latent shared by all heads),
D key width, Dv value width, K selected keys per query.
Same result as `sparse_attention` (the tests compare values and gradients). Why a second path: under autograd the
gather path keeps a [S, K, ...] copy of the gathered keys per chunk and its backward scatters zero-filled sums into
them, which is memory-bound; here each query block multiplies against the keys it can see with one GEMM per key
head and masks everything outside the selection. The forward keeps only the probabilities of the selected keys
([B, S·H, K], the size of one gathered selection) and the backward scatters them back into a block instead of
recomputing the logits GEMM and the softmax. The cost is that of the causal keys (like the indexer's scoring), at
GEMM speed; memory stays one [H, s, t] block.
Training uses it with per-head keys (MLA expanded through kv_b_proj), which costs fewer FLOPs per query-key pair
than the absorbed form whenever n + p + v < 2r + p (true for every released GLM / DeepSeek shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _columns(idx: torch.Tensor, H: int, hk: int) -> tuple[torch.Tensor, int]:
    """idx [s, K] (-1 = none) → (the column of every selected key per row of `_rows`, [Hk, rows, K], with -1 sent to
    a spare column t; t = largest index + 1, the keys the block multiplies against)."""
    t = int(idx.max()) + 1 if idx.numel() else 0
    cols = torch.where(idx < 0, t, idx)
    return (cols.repeat_interleave(H, dim=0)[None] if hk == 1 else cols[None].expand(hk, -1, -1)), t


def _probs(q, k, idx, cols, t, scale):
    """q [s, H, D], k [Hk, T, D] → probabilities [Hk, rows, t]; unselected keys get 0."""
    s, H, _ = q.shape
    hk = k.shape[0]
    bias = q.new_full((s, t + 1), float("-inf")).scatter_(1, cols[0, :: H if hk == 1 else 1], 0.0)[:, :t]
    if hk == 1:
        bias = bias.repeat_interleave(H, dim=0)  # rows are (s, H)
    p = torch.softmax(torch.baddbmm(bias, _rows(q * scale, hk), k[:, :t].transpose(1, 2)), dim=-1)  # mask on the GEMM
    if not bool((idx >= 0).any(-1).all()):  # a query that sees no key: zeros, not NaN
        p = p.nan_to_num_(0.0)
    return p


class MaskedAttention(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, q, k, v, idx, scale: float):
        """q [B,S,H,D], k [B,Hk,T,D], v [B,Hk,T,Dv], idx [B,S,K] → [B,S,H,Dv]."""
        B, S, H, _ = q.shape
        hk, K = k.shape[1], idx.shape[-1]
        out = q.new_zeros(B, S, H, v.shape[-1])
        p_sel = q.new_zeros(B, S * H, K)  # per block: the block's rows of `_rows`, in that order
        for b in range(B):
            for s0, s1 in _blocks(S, H, k.shape[2]):
                cols, t = _columns(idx[b, s0:s1], H, hk)
                if not t:
                    continue
                p = _probs(q[b, s0:s1], k[b], idx[b, s0:s1], cols, t, scale)
                out[b, s0:s1] = _unrows(torch.bmm(p, v[b, :, :t]), s1 - s0, H)
                p_sel[b, s0 * H : s1 * H].view(hk, -1, K).copy_(F.pad(p, (0, 1)).gather(-1, cols))
        ctx.save_for_backward(q, k, v, idx, p_sel)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dout):
        q, k, v, idx, p_sel = ctx.saved_tensors
        scale = ctx.scale
        B, S, H, _ = q.shape
        hk, K = k.shape[1], idx.shape[-1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b in range(B):
            for s0, s1 in _blocks(S, H, k.shape[2]):
                cols, t = _columns(idx[b, s0:s1], H, hk)
                if not t:
                    continue
                kept = p_sel[b, s0 * H : s1 * H].view(hk, -1, K)
                p = q.new_zeros(hk, kept.shape[1], t + 1).scatter_(-1, cols, kept)[..., :t]  # the forward's block
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
