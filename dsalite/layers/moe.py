"""Mixture of experts for the DeepSeek-V3 family: sigmoid group-limited router, fused experts, shared expert.

Legend: N tokens, D hidden, E routed experts, I expert width, k experts per token, G groups.
Router (HF `DeepseekV3TopkRouter`, noaux_tc): fp32 logits, s = sigmoid; the correction bias only steers selection;
groups scored by the sum of their top-2 biased scores, the best `topk_group` groups kept; weights are the unbiased s
of the chosen experts, normalised (+1e-20) and times routed_scaling_factor.
Experts hold fused weights gate_up [E, 2I, D] (gate rows first) and down [E, D, I]; tokens are sorted by expert and
each expert runs one matmul over its tokens; the routing weight multiplies after `down` and the k outputs of a token
are summed last, in the order HF's grouped_mm backend uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsalite.config import ModelConfig

# At most this many (token, expert) pairs take the gathered-weights path instead of the sort-by-expert loop.
SMALL_BATCH = 16


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and the shared expert)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] → (weights [N, k] fp32, expert ids [N, k], scores [N, E] fp32)."""
        s = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = s + self.e_score_correction_bias
        if self.n_group > 1:
            N, E = biased.shape
            grouped = biased.view(N, self.n_group, E // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            biased = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
        ids = biased.topk(self.top_k, dim=-1, sorted=False).indices
        w = s.gather(1, ids)
        if self.norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scaling, ids, s


class Experts(nn.Module):
    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids/w [N, k] → [N, D]."""
        N, k = ids.shape
        if N * k <= SMALL_BATCH:
            return self._gathered(x, ids, w)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        xs = x[order // k]
        ys = torch.empty_like(xs)
        start = 0
        for e, cnt in enumerate(counts):
            if cnt == 0:
                continue
            seg = slice(start, start + cnt)
            gate, up = F.linear(xs[seg], self.gate_up_proj[e]).chunk(2, dim=-1)
            ys[seg] = F.linear(F.silu(gate) * up, self.down_proj[e])
            start += cnt
        ys = ys * w.reshape(-1)[order, None].to(ys.dtype)
        out = torch.empty_like(ys)
        out[order] = ys
        return out.view(N, k, -1).sum(1)

    def _gathered(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Few tokens (decode): gather the chosen experts' weights and run two batched matmuls, no per-expert loop."""
        N, k = ids.shape
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(k, 0)[:, None]  # [N·k, 1, D]
        gate, up = torch.bmm(xs, self.gate_up_proj[flat].transpose(1, 2)).chunk(2, dim=-1)
        ys = torch.bmm(F.silu(gate) * up, self.down_proj[flat].transpose(1, 2))[:, 0]  # [N·k, D]
        ys = ys * w.reshape(-1, 1).to(ys.dtype)
        return ys.view(N, k, -1).sum(1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, ids, _ = self.gate(flat)
        y = self.experts(flat, ids, w).view(shape)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y
