"""Multi-head latent attention (DeepSeek-V2/V3 MLA) with the DSA indexer hook.

Legend: B batch, S new tokens, T keys, H heads, n = qk_nope_head_dim, p = qk_rope_head_dim, v = v_head_dim,
r = kv_lora_rank. Per token the cache-worthy state is the latent c [r] (after kv_a_layernorm) and the roped key k_r [p].
This is the expanded form (keys/values re-expanded through kv_b_proj), used for training and prefill; the absorbed
decode form belongs to the inference engine. Rope is on the trailing p dims (interleaved pairs, HF output layout).
"""

from __future__ import annotations

import torch
from torch import nn

from dsalite.config import ModelConfig
from dsalite.layers.indexer import Indexer
from dsalite.layers.mask import Visibility
from dsalite.layers.norm import RMSNorm
from dsalite.layers.rope import apply_rope
from dsalite.layers.sparse_attention import dense_attention, sparse_attention
from dsalite.layers.sparse_train import masked_attention


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.layer_idx = layer_idx
        self.n_heads, self.nope, self.rope, self.v_dim, self.rank = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, \
            cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.rope_interleaved = cfg.rope_interleave
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # eps fixed at 1e-6 in HF, whatever rms_norm_eps
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=bias)
        self.indexer_type = cfg.layer_indexer_type(layer_idx)  # None (no DSA) | "full" | "shared"
        self.index_topk = cfg.index_topk
        if self.indexer_type == "full":
            self.indexer = Indexer(D, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim,
                                   cfg.index_topk, cfg.indexer_rope_interleave)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, D]
        cos: torch.Tensor,  # [B, S, p/2]
        sin: torch.Tensor,
        vis: Visibility,
        topk_in: torch.Tensor | None = None,  # [B, S, K] from the most recent full layer (shared layers only)
        cache=None,
        dsa=None,  # training.losses.DSATraining: dense-attention switch and indexer-loss collector, per forward
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, S, _ = x.shape
        H, n, p = self.n_heads, self.nope, self.rope
        if hasattr(self, "q_proj"):
            q_resid, q = None, self.q_proj(x)
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_resid)
        q = q.view(B, S, H, n + p)
        c, k_r = self.kv_a_proj_with_mqa(x).split([self.rank, p], dim=-1)
        c = self.kv_a_layernorm(c)  # [B, S, r]
        q_r = apply_rope(q[..., n:], cos[:, :, None], sin[:, :, None], self.rope_interleaved)
        k_r = apply_rope(k_r, cos, sin, self.rope_interleaved)  # [B, S, p]
        if cache is not None:
            c, k_r = cache.update_latent(self.layer_idx, c, k_r)  # [B, T, r], [B, T, p]
        T = c.shape[1]

        topk, proj = self._select(x, q_resid, cos, sin, vis, topk_in, cache, T, dsa)

        if topk is None:
            o = self._attend_dense(q[..., :n], q_r, c, k_r, vis)
        else:
            o = self._attend_sparse(q[..., :n], q_r, c, k_r, topk)
        if proj is not None:
            dsa.add(self, proj, q[..., :n], q_r, c, k_r, vis, topk)
        return self.o_proj(o.reshape(B, S, H * self.v_dim)), topk

    def _expand(self, c, k_r):
        """Per-head keys [B,T,H,n+p] and values [B,T,H,v] from the latents, through kv_b_proj."""
        B, T, _ = c.shape
        H, n = self.n_heads, self.nope
        kv = self.kv_b_proj(c).view(B, T, H, n + self.v_dim)
        return torch.cat([kv[..., :n], k_r[:, :, None].expand(B, T, H, self.rope)], dim=-1), kv[..., n:]

    def _attend_dense(self, q_nope, q_r, c, k_r, vis):
        """Every visible key: expand the latents through kv_b_proj once and let SDPA do the rest."""
        k, v = self._expand(c, k_r)
        q = torch.cat([q_nope, q_r], dim=-1)
        return dense_attention(q, k, v, None if vis.plain_causal else vis.full(), self.scale)

    def _attend_sparse(self, q_nope, q_r, c, k_r, topk):
        """Selected keys only, in the absorbed (MQA) form: kv_b_proj's key half is folded into the query and its
        value half applied after the weighted sum, so only the [r+p] latents of the K chosen tokens are gathered
        (one copy for all heads) instead of K expanded keys per head."""
        if torch.is_grad_enabled():  # training: expanded keys, masked GEMMs (cheaper per query-key; sparse_train.py)
            k, v = self._expand(c, k_r)
            return masked_attention(torch.cat([q_nope, q_r], dim=-1), k, v, topk, self.scale)
        H, n, r = self.n_heads, self.nope, self.rank
        w = self.kv_b_proj.weight.view(H, n + self.v_dim, r)
        q_lat = torch.einsum("bshn,hnr->bshr", q_nope, w[:, :n])
        latent = torch.cat([c, k_r], dim=-1)[:, :, None]  # [B, T, 1, r+p]
        o_lat = sparse_attention(torch.cat([q_lat, q_r], dim=-1), latent, r, topk, self.scale)  # [B, S, H, r]
        return torch.einsum("bshr,hvr->bshv", o_lat, w[:, n:])

    def _select(self, x, q_resid, cos, sin, vis, topk_in, cache, T, dsa=None):
        """Top-k for this layer (None means every visible key: no DSA, index_topk >= T, or dense warm-up), and the
        indexer's (q, k, w) when a DSA training loss wants them."""
        if self.indexer_type is None:
            return None, None
        if self.indexer_type == "shared":
            return topk_in, None
        if dsa is not None:  # Megatron-Core isolation: the indexer learns only from its own loss
            x, q_resid = x.detach(), q_resid.detach()
        q, k, w = self.indexer.project(x, q_resid, cos, sin)
        if cache is not None:
            k = cache.update_index_keys(self.layer_idx, k)
        proj = (q, k, w) if dsa is not None else None
        if self.index_topk >= T or (dsa is not None and dsa.dense_attention):
            return None, proj
        with torch.no_grad():
            return self.indexer.select(q, k, w, vis.block), proj
