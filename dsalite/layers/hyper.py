"""mHC (manifold-constrained hyper-connections, DeepSeek-V4 §2.2): the residual is N parallel streams.

Legend: B batch, S tokens, N = hc_mult streams, D hidden. Around every attention / MoE sub-block a `HyperConnection`
reads the streams x [B,S,N,D] and emits pre [B,S,N] (collapses the streams into the sub-block's input), post [B,S,N]
(spreads its output back) and comb [B,S,N,N], projected by Sinkhorn onto (nearly) doubly stochastic matrices.
New streams: x'_n = post_n·f + Σ_j comb[j,n]·x_j, i.e. combᵀ @ x — comb is not symmetric, and mixing with comb
instead of combᵀ is a bug other projects shipped (Megatron-LM #4957). `HyperHead` collapses the streams at the end.
Coefficients are computed in fp32 from an unweighted RMS of the flattened streams (HF `DeepseekV4HyperConnection`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsalite.layers.norm import unweighted_rms_norm


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., N, N] positive → columns normalised once, then (rows, columns) iters−1 times, each `/ (sum + eps)`."""
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Σ_n pre_n · x_n: x [B,S,N,D], pre [B,S,N] fp32 → [B,S,D] in x's dtype (the sum runs in fp32)."""
    return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


def expand(x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """New streams post_n·out + (combᵀ @ x)_n: x [B,S,N,D], post [B,S,N], comb [B,S,N,N], out [B,S,D]."""
    dt = x.dtype
    return post.to(dt).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), x)


class HyperConnection(nn.Module):
    def __init__(self, n: int, dim: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.hc_eps, self.norm_eps = n, sinkhorn_iters, hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * dim))  # rows: pre [N] | post [N] | comb [N·N]
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))  # pre, post, comb

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,S,N,D] → (post [B,S,N], comb [B,S,N,N], sub-block input [B,S,D])."""
        B, S, N, _ = x.shape
        mix = F.linear(unweighted_rms_norm(x.reshape(B, S, -1).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mix.split([N, N, N * N], dim=-1)
        pre_b, post_b, comb_b = self.base.split([N, N, N * N])
        pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * self.scale[1] + post_b)
        comb = torch.softmax(comb_w.view(B, S, N, N) * self.scale[2] + comb_b.view(N, N), dim=-1) + self.hc_eps
        return post, sinkhorn(comb, self.iters, self.hc_eps), collapse(x, pre)


class HyperHead(nn.Module):
    """Final collapse of the streams before the model norm: pre = σ(flat·hc_fnᵀ·hc_scale + hc_base) + eps."""

    def __init__(self, n: int, dim: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * dim))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,S,N,D] → [B,S,D]
        mix = F.linear(unweighted_rms_norm(x.flatten(2).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return collapse(x, pre)
