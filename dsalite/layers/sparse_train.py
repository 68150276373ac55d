"""Trainable attention over selected keys in MQA (absorbed MLA) form, computed as masked GEMMs with a hand-written
backward.

Legend: B batch, S queries, T keys, H heads, D = r + p latent width, Dv = r value width, K selected keys per query.
Same result as `sparse_attention` with a shared latent (the tests compare both, values and gradients). Why a second
path: under autograd the gather path keeps a [S, K, D] copy of the gathered latents per chunk and its backward
scatters zeros and sums into them, which is memory-bound; here each query block multiplies against the latents it
can see with one GEMM, masks everything outside the selection, and the backward recomputes the probabilities from
the saved log-sum-exp (FlashAttention-style), so nothing of size S×K×D is stored. The cost is that of the causal
keys (like the indexer's scoring), at GEMM speed; memory stays one [s, H, T] block.
"""

from __future__ import annotations

import torch

# Queries per block are chosen so one [s, H, T] logits block stays near this many fp32 elements.
BLOCK_BUDGET = 1 << 22


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
        T = kv.shape[1]
        out = q.new_zeros(B, S, H, dv)
        lse = q.new_full((B, S, H), float("-inf"), dtype=torch.float32)
        for b in range(B):
            for s0, s1 in _blocks(S, H, T):
                mask, t = _selection(idx[b, s0:s1], T)
                if t == 0:
                    continue
                lg = _logits(q[b, s0:s1], kv[b, :t], scale, mask)  # [s, H, t]
                m = torch.logsumexp(lg, dim=-1)  # [s, H]
                p = torch.exp(lg - m[..., None]).nan_to_num_(0.0)
                out[b, s0:s1] = (p.view(-1, t) @ kv[b, :t, :dv]).view(s1 - s0, H, dv)
                lse[b, s0:s1] = m
        ctx.save_for_backward(q, kv, idx, lse, out)
        ctx.dv, ctx.scale = dv, scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dout):
        q, kv, idx, lse, out = ctx.saved_tensors
        dv, scale = ctx.dv, ctx.scale
        B, S, H, D = q.shape
        T = kv.shape[1]
        dq = torch.zeros_like(q)
        dkv = torch.zeros_like(kv)
        delta = (dout * out).sum(-1)  # [B, S, H]
        for b in range(B):
            for s0, s1 in _blocks(S, H, T):
                mask, t = _selection(idx[b, s0:s1], T)
                if t == 0:
                    continue
                s = s1 - s0
                lg = _logits(q[b, s0:s1], kv[b, :t], scale, mask)
                p = torch.exp(lg - lse[b, s0:s1, :, None]).nan_to_num_(0.0)  # [s, H, t]
                do = dout[b, s0:s1].reshape(s * H, dv)
                dkv[b, :t, :dv] += p.view(s * H, t).T @ do
                dp = (do @ kv[b, :t, :dv].T).view(s, H, t)
                ds = p * (dp - delta[b, s0:s1, :, None]) * scale  # [s, H, t]
                dq[b, s0:s1] = (ds.view(s * H, t) @ kv[b, :t]).view(s, H, D)
                dkv[b, :t] += ds.view(s * H, t).T @ q[b, s0:s1].reshape(s * H, D)
        return dq, dkv, None, None, None


def _logits(q: torch.Tensor, kv: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """q [s, H, D], kv [t, D], mask [s, t] → masked scaled logits [s, H, t] in one GEMM."""
    s, H, D = q.shape
    lg = (q.reshape(s * H, D) @ kv.T).view(s, H, -1) * scale
    return lg.masked_fill_(~mask[:, None], float("-inf"))


def masked_mqa_attention(q, kv, dv: int, idx, scale: float) -> torch.Tensor:
    """q [B,S,H,D], kv [B,T,D] (values = first dv channels), idx [B,S,K] → [B,S,H,dv]."""
    return MaskedMQAAttention.apply(q, kv, dv, idx, scale)
