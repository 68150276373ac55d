"""RMSNorm as the DeepSeek-V3 family computes it: normalise in fp32, cast back, then multiply by the weight."""

import torch
import torch.nn.functional as F
from torch import nn

from dsalite import kernels


class RMSNorm(nn.Module):
    """HF `DeepseekV3RMSNorm`: the cast to the input dtype happens *before* the weight multiply (matters in bf16)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.elementwise_ready(x, self.weight):  # fp32: where both classes compute the same thing
            return KernelRMSNorm.apply(x, self.weight, self.eps)
        return self._pytorch(x)

    def _pytorch(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNormF32(RMSNorm):
    """Same as RMSNorm except the weight multiply happens in fp32 before the cast (HF `DeepseekV4RMSNorm`); in fp32
    the two are the same computation."""

    def _pytorch(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


class KernelRMSNorm(torch.autograd.Function):
    """fp32 RMSNorm by the CPU kernel: one pass over each row forward (keeping 1/rms per row) and one backward, where
    PyTorch's ops and their autograd nodes pass over the whole tensor about ten times. The weight's gradient is summed
    per thread part, then across parts."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        D = x.shape[-1]
        rows = x.reshape(-1, D)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        w = weight.contiguous()
        y = x.new_empty(rows.shape)
        rstd = x.new_empty(rows.shape[0])
        lib = kernels.load()
        args = (rows.data_ptr(), rows.stride(0), w.data_ptr(), D, eps, y.data_ptr(), D, rstd.data_ptr())
        kernels.split_rows(lambda r0, r1: lib.dsa_rms_norm(*args, r0, r1), rows.shape[0], torch.get_num_threads())
        ctx.save_for_backward(rows, w, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, w, rstd = ctx.saved_tensors
        n, D = rows.shape
        dy = dy.reshape(n, D).contiguous()
        dx = dy.new_empty(n, D)
        threads = kernels.row_parts(n, torch.get_num_threads())
        bounds = kernels.even_bounds(n, threads)
        dw = dy.new_zeros(threads, D)  # one partial sum per thread part
        lib = kernels.load()
        args = (rows.data_ptr(), rows.stride(0), w.data_ptr(), D, rstd.data_ptr(), dy.data_ptr(), dx.data_ptr())
        kernels.run_parts(lambda i, r0, r1: lib.dsa_rms_norm_bwd(*args, dw[i].data_ptr(), r0, r1), bounds, threads)
        return dx.view(ctx.x_shape), dw.sum(0) if ctx.needs_input_grad[1] else None, None


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) without a weight; the rms is taken in fp32, the product in x's dtype (HF `UnweightedRMSNorm`)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
