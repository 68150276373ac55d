"""Multi-head latent attention (DeepSeek-V2/V3 MLA) with the DSA indexer hook.

Legend: B batch, S new tokens, T keys, H heads, n = qk_nope_head_dim, p = qk_rope_head_dim, v = v_head_dim,
r = kv_lora_rank. Per token the cache-worthy state is the latent [c | k_r] (r + p numbers): c after kv_a_layernorm,
k_r the roped shared key. Two equivalent forms: expanded (keys/values re-expanded through kv_b_proj; many queries, e.g.
training and long prefill chunks) and absorbed (kv_b_proj folded into the query and the output, attention runs as MQA
over the latents; sparse selections and decode). Rope is on the trailing p dims (interleaved pairs, HF output layout).
"""

from __future__ import annotations

import torch
from torch import nn

from dsalite.config import ModelConfig
from dsalite.indexshare import NOT_GIVEN, IndexShareError, source_layer
from dsalite.layers.context import Context
from dsalite.layers.indexer import Indexer
from dsalite.layers.linear import Linear, head_matmul
from dsalite.layers.norm import RMSNorm
from dsalite.layers.rope import apply_rope
from dsalite.layers.sparse_attention import dense_attention, kernel_ready, sparse_attention
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
            self.q_proj = Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # eps fixed at 1e-6 in HF, whatever rms_norm_eps
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(H * cfg.v_head_dim, D, bias=bias)
        self.indexer_type = cfg.layer_indexer_type(layer_idx)  # None (no DSA) | "full" | "shared"
        self.index_topk = cfg.index_topk
        if self.indexer_type == "shared":
            self.source = source_layer(cfg.indexer_types, layer_idx)
        if self.indexer_type == "full":
            self.indexer = Indexer(D, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim,
                                   cfg.index_topk, cfg.indexer_rope_interleave)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, D]
        ctx: Context,  # rope["main"] (cos, sin) [B, S, p/2], visibility, cache, DSA training collector
        topk_in=NOT_GIVEN,  # [B, S, K] from the most recent full layer (read by shared layers only)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, S, _ = x.shape
        (cos, sin), vis, cache, dsa = ctx.rope["main"], ctx.vis, ctx.cache, ctx.dsa
        H, n, p = self.n_heads, self.nope, self.rope
        if hasattr(self, "q_proj"):
            q_resid, q = None, self.q_proj(x)
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_resid)
        q = q.view(B, S, H, n + p)
        c, k_r = self.kv_a_proj_with_mqa(x).split([self.rank, p], dim=-1)
        q_r = apply_rope(q[..., n:], cos[:, :, None], sin[:, :, None], self.rope_interleaved)
        latent = torch.cat([self.kv_a_layernorm(c), apply_rope(k_r, cos, sin, self.rope_interleaved)], -1)  # [B,S,r+p]
        paged = cache is not None and cache.paged
        if paged:  # the new latents go to their slots; rows are read below, the K picked ones only where sparse
            T, latent = cache.store_latent(self.layer_idx, latent), None
        else:
            if cache is not None:
                latent = cache.update_latent(self.layer_idx, latent)  # [B, T, r+p]
            elif ctx.gather is not None:  # context parallel: every token's latent (never expanded keys) from its rank
                latent = ctx.gather(latent)  # [B, T, r+p]
            T = latent.shape[1]

        topk, proj = self._select(x, q_resid, cos, sin, vis, topk_in, cache, T, dsa, ctx.gather)

        if paged and (topk is None or proj is not None):  # dense attention (or a loss) reads every key
            latent = cache.latent_rows(self.layer_idx)  # [B, T, r+p]
        if topk is None:
            o = self._attend_dense(q[..., :n], q_r, latent, vis)
        elif latent is None:  # paged: every query of the step attends over the cache's slot pool [N, r+p]
            pool, slots = cache.picked_slots(self.layer_idx, topk)  # slots [B, S, K], -1 = none
            flat = (1, B * S, H)
            o = self._attend_sparse(q[..., :n].reshape(*flat, n), q_r.reshape(*flat, p), pool[None],
                                    slots.view(1, B * S, -1)).view(B, S, H, self.v_dim)
        else:
            o = self._attend_sparse(q[..., :n], q_r, latent, topk)
        if proj is not None:
            dsa.add(self, proj, q[..., :n], q_r, latent, vis, topk)
        return self.o_proj(o.reshape(B, S, H * self.v_dim)), topk

    def attention_flops(self, seq_len: int) -> float:
        """Per token, averaged over a causal sequence of seq_len: attention over the keys it sees (min(index_topk,
        visible) on DSA layers, all visible otherwise) and, on full layers, the indexer's scoring."""
        visible = (seq_len + 1) / 2
        keys = visible if self.indexer_type is None else \
            sum(min(self.index_topk, j + 1) for j in range(seq_len)) / seq_len
        flops = 2 * self.n_heads * (self.nope + self.rope + self.v_dim) * keys
        if self.indexer_type == "full":
            ix = self.indexer
            flops += 2 * ix.n_heads * ix.head_dim * visible + 2 * ix.n_heads * visible
        return flops

    def _expand(self, latent):
        """Per-head keys [B,T,H,n+p] and values [B,T,H,v] from the latents, through kv_b_proj."""
        B, T, _ = latent.shape
        H, n, r = self.n_heads, self.nope, self.rank
        kv = self.kv_b_proj(latent[..., :r]).view(B, T, H, n + self.v_dim)
        return torch.cat([kv[..., :n], latent[:, :, None, r:].expand(B, T, H, self.rope)], dim=-1), kv[..., n:]

    def _attend_dense(self, q_nope, q_r, latent, vis):
        """Every visible key. Few queries over many keys (decode): the absorbed form, so the T cached latents are
        never re-expanded; otherwise expand the latents through kv_b_proj once and let SDPA do the rest."""
        S = q_nope.shape[1]
        H, n, r, v = self.n_heads, self.nope, self.rank, self.v_dim
        mask = None if vis.plain_causal else vis.full()
        if S * (2 * r - n - v) < r * (n + v):  # absorbed costs S·T·H·(2r+p), expanded T·r·H·(n+v) + S·T·H·(n+p+v)
            w = self.kv_b_proj.weight.view(H, n + v, r)
            q = torch.cat([head_matmul(q_nope, w[:, :n]), q_r], dim=-1)  # [B, S, H, r+p]
            o_lat = dense_attention(q, latent[:, :, None], latent[:, :, None, :r], mask, self.scale)  # [B, S, H, r]
            return head_matmul(o_lat, w[:, n:].transpose(1, 2))
        k, vv = self._expand(latent)
        return dense_attention(torch.cat([q_nope, q_r], dim=-1), k, vv, mask, self.scale)

    def _attend_sparse(self, q_nope, q_r, latent, topk):
        """Selected keys only, in the absorbed (MQA) form: kv_b_proj's key half is folded into the query and its
        value half applied after the weighted sum, so only the [r+p] latents of the K chosen tokens are gathered
        (one copy for all heads) instead of K expanded keys per head."""
        if torch.is_grad_enabled() and not kernel_ready(q_nope, latent[:, :, None], self.rank):
            # training without the CPU kernel (GPU, bf16 autocast): expanded keys, masked GEMMs (sparse_train.py)
            k, v = self._expand(latent)
            return masked_attention(torch.cat([q_nope, q_r], dim=-1), k, v, topk, self.scale)
        H, n, r = self.n_heads, self.nope, self.rank
        w = self.kv_b_proj.weight.view(H, n + self.v_dim, r)
        q_lat = head_matmul(q_nope, w[:, :n])
        o_lat = sparse_attention(torch.cat([q_lat, q_r], dim=-1), latent[:, :, None], r, topk, self.scale)  # [B,S,H,r]
        return head_matmul(o_lat, w[:, n:].transpose(1, 2))

    def _select(self, x, q_resid, cos, sin, vis, topk_in, cache, T, dsa=None, gather=None):
        """Top-k for this layer (None means every visible key: no DSA, index_topk >= T, or dense warm-up), and the
        indexer's (q, k, w) when a DSA training loss wants them (k of every token under context parallel)."""
        if self.indexer_type is None:
            return None, None
        if self.indexer_type == "shared":
            if topk_in is NOT_GIVEN:
                raise IndexShareError(
                    f"layer {self.layer_idx} is an IndexShare 'shared' layer but was given no top-k: its source, "
                    f"layer {self.source}, must run before it in the same forward (or its top-k be passed in)")
            return topk_in, None
        if dsa is not None:  # Megatron-Core isolation: the indexer learns only from its own loss
            x, q_resid = x.detach(), q_resid.detach()
        q, k, w = self.indexer.project(x, q_resid, cos, sin)
        tiles = None
        if cache is not None:
            k = cache.update_index_keys(self.layer_idx, k)
            tiles = cache.index_key_tiles(self.layer_idx)
        elif gather is not None:
            k = gather(k)  # [B, T, Di]
        proj = (q, k, w) if dsa is not None else None
        if self.index_topk >= T or (dsa is not None and dsa.dense_attention):
            return None, proj
        with torch.no_grad():
            return self.indexer.select(q, k, w, vis.block, vis.key_range, tiles), proj
