"""One decoder block: pre-norm MLA (+ DSA) and pre-norm MLP/MoE, with the IndexShare top-k passed through."""

from __future__ import annotations

import torch
from torch import nn

from dsalite.config import ModelConfig
from dsalite.indexshare import NOT_GIVEN
from dsalite.layers.context import Context
from dsalite.layers.mla import MLA
from dsalite.layers.moe import MLP, MoE
from dsalite.layers.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.layer_mlp_type(layer_idx) == "sparse":
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: Context, topk_in=NOT_GIVEN) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B,S,D] → (new hidden state, the top-k this layer used; the next shared layer reuses it)."""
        a, topk = self.self_attn(self.input_layernorm(x), ctx, topk_in)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, topk
