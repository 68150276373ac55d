"""Multi-token prediction layer (DeepSeek-V3 §2.2; GLM-5 ships one): predicts token t+2 from h_t and token t+1.

h' = Block(eh_proj([enorm(embed(x_{t+1})) ; hnorm(h_t)])), logits = head(shared_head.norm(h')).
On disk it is `model.layers.{L+k}` with its own block; `embed_tokens` and `shared_head.head` are copies of the main
model's in released checkpoints and are optional here (absent → the main model's are used). h_t is the main model's
final hidden state after its final norm, as the serving engines that run released MTP weights feed it.
HF transformers drops these weights; dsalite builds and loads them.
"""

from __future__ import annotations

import torch
from torch import nn

from dsalite.config import ModelConfig
from dsalite.indexshare import NOT_GIVEN
from dsalite.layers.context import Context
from dsalite.layers.block import Block
from dsalite.layers.linear import Linear
from dsalite.layers.norm import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, own_head: bool):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if own_head:
            self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MTPLayer(Block):
    def __init__(self, cfg: ModelConfig, depth: int, own_embeddings: bool = True):
        super().__init__(cfg, cfg.num_hidden_layers + depth)
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(cfg, own_embeddings)
        if own_embeddings:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, D)

    def step(self, h, next_ids, ctx: Context, main_embed, main_head, topk_in=NOT_GIVEN):
        """h [B,S,D] from the previous depth, next_ids [B,S] → (hidden [B,S,D], logits [B,S,V], top-k)."""
        embed = getattr(self, "embed_tokens", main_embed)
        head = getattr(self.shared_head, "head", main_head)
        x = self.eh_proj(torch.cat([self.enorm(embed(next_ids)), self.hnorm(h)], dim=-1))
        x, topk = super().forward(x, ctx, topk_in)
        return x, head(self.shared_head.norm(x)), topk
