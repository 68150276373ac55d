"""HyperTransformer: the Transformer with an mHC residual of hc_mult streams (DeepSeek-V4, `deepseek_v4`).

Same as `model.Transformer` except: embeddings are copied to N streams, blocks are `HyperBlock`s (sliding / CSA /
HCA attention per `cfg.layer_types`, hash or sqrtsoftplus MoE), the streams are collapsed by `hc_head` before the
final norm, and two rope tables exist (`main` for sliding layers, `compress` for CSA/HCA layers and their entries).
`model.build_model` picks this class when `cfg.hyper`. Decoding passes an `inference.cache_v4.V4Cache` as `cache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsalite.config import ModelConfig
from dsalite.layers.hyper import HyperHead
from dsalite.layers.linear import Linear
from dsalite.layers.mask import Visibility
from dsalite.layers.norm import RMSNormF32
from dsalite.layers.rope import cos_sin, inv_freq_and_scale
from dsalite.layers.v4_block import HyperBlock, HyperMTPLayer, V4Inputs
from dsalite.model import Output, Transformer


@dataclass
class HyperOutput(Output):
    streams: torch.Tensor | None = None  # [B, S, N, D] after the last block, before hc_head (the MTP input)


class HyperBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        self.layers = nn.ModuleDict({str(i): HyperBlock(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.hc_head = HyperHead(cfg.hc_mult, D, cfg.hc_eps, eps)
        self.norm = RMSNormF32(D, eps)


class HyperTransformer(Transformer):
    def __init__(self, cfg: ModelConfig, mtp_own_embeddings: bool = True):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.model = HyperBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList([HyperMTPLayer(cfg, k) for k in range(cfg.num_nextn_predict_layers)])
        with torch.device("cpu"):
            p, n = cfg.qk_rope_head_dim, cfg.max_position_embeddings
            self.tables = {"main": inv_freq_and_scale(cfg.rope, p, n),
                           "compress": inv_freq_and_scale(cfg.compress_rope, p, n)}

    def inputs(self, input_ids, position_ids, vis, dtype, cache=None) -> V4Inputs:
        rope = {k: cos_sin(f, position_ids, s, dtype) for k, (f, s) in self.tables.items()}
        return V4Inputs(input_ids, position_ids, rope, self.tables, vis, cache)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        position_ids: torch.Tensor | None = None,  # [B, S]; default arange(S)
        attention_mask: torch.Tensor | None = None,  # [B, T] 1 = real token (masks window keys only, as HF)
        segment_ids: torch.Tensor | None = None,
        cache=None,  # V4Cache holding T − S earlier tokens (no padding); advanced by S
        output_hidden_states: bool = False,
        compute_logits: bool = True,
    ) -> HyperOutput:
        B, S = input_ids.shape
        T0 = 0
        if cache is not None:
            if not hasattr(cache, "update_window"):
                raise ValueError(f"deepseek_v4 needs a V4Cache as cache, got {type(cache).__name__}")
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("deepseek_v4 with a cache: attention_mask must be all ones (no padding)")
            T0, attention_mask = cache.seq_len, None
        if position_ids is None:
            position_ids = torch.arange(T0, T0 + S, device=input_ids.device).expand(B, S)
        vis = Visibility(S, T0 + S, T0, None if attention_mask is None else attention_mask.bool(), segment_ids)
        x = self.model.embed_tokens(input_ids)
        inp = self.inputs(input_ids, position_ids, vis, x.dtype, cache)
        x = x.unsqueeze(2).expand(B, S, self.cfg.hc_mult, x.shape[-1]).contiguous()  # [B, S, N, D]
        hidden = [x] if output_hidden_states else []
        for block in self.model.layers.values():
            x = block(x, inp)
            if output_hidden_states:
                hidden.append(x)
        if cache is not None:
            cache.advance(S)
        h = self.model.norm(self.model.hc_head(x))
        return HyperOutput(self.head(h) if compute_logits else None, h, hidden, [], streams=x)

    def mtp_forward(self, streams: torch.Tensor, next_ids: torch.Tensor, position_ids=None,
                    attention_mask=None, segment_ids=None) -> list[torch.Tensor]:
        """Logits of every MTP depth from `HyperOutput.streams`; depth d uses next_ids shifted d further
        (tail padded with the last id, its logits meaningless), as `Transformer.mtp_forward`."""
        B, S = next_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=next_ids.device).expand(B, S)
        vis = Visibility(S, S, 0, None if attention_mask is None else attention_mask.bool(), segment_ids)
        inp = self.inputs(next_ids, position_ids, vis, streams.dtype)
        out, ids, x = [], next_ids, streams
        for d, layer in enumerate(self.mtp):
            if d > 0:
                ids = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
            x, logits = layer.step(x, ids, inp, self.model.embed_tokens, self.head)
            out.append(logits)
        return out

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None,
                     router_bias_std: float = 0.0) -> None:
        """Transformer's init, plus mHC (fn normal, base 0, scale 1), zero sinks and position biases (HF
        `_init_weights`), and a random tid2eid: k distinct experts per token (HF leaves zeros for the checkpoint)."""
        super().init_weights(std, generator)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("fn", "hc_fn"):
                p.normal_(0.0, std, generator=generator)
            elif leaf in ("base", "hc_base", "sinks", "position_bias"):
                p.zero_()
            elif leaf in ("scale", "hc_scale"):
                p.fill_(1.0)
            elif leaf == "weight" and name.endswith("o_a_proj.weight"):
                p.normal_(0.0, std, generator=generator)
        for name, b in self.named_buffers():
            if name.endswith("tid2eid"):
                V, k = b.shape
                r = torch.rand(V, self.cfg.n_routed_experts, generator=generator)
                b.copy_(r.argsort(dim=-1)[:, :k])
        self._draw_router_bias(router_bias_std, generator)
