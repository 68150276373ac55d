"""A linear layer's call, with the one-row case written as a multiply-reduce when torch.compile traces it.

A decode step's products have one row: they only stream the weight. Inductor turns `(x * W).sum(-1)` into a fused
loop that streams fp32 weights about twice as fast as the library GEMV on this kind of CPU; its own decomposition
pass does this for weights up to 2048 wide, this covers the wider ones (LM head, dense MLPs). Eager calls, and layers
that are more than a plain nn.Linear (LoRA adapters, biases), go through the module as usual.
"""

import torch
from torch import nn


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() and type(layer) is nn.Linear and layer.bias is None \
            and x.shape[:-1].numel() == 1:
        return (x.unsqueeze(-2) * layer.weight).sum(-1)
    return layer(x)
