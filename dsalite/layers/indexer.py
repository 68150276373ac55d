"""DSA lightning indexer: which keys each query attends to.

Legend: B batch, S queries, T keys, Hi indexer heads, Di indexer head dim, p rope width, K = min(index_topk, T).
score[b,s,t] = Σ_h w[b,s,h] · ReLU(q[b,s,h]·k[b,t] · Di^-0.5), w = weights_proj(x) · Hi^-0.5, all fp32, masked before
top-k (HF `DeepseekV32Indexer`). Rope sits on the *leading* p dims of q and k (MLA puts it on the trailing dims):
half-split for DeepSeek-V3.2, interleaved for GLM. Scoring is chunked over queries so [B,S,Hi,T] never exists at once.
HF runs the indexer under no_grad; so does inference here. Training reads the scores through `index_scores`.
"""

from __future__ import annotations

import torch
from torch import nn

from dsalite.layers.rope import apply_rope

# Queries per chunk are chosen so one chunk's [B, s, Hi, T] score block stays near this many fp32 elements.
SCORE_BUDGET = 1 << 21


class Indexer(nn.Module):
    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int, topk: int,
                 rope_interleaved: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.topk = n_heads, head_dim, rope_dim, topk
        self.rope_interleaved = rope_interleaved
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)  # with bias, eps fixed (HF)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)

    def project(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B,S,Hi,Di], k [B,S,Di], w [B,S,Hi] (fp32, with Hi^-0.5) for the new tokens."""
        B, S, _ = x.shape
        p = self.rope_dim
        q = self.wq_b(q_resid).view(B, S, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        q = torch.cat([apply_rope(q[..., :p], cos[:, :, None], sin[:, :, None], self.rope_interleaved), q[..., p:]], -1)
        k = torch.cat([apply_rope(k[..., :p], cos, sin, self.rope_interleaved), k[..., p:]], -1)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
        return q, k, w

    def select(self, q, k, w, allowed, key_end=None) -> torch.Tensor:
        """Top-k key indices [B,S,K] (int64, -1 where fewer than K keys are visible)."""
        return topk_indices(q, k, w, allowed, self.topk, self.head_dim**-0.5, key_end)


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """Unmasked scores for one query block: q [B,s,Hi,Di], k [B,T,Di], w [B,s,Hi] → [B,s,T] fp32."""
    B, s, Hi, Di = q.shape
    # one GEMM over all (query, head) rows instead of a batch of tiny ones
    sc = torch.bmm(q.float().reshape(B, s * Hi, Di), k.float().transpose(-1, -2)).view(B, s, Hi, -1)  # [B, s, Hi, T]
    sc = torch.relu_(sc)
    return torch.einsum("bsh,bsht->bst", w * scale, sc)  # ReLU(x·scale) = scale·ReLU(x) for scale > 0


def topk_indices(q, k, w, allowed, topk: int, scale: float, key_end=None) -> torch.Tensor:
    """allowed: callable (s0, s1) -> [B, s, T] bool mask for that query block. key_end: optional callable s1 -> the
    number of leading keys the block's queries can see at most (causal order); later keys are neither scored nor
    ranked, which halves the work of a causal prefill."""
    B, S = q.shape[:2]
    T = k.shape[1]
    K = min(topk, T)
    out = torch.full((B, S, K), -1, dtype=torch.long, device=q.device)
    per_query = B * q.shape[2] * T
    # one block when it fits: a compiled decode step then sees a size test, not a chunk count that changes with T
    chunk = S if S * per_query <= SCORE_BUDGET else max(1, SCORE_BUDGET // per_query)
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        te = T if key_end is None else max(1, min(T, key_end(s1)))
        sc = index_scores(q[:, s0:s1], k[:, :te], w[:, s0:s1], scale)
        sc = sc.masked_fill_(~allowed(s0, s1)[..., :te], float("-inf"))
        val, ids = sc.topk(min(K, te), dim=-1, sorted=False)  # a set: ranking it would cost more than choosing it
        out[:, s0:s1, : ids.shape[-1]] = ids.masked_fill_(val == float("-inf"), -1)
    return out
