"""Trainable attention over selected keys in MQA (absorbed MLA) form, computed as masked GEMMs with a hand-written
backward.

Legend: B batch, S queries, T keys, H heads, D = r + p latent width, Dv = r value width, K selected keys per query.
Same result as `sparse_attention` with a shared latent (the tests compare both, values and gradients). Why a second
path: under autograd the gather path keeps a [S, K, D] copy of the gathered latents per chunk and its backward
scatters zeros and sums into them, which is memory-bound; here each query block multiplies against the latents it
can see with one GEMM, masks everything outside the selection, and the backward recomputes the block's
probabilities (FlashAttention-style), so only the inputs are stored. The cost is that of the causal keys (like the
indexer's scoring), at GEMM speed, with three fused element-wise passes per block; memory stays one [s, H, T] block.
"""

from __future__ import annotations

import torch

# Queries per block are chosen so one [s, H, T] logits block stays near this many fp32 elements.
BLOCK_BUDGET = 1 << 20


def _blocks(S: int, H: int, T: int):
    step = max(1, BLOCK_BUDGET // max(1, H * T))
    for s0 in range(0, S, step):
        yield s0, min(S, s0 + step)


def _selection(idx: torch.Tensor, T: int) -> tuple[torch.Tensor, int]:
    """idx [s, K] (-1 = none) → (mask [s, t] over the first t = max index + 1 keys, t)."""
    t = int(idx.max()) + 1 if idx.numel() else 0
    m = torch.zeros(idx.shape[0], t + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(1, torch.where(idx < 0, t, idx), True)
    return m[:, :t], t


class MaskedMQAAttention(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, q, kv, dv: int, idx, scale: float):
        B, S, H, D = q.shape
        out = q.new_zeros(B, S, H, dv)
        for b in range(B):
            for s0, s1 in _blocks(S, H, kv.shape[1]):
                p, t = _probs(q[b, s0:s1], kv[b], idx[b, s0:s1], scale)
                if t:
                    out[b, s0:s1] = (p.view(-1, t) @ kv[b, :t, :dv]).view(s1 - s0, H, dv)
        ctx.save_for_backward(q, kv, idx)
        ctx.dv, ctx.scale = dv, scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dout):
        q, kv, idx = ctx.saved_tensors
        dv, scale = ctx.dv, ctx.scale
        B, S, H, D = q.shape
        dq = torch.zeros_like(q)
        dkv = torch.zeros_like(kv)
        for b in range(B):
            for s0, s1 in _blocks(S, H, kv.shape[1]):
                p, t = _probs(q[b, s0:s1], kv[b], idx[b, s0:s1], scale)  # recomputed, never stored
                if not t:
                    continue
                n = (s1 - s0) * H
                do = dout[b, s0:s1].reshape(n, dv)
                dkv[b, :t, :dv] += p.view(n, t).T @ do
                dp = (do @ kv[b, :t, :dv].T).view_as(p)
                ds = torch._softmax_backward_data(dp, p, -1, p.dtype).view(n, t)  # p·(dp − Σ p·dp), fused
                dq[b, s0:s1] = ((ds @ kv[b, :t]) * scale).view(s1 - s0, H, D)
                dkv[b, :t] += (ds.T @ q[b, s0:s1].reshape(n, D)) * scale
        return dq, dkv, None, None, None


def _probs(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    """Attention probabilities [s, H, t] of one query block over the first t keys (t = largest selected index + 1);
    q [s, H, D], kv [T, D], idx [s, K]. Unselected keys get probability 0; a query with no key gets all zeros."""
    s, H, D = q.shape
    mask, t = _selection(idx, kv.shape[0])
    if t == 0:
        return q.new_zeros(s, H, 0), 0
    lg = ((q * scale).reshape(s * H, D) @ kv[:t].T).view(s, H, t).masked_fill_(~mask[:, None], float("-inf"))
    p = torch.softmax(lg, dim=-1)
    if not bool(mask.any(-1).all()):
        p = p.nan_to_num_(0.0)
    return p, t


def masked_mqa_attention(q, kv, dv: int, idx, scale: float) -> torch.Tensor:
    """q [B,S,H,D], kv [B,T,D] (values = first dv channels), idx [B,S,K] → [B,S,H,dv]."""
    return MaskedMQAAttention.apply(q, kv, dv, idx, scale)
