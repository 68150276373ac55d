"""DeepSeek-V4 attention and decoder block (HF `DeepseekV4Attention` / `DeepseekV4DecoderLayer`), and its MTP layer.

Legend: B batch, S tokens, D hidden, H heads, c = head_dim (one K=V head shared by all heads), p rope width,
Wn sliding window, E compressed entries, G = o_groups, r = o_lora_rank, N = hc_mult streams.
Attention: q = q_b_norm(q_b_proj(q_a_norm(q_a_proj(x)))) per head (unweighted RMS); kv = kv_norm(kv_proj(x)) is both
key and value; rope on the trailing p dims (the `main` rope on sliding layers, `compress` on CSA/HCA layers). A query
sees the Wn most recent tokens (itself included) plus compressed entries (HCA: every complete one; CSA: the indexer's
top-k). The softmax has a per-head sink logit in its denominator; scale c^-0.5. Because V carried K's rope, the
output's rope dims are rotated back (−sin at the query position), then the grouped low-rank output projection.
Attention reads each query block's window in place and gathers only the picked entries (`window_attention`):
cost ∝ S·(Wn + k), never an S×S mask.
"""

from __future__ import annotations

import torch
from torch import nn

from dsalite.config import ModelConfig
from dsalite.indexshare import NOT_GIVEN
from dsalite.layers.context import Context
from dsalite.presets import CSA, HCA
from dsalite.layers.compressor import CSACompressor, HCACompressor
from dsalite.layers.hyper import HyperConnection, HyperHead, expand
from dsalite.layers.linear import Linear
from dsalite.layers.moe import MoE
from dsalite.layers.norm import RMSNormF32, unweighted_rms_norm
from dsalite.layers.rope import apply_rope_trailing
from dsalite.layers.window_attention import window_attention


