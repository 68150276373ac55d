"""Transformer for the DSA family: embed → blocks → norm → head, plus the MTP layers.

One class serves glm_moe_dsa, deepseek_v32 and deepseek_v3; the config decides per layer whether it has an indexer
("full"), reuses the previous full layer's top-k ("shared") or has none (V3), and whether its MLP is dense or MoE.
The IndexShare top-k is returned by each block and handed to the next one in `forward` — no module state — so
activation recompute and pipeline stages see exactly what they are given. Layers are keyed by global index
(`model.layers["7"]`), so a pipeline stage is this model with layers deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsalite.config import ModelConfig
from dsalite.layers.block import Block
from dsalite.layers.linear import Linear, linear
from dsalite.layers.mask import Visibility
from dsalite.layers.mtp import MTPLayer
from dsalite.layers.norm import RMSNorm
from dsalite.layers.rope import cos_sin, inv_freq_and_scale


@dataclass
class Output:
    logits: torch.Tensor | None  # [B, S, V]
    last_hidden: torch.Tensor  # [B, S, D] after the final norm
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # embeddings, then every block's output
    topk: list[torch.Tensor | None] = field(default_factory=list)  # per trunk layer; None = all visible keys


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, mtp_own_embeddings: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            [MTPLayer(cfg, k, mtp_own_embeddings) for k in range(cfg.num_nextn_predict_layers)]
        )
        with torch.device("cpu"):
            self.inv_freq, self.rope_scale = inv_freq_and_scale(
                cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings
            )

    # ----- forward -----
    def head(self, h: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lm_head"):
            return linear(self.lm_head, h)
        return nn.functional.linear(h, self.model.embed_tokens.weight)

    def head_weight(self) -> torch.Tensor:
        """The [V, D] matrix `head` multiplies by (the embeddings when tied), for losses that fuse it."""
        return self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return cos_sin(self.inv_freq, positions, self.rope_scale, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        position_ids: torch.Tensor | None = None,  # [B, S]; default offset + arange(S)
        attention_mask: torch.Tensor | None = None,  # [B, T] 1 = real token, 0 = padding
        segment_ids: torch.Tensor | None = None,  # [B, T] packed documents: no attention across ids
        cache=None,
        output_hidden_states: bool = False,
        compute_logits: bool = True,
        dsa=None,  # training.losses.DSATraining for the indexer loss / dense warm-up; None for inference
    ) -> Output:
        B, S = input_ids.shape
        offset = cache.seq_len if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(offset, offset + S, device=input_ids.device).expand(B, S)
        vis = Visibility(S, offset + S, offset,
                         None if attention_mask is None else attention_mask.bool(), segment_ids)
        x = self.model.embed_tokens(input_ids) if self.model.embed_tokens is not None else input_ids
        cos, sin = self.rope(position_ids, x.dtype)
        hidden, topks = [x] if output_hidden_states else [], []
        topk = None
        for block in self.model.layers.values():
            x, topk = block(x, cos, sin, vis, topk, cache, dsa)
            topks.append(topk)
            if output_hidden_states:
                hidden.append(x)
        if cache is not None:
            cache.advance(S)
        h = self.model.norm(x)
        return Output(self.head(h) if compute_logits else None, h, hidden, topks)

    def mtp_forward(self, last_hidden: torch.Tensor, next_ids: torch.Tensor, position_ids=None,
                    attention_mask=None, segment_ids=None, dsa=None) -> list[torch.Tensor]:
        """Logits of every MTP depth: depth d at position t predicts token t+2+d from token t+1+d.

        last_hidden [B,S,D] is `Output.last_hidden`; next_ids [B,S] are the tokens one step ahead (x_{t+1}); depth
        d > 0 uses next_ids shifted d further (the tail is padded with the last id and its logits are meaningless).
        """
        B, S = next_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=next_ids.device).expand(B, S)
        vis = Visibility(S, S, 0, None if attention_mask is None else attention_mask.bool(), segment_ids)
        cos, sin = self.rope(position_ids, last_hidden.dtype)
        h, topk, out = last_hidden, None, []
        ids = next_ids
        for d, layer in enumerate(self.mtp):
            if d > 0:
                ids = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
            h, logits, topk = layer.step(h, ids, cos, sin, vis, self.model.embed_tokens, self.head, topk, None, dsa)
            out.append(logits)
        return out

    # ----- init / io -----
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None,
                     router_bias_std: float = 0.0) -> None:
        """Random init (normal(0, std) weights, unit norms, zero biases) for models trained from scratch.
        router_bias_std > 0 draws the router's selection bias too (test models, so its selection-only role shows)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for name, p in self.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3 or name.endswith("mlp.gate.weight"):
                p.normal_(0.0, std, generator=generator)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        self._draw_router_bias(router_bias_std, generator)

    @torch.no_grad()
    def _draw_router_bias(self, std: float, generator) -> None:
        for name, b in self.named_buffers():
            if std and name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=generator) * std)

    def save_pretrained(self, path: str, **kwargs) -> None:
        from dsalite.checkpoint.pretrained import save_pretrained

        save_pretrained(self, path, **kwargs)

    def flops_per_token(self, seq_len: int, training: bool = True, mtp: bool = True) -> float:
        """Model FLOPs per token at context `seq_len` (causal): 2 per multiply-add of every weight a token uses
        (routed experts: only the k it is sent to), plus attention over the keys it sees (min(index_topk, visible)
        on DSA layers, all visible otherwise) and the indexer's scoring; ×3 for forward + backward when training."""
        c = self.cfg
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        dense = 0
        for name, p in self.named_parameters():
            if "embed_tokens" in name or (not mtp and name.startswith("mtp.")):
                continue
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
            if p.dim() >= 2:
                dense += p.numel()
        n_moe = sum(1 for t in c.mlp_types if t == "sparse") + (c.num_nextn_predict_layers if mtp else 0)
        dense += n_moe * c.num_experts_per_tok * per_expert
        visible = (seq_len + 1) / 2
        attn = 0.0
        layers = c.num_hidden_layers + (c.num_nextn_predict_layers if mtp else 0)
        for i in range(layers):
            t = c.layer_indexer_type(i)
            keys = visible if t is None else sum(min(c.index_topk, j + 1) for j in range(seq_len)) / seq_len
            attn += 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * keys
            if t == "full":
                attn += 2 * c.index_n_heads * c.index_head_dim * visible + 2 * c.index_n_heads * visible
        return (2 * dense + attn) * (3 if training else 1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, mtp_own_embeddings: bool = True) -> Transformer:
    """The model class the config calls for: mHC streams (`cfg.hyper`, DeepSeek-V4) or a plain residual."""
    if cfg.hyper:
        from dsalite.model_v4 import HyperTransformer

        return HyperTransformer(cfg, mtp_own_embeddings)
    return Transformer(cfg, mtp_own_embeddings)
