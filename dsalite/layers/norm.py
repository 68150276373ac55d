"""RMSNorm as the DeepSeek-V3 family computes it: normalise in fp32, cast back, then multiply by the weight."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """HF `DeepseekV3RMSNorm`: the cast to the input dtype happens *before* the weight multiply (matters in bf16)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNormF32(RMSNorm):
    """Same as RMSNorm except the weight multiply happens in fp32 before the cast (HF `DeepseekV4RMSNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) without a weight; the rms is taken in fp32, the product in x's dtype (HF `UnweightedRMSNorm`)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