class GroupedLinear(nn.Module):
    """Block-diagonal projection: group g of the input [.., G, in/G] meets rows g·r..(g+1)·r of weight [G·r, in/G]."""

    def __init__(self, in_per_group: int, out: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [.., G, i] -> [.., G, r]
        w = self.weight.view(self.groups, -1, self.weight.shape[-1])  # [G, r, i]
        return torch.einsum("...gi,gri->...gr", x, w)


class V4Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, H, c, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps
        self.n_heads, self.head_dim, self.window, self.eps = H, c, cfg.sliding_window, eps
        self.layer_idx = layer_idx
        self.kind = cfg.layer_attention_type(layer_idx)
        self.rope_label = "main" if self.kind not in (CSA, HCA) else "compress"
        self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNormF32(cfg.q_lora_rank, eps)
        self.q_b_proj = Linear(cfg.q_lora_rank, H * c, bias=False)
        self.kv_proj = Linear(D, c, bias=False)
        self.kv_norm = RMSNormF32(c, eps)
        G = cfg.o_groups
        self.o_a_proj = GroupedLinear(H * c // G, G * cfg.o_lora_rank, G)
        self.o_b_proj = Linear(G * cfg.o_lora_rank, D, bias=False)
        self.sinks = nn.Parameter(torch.empty(H))
        if self.kind == CSA:
            self.compressor = CSACompressor(D, c, cfg.compress_rates[CSA], eps, cfg.q_lora_rank, cfg.index_n_heads,
                                            cfg.index_head_dim, cfg.index_topk)
        elif self.kind == HCA:
            self.compressor = HCACompressor(D, c, cfg.compress_rates[HCA], eps)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, S, _ = x.shape
        H, c = self.n_heads, self.head_dim
        cos, sin = ctx.rope[self.rope_label]
        cos_h, sin_h = cos[:, :, None], sin[:, :, None]
        q_resid = self.q_a_norm(self.q_a_proj(x))  # [B, S, q_lora]
        q = unweighted_rms_norm(self.q_b_proj(q_resid).view(B, S, H, c), self.eps)  # q_b_norm
        q = apply_rope_trailing(q, cos_h, sin_h)  # [B, S, H, c]
        kv = apply_rope_trailing(self.kv_norm(self.kv_proj(x)), cos, sin)  # [B, S, c]
        cache = ctx.cache
        self._check(S, ctx.vis, cache)
        keys = kv if cache is None else cache.update_window(self.layer_idx, kv)  # [B, T, c], T ≥ S
        valid = ctx.vis.key_valid if ctx.vis.hides_keys else None  # [B, T0 + S] False = padding
        new_valid = None if valid is None else valid[:, valid.shape[1] - S :]  # [B, S]
        entries = picks = None
        if hasattr(self, "compressor"):  # entries [B, E, c], picks [B, S, K] (−1 = none)
            states = None if cache is None else cache.compressor_states(self.layer_idx, new_valid, S)
            extra = {} if ctx.dsa is None or self.kind != CSA else {"dsa": ctx.dsa, "q_main": q,
                                                                     "layer_idx": self.layer_idx}
            entries, picks = self.compressor.entries(x, q_resid, cos, sin, ctx.positions, ctx.tables["compress"],
                                                     states, ctx.vis.segments, **extra)
        if cache is None:  # padding hides window keys only, as in HF
            key_valid = ctx.vis.key_valid
        else:  # left padding: hidden as window keys, skipped by the compressors (rows' own windows, V4Cache)
            key_valid = None if valid is None else valid[:, valid.shape[1] - keys.shape[1] :]
        o = window_attention(q, keys, self.window, c**-0.5, self.sinks, entries, picks, key_valid, ctx.vis.segments)
        o = apply_rope_trailing(o, cos_h, -sin_h)  # undo the values' rope
        o = self.o_a_proj(o.reshape(B, S, self.o_a_proj.groups, -1)).flatten(2)  # [B, S, G·r]
        return self.o_b_proj(o)

    def attention_flops(self, seq_len: int) -> float:
        """Per token, averaged over a causal sequence of seq_len: q·k and p·v over the window keys and the entries it
        reads (HCA: every complete one; CSA: the top-k of them, plus the indexer scoring every complete one)."""
        H, c = self.n_heads, self.head_dim
        comp = getattr(self, "compressor", None)
        total = 0.0
        for j in range(seq_len):
            keys = min(self.window, j + 1)
            if comp is not None:
                done = (j + 1) // comp.ratio
                ix = getattr(comp, "indexer", None)
                keys += done if ix is None else min(ix.topk, done)
                if ix is not None:
                    total += 2 * ix.n_heads * ix.width * done + 2 * ix.n_heads * done
            total += 2 * H * 2 * c * keys
        return total / seq_len

    @staticmethod
    def _check(S: int, vis, cache) -> None:
        """Without a cache padding (`key_valid`) hides window keys only, as in HF; with one it is left padding, which
        the compressors skip too. Packed documents (`segments`) only without a cache (training: each document's
        windows and compression start at its first token)."""
        if cache is not None and not hasattr(cache, "update_window"):
            raise ValueError(f"deepseek_v4 needs its own cache (families/deepseek_v4/cache.py V4Cache), "
                             f"got {type(cache).__name__}")
        if cache is None and (vis.offset or vis.num_keys != S):
            raise ValueError("deepseek_v4 attention without a cache sees exactly the given tokens (offset 0)")
        if vis.segments is not None and cache is not None:
            raise ValueError("deepseek_v4 with a cache does not take segment_ids (packed documents are for training)")


class HyperBlock(nn.Module):
    """V4 decoder block on N streams: attention and MoE each wrapped by a hyper-connection (attn_hc / ffn_hc)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_idx = layer_idx
        self.attn_hc = HyperConnection(cfg.hc_mult, D, cfg.hc_sinkhorn_iters, cfg.hc_eps, eps)
        self.ffn_hc = HyperConnection(cfg.hc_mult, D, cfg.hc_sinkhorn_iters, cfg.hc_eps, eps)
        self.input_layernorm = RMSNormF32(D, eps)
        self.self_attn = V4Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNormF32(D, eps)
        self.mlp = MoE(cfg, router="hash" if cfg.layer_mlp_type(layer_idx) == "hash" else cfg.scoring_func)

    def forward(self, x: torch.Tensor, ctx: Context, topk_in=NOT_GIVEN) -> tuple[torch.Tensor, None]:
        """x [B, S, N, D] -> (same shape, None): CSA picks its entries inside the layer, nothing is shared."""
        post, comb, h = self.attn_hc(x)
        x = expand(x, post, comb, self.self_attn(self.input_layernorm(h), ctx))
        post, comb, h = self.ffn_hc(x)
        return expand(x, post, comb, self.mlp(self.post_attention_layernorm(h), ctx.input_ids)), None


class HyperMTPLayer(HyperBlock):
    """V4 multi-token prediction (DeepSeek's `MTPBlock`): x = e_proj(enorm(embed(x_{t+1}))) + h_proj(hnorm(streams_t))
    on every stream, one V4 block, then its own hc_head and norm before the shared head. h is the main model's last
    streams before its hc_head. HF transformers does not build it."""

    def __init__(self, cfg: ModelConfig, depth: int, own_embeddings: bool = True):
        super().__init__(cfg, cfg.num_hidden_layers + depth)  # V4 checkpoints carry no MTP embeddings or head
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.e_proj = Linear(D, D, bias=False)
        self.h_proj = Linear(D, D, bias=False)
        self.enorm = RMSNormF32(D, eps)
        self.hnorm = RMSNormF32(D, eps)
        self.norm = RMSNormF32(D, eps)
        self.hc_head = HyperHead(cfg.hc_mult, D, cfg.hc_eps, eps)

    def step(self, streams, next_ids, ctx: Context, embed, head, topk_in=NOT_GIVEN):
        """streams [B,S,N,D], next_ids [B,S] → (new streams, logits [B,S,V], None)."""
        x = self.e_proj(self.enorm(embed(next_ids))).unsqueeze(2) + self.h_proj(self.hnorm(streams))
        x, _ = super().forward(x, ctx)
        return x, head(self.norm(self.hc_head(x))), None
