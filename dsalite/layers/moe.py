"""Mixture of experts for the DeepSeek-V3 family: sigmoid group-limited router, fused experts, shared expert.

Legend: N tokens, D hidden, E routed experts, I expert width, k experts per token, G groups.
Router (HF `DeepseekV3TopkRouter`, noaux_tc): fp32 logits, s = sigmoid; the correction bias only steers selection;
groups scored by the sum of their top-2 biased scores, the best `topk_group` groups kept; weights are the unbiased s
of the chosen experts, normalised (+1e-20) and times routed_scaling_factor.
DeepSeek-V4 variants (same experts, different routers): `SqrtSoftplusRouter` and `HashRouter`, and SwiGLU clamped at
`swiglu_limit` in routed and shared experts.
Experts hold fused weights gate_up [E, 2I, D] (gate rows first) and down [E, D, I]; tokens are sorted by expert and
each expert runs one matmul over its tokens; the routing weight multiplies after `down` and the k outputs of a token
are summed last, in the order HF's grouped_mm backend uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsalite import kernels
from dsalite.config import ModelConfig
from dsalite.layers.linear import Linear, dense, linear

# At most this many (token, expert) pairs take the per-pair path instead of the sort-by-expert loop.
SMALL_BATCH = 16


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate)·up; with a limit (V4), gate is clamped from above and up to ±limit first (HF `_apply_gate`)."""
    if limit is None and kernels.elementwise_ready(gate, up):
        return KernelSwiGLU.apply(gate, up)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def swiglu_fused(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """`swiglu` of the two halves of gate_up [..., 2I] (gate first); the kernel writes its gradient in one piece."""
    if limit is None and kernels.elementwise_ready(gate_up):
        return KernelSwiGLU.apply(gate_up, None)
    return swiglu(*gate_up.chunk(2, dim=-1), limit=limit)


class KernelSwiGLU(torch.autograd.Function):
    """fp32 silu(gate)·up by the CPU kernel, one pass forward and one backward (PyTorch's silu, mul and their autograd
    nodes each pass over the [N, I] blocks). Takes gate and up [..., I], or (gate_up [..., 2I], None) for the experts'
    fused projection, whose gradient then comes back as one tensor instead of two halves autograd joins."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
        fused = up is None
        ctx.shape = gate.shape
        if fused:
            I = gate.shape[-1] // 2
            gu = gate.reshape(-1, 2 * I).contiguous()
            g, u = gu[:, :I], gu[:, I:]
        else:
            I = gate.shape[-1]
            g, u = gate.reshape(-1, I).contiguous(), up.reshape(-1, I).contiguous()
        out = g.new_empty(g.shape[0], I)
        lib = kernels.load()
        args = (g.data_ptr(), u.data_ptr(), g.stride(0), I, out.data_ptr())
        kernels.split_rows(lambda r0, r1: lib.dsa_swiglu(*args, r0, r1), g.shape[0], torch.get_num_threads())
        ctx.save_for_backward(g, u)
        ctx.fused = fused
        return out.view(*gate.shape[:-1], I)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        g, u = ctx.saved_tensors
        N, I = g.shape
        dout = dout.reshape(N, I).contiguous()
        if ctx.fused:
            dgu = dout.new_empty(N, 2 * I)
            dg, du = dgu[:, :I], dgu[:, I:]
        else:
            dg, du = dout.new_empty(N, I), dout.new_empty(N, I)
        lib = kernels.load()
        args = (g.data_ptr(), u.data_ptr(), g.stride(0), I, dout.data_ptr(), dg.data_ptr(), du.data_ptr())
        kernels.split_rows(lambda r0, r1: lib.dsa_swiglu_bwd(*args, r0, r1), N, torch.get_num_threads())
        return (dgu.view(ctx.shape), None) if ctx.fused else (dg.view(ctx.shape), du.view(ctx.shape))


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and the shared expert)."""

    def __init__(self, dim: int, inter: int, limit: float | None = None):
        super().__init__()
        self.gate_proj = Linear(dim, inter, bias=False)
        self.up_proj = Linear(dim, inter, bias=False)
        self.down_proj = Linear(inter, dim, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(self.gate_proj, x), linear(self.up_proj, x)
        return linear(self.down_proj, swiglu(gate, up, self.limit))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


class SqrtSoftplusRouter(nn.Module):
    """DeepSeek-V4 router (HF `DeepseekV4TopKRouter`): s = sqrt(softplus(x·Wᵀ)), no groups; the bias steers selection.

    Two choices copied from HF on purpose: the logits stay in the model dtype (the V3 router upcasts to fp32), and the
    weights are always normalised (HF ignores `norm_topk_prob` here).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.scaling = cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(F.linear(x, self.weight)).sqrt()  # [N, E], model dtype

    def forward(self, x: torch.Tensor, input_ids=None):
        s = self.scores(x)
        ids = (s + self.e_score_correction_bias).topk(self.top_k, dim=-1, sorted=False).indices
        return _normalised(s, ids, self.scaling), ids, s


class HashRouter(SqrtSoftplusRouter):
    """Same as SqrtSoftplusRouter except the experts come from a fixed token-id table: ids = tid2eid[input_ids]
    (HF `DeepseekV4HashRouter`, the first `num_hash_layers` layers). No selection bias."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.top_k, self.scaling = cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))

    def forward(self, x: torch.Tensor, input_ids=None):
        if input_ids is None:
            raise ValueError("hash-routed MoE layer needs input_ids (tid2eid[input_ids] picks the experts)")
        s = self.scores(x)
        ids = self.tid2eid[input_ids.reshape(-1)].long()  # [N, k]
        return _normalised(s, ids, self.scaling), ids, s


def _normalised(s: torch.Tensor, ids: torch.Tensor, scaling: float) -> torch.Tensor:
    w = s.gather(1, ids)
    return w / (w.sum(-1, keepdim=True) + 1e-20) * scaling


class Experts(nn.Module):
    def __init__(self, n_experts: int, dim: int, inter: int, limit: float | None = None):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter))
        self.limit = limit

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids/w [N, k] → [N, D]."""
        N, k = ids.shape
        if torch.compiler.is_compiling():  # only few-token calls are compiled (inference.engine.Runner)
            return self._few_compiled(x, ids, w)
        if N * k <= SMALL_BATCH:
            return self._few(x, ids, w)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        # split/cat/unbind instead of slicing and slice assignment: their backwards move each gradient once, where
        # a slice's backward zero-fills a full-size gradient for every expert
        xs = x.index_select(0, order // k).split(counts)
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        ys = torch.cat([dense(swiglu_fused(dense(xs[e], gate_up[e]), self.limit), down[e])
                        for e, cnt in enumerate(counts) if cnt])
        ys = ys * w.reshape(-1)[order, None].to(ys.dtype)
        slot_of = torch.empty_like(order)
        slot_of[order] = torch.arange(order.numel(), device=order.device)
        return ys.index_select(0, slot_of).view(N, k, -1).sum(1)

    def _few(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Few tokens (decode): one matmul pair per (token, expert) on views of the expert weights — no sorting and
        no copy of the weights (gathering the chosen experts' [2I, D] matrices would move more bytes than the math)."""
        out = []
        for t, row in enumerate(ids.tolist()):
            acc = None
            for j, e in enumerate(row):
                gate, up = F.linear(x[t], self.gate_up_proj[e]).chunk(2, dim=-1)
                y = F.linear(swiglu(gate, up, self.limit), self.down_proj[e]) * w[t, j].to(x.dtype)
                acc = y if acc is None else acc + y
            out.append(acc)
        return torch.stack(out)

    def _few_compiled(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """`_few` for torch.compile: the expert choice stays a tensor (no graph break on `tolist`), and inductor fuses
        the indexing of the expert weights into the matrix-vector loops, so no weights are copied here either."""
        N, k = ids.shape
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(k, 0)  # [N*k, D], row j·k+i is token j for its i-th expert
        gate, up = torch.einsum("nd,nhd->nh", xs, self.gate_up_proj[flat]).chunk(2, dim=-1)
        y = torch.einsum("ni,ndi->nd", swiglu(gate, up, self.limit), self.down_proj[flat])
        return (y * w.reshape(-1, 1).to(y.dtype)).view(N, k, -1).sum(1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, router: str = "sigmoid"):
        """router: 'sigmoid' (V3 family), 'sqrtsoftplus' or 'hash' (V4)."""
        super().__init__()
        self.gate = {"sigmoid": Router, "sqrtsoftplus": SqrtSoftplusRouter, "hash": HashRouter}[router](cfg)
        limit = cfg.swiglu_limit
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, limit)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, limit)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, ids, _ = self.gate(flat, input_ids)
        y = self.experts(flat, ids, w).view(shape)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y
