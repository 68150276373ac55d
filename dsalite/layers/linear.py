"""Linear layers: fp32 CPU products on the faster BLAS (`kernels.blas`), and the one-row case written as a
multiply-reduce when torch.compile traces it.

`Linear` is nn.Linear (same parameters, names and isinstance) whose forward calls `dense`: the forward product and,
under autograd, both gradient products go through `kernels.blas.mm` (OpenBLAS on x86 CPUs that are not Intel's,
where torch's MKL runs generic code). Elsewhere (GPU, bf16/autocast, compiled graphs, decode rows) it is F.linear.

A decode step's products have one row: they only stream the weight. Inductor turns `(x * W).sum(-1)` into a fused
loop that streams fp32 weights about twice as fast as the library GEMV on this kind of CPU; its own decomposition
pass does this for weights up to 2048 wide, `linear` covers the wider ones (LM head, dense MLPs). Eager calls, and
layers that are more than a plain Linear (LoRA adapters, biases), go through the module as usual.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dsalite.kernels import blas


class _BlasLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        y = blas.mm(x2, weight.t())
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = blas.mm(dy2, weight).view(*dy.shape[:-1], weight.shape[1]) if ctx.needs_input_grad[0] else None
        dw = blas.mm(dy2.t(), x2) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), its products on `kernels.blas` when they qualify."""
    if torch.compiler.is_compiling():  # inductor's own products; a size test would make the rows a graph constant
        return F.linear(x, weight, bias)
    rows = x.numel() // max(1, x.shape[-1])
    if rows < blas.MIN_ROWS or not blas.usable(x, weight):
        return F.linear(x, weight, bias)
    return _BlasLinear.apply(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `dense` (same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias)


class _HeadMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        H, a, b = w.shape
        x2 = x.reshape(-1, H, a)
        out = x.new_empty(x2.shape[0], H, b)
        for h in range(H):
            blas.mm(x2[:, h], w[h], out=out[:, h])
        ctx.save_for_backward(x2, w)
        return out.view(*x.shape[:-1], b)

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        H, a, b = w.shape
        dy2 = dy.reshape(-1, H, b)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = dy.new_empty(dy2.shape[0], H, a)
            for h in range(H):
                blas.mm(dy2[:, h], w[h].t(), out=dx[:, h])
            dx = dx.view(*dy.shape[:-1], a)
        if ctx.needs_input_grad[1]:
            dw = w.new_empty(H, a, b)
            for h in range(H):
                blas.mm(x2[:, h].t(), dy2[:, h], out=dw[h])
        return dx, dw


def head_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., H, a] times one matrix per head, w [H, a, b] (any strides) → [..., H, b]: MLA's absorbed query and
    output maps. One `kernels.blas` product per head on strided views (no transposed copies) where it qualifies, else
    einsum."""
    if torch.compiler.is_compiling():  # inductor's own products; a size test would make the rows a graph constant
        return torch.einsum("...ha,hab->...hb", x, w)
    rows = x.numel() // max(1, x.shape[-1] * x.shape[-2])
    if rows < blas.MIN_ROWS or not blas.usable(x, w):
        return torch.einsum("...ha,hab->...hb", x, w)
    return _HeadMatmul.apply(x, w)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() and type(layer) in (nn.Linear, Linear) and layer.bias is None \
            and x.shape[:-1].numel() == 1:
        return (x.unsqueeze(-2) * layer.weight).sum(-1)
    return layer(x)
