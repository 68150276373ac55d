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
