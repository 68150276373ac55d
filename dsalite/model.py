"""Transformer for every DSA family: embed → blocks → norm → head, plus the MTP layers.

One class serves glm_moe_dsa, deepseek_v32, deepseek_v3 and deepseek_v4. The config decides per layer which block
runs (the family's, from `families`: MLA + DSA by default, V4's hyper-connection block) and, for MLA, whether it has
an indexer ("full"), reuses the previous full layer's top-k ("shared") or has none (V3), and a dense or MoE MLP.
With `cfg.hc_mult` > 0 the residual is N mHC streams: embeddings are copied to the streams and `hc_head` collapses
them before the final norm. The IndexShare top-k is returned by each block and handed to the next one in `forward`
— no module state — so activation recompute and pipeline stages see exactly what they are given. Layers are keyed by
global index (`model.layers["7"]`), so a pipeline stage is this model with layers deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsalite.config import ModelConfig
from dsalite.families import family
from dsalite.indexshare import NOT_GIVEN, source_layer
from dsalite.layers.block import Block
from dsalite.layers.context import Context
from dsalite.layers.hyper import HyperHead
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
    streams: torch.Tensor | None = None  # mHC models: [B, S, N, D] after the last block, before hc_head

    @property
    def mtp_input(self) -> torch.Tensor:
        """What `mtp_forward` continues from: the streams of an mHC model, else the final hidden state."""
        return self.last_hidden if self.streams is None else self.streams


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        fam = family(cfg.model_type)
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        block = fam.block or Block
        self.layers = nn.ModuleDict({str(i): block(cfg, i) for i in range(cfg.num_hidden_layers)})
        if cfg.hyper:
            self.hc_head = HyperHead(cfg.hc_mult, D, cfg.hc_eps, eps)
        self.norm = (fam.norm or RMSNorm)(D, eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, mtp_own_embeddings: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        mtp = family(cfg.model_type).mtp_layer or MTPLayer
        self.mtp = nn.ModuleList([mtp(cfg, k, mtp_own_embeddings) for k in range(cfg.num_nextn_predict_layers)])
        ropes = {"main": cfg.rope, **({"compress": cfg.compress_rope} if cfg.compress_rope else {})}
        with torch.device("cpu"):  # tiny tables, moved to the positions' device when used
            self.tables = {k: inv_freq_and_scale(r, cfg.qk_rope_head_dim, cfg.max_position_embeddings)
                           for k, r in ropes.items()}

    # ----- forward -----
    def head(self, h: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lm_head"):
            return linear(self.lm_head, h)
        return nn.functional.linear(h, self.model.embed_tokens.weight)

    def head_weight(self) -> torch.Tensor:
        """The [V, D] matrix `head` multiplies by (the embeddings when tied), for losses that fuse it."""
        return self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype, label: str = "main"):
        inv_freq, scale = self.tables[label]
        return cos_sin(inv_freq, positions, scale, dtype)

    def context(self, input_ids, positions: torch.Tensor, vis: Visibility, dtype: torch.dtype, cache=None,
                dsa=None) -> Context:
        """The per-forward inputs every block reads (rope tables evaluated at `positions`)."""
        rope = {k: self.rope(positions, dtype, k) for k in self.tables}
        return Context(input_ids, positions, vis, rope, self.tables, cache, dsa)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        position_ids: torch.Tensor | None = None,  # [B, S]; default offset + arange(S)
        attention_mask: torch.Tensor | None = None,  # [B, T] 1 = real token, 0 = padding
        segment_ids: torch.Tensor | None = None,  # [B, T] packed documents: no attention across ids
        cache=None,  # the decode cache holding T − S earlier tokens; advanced by S
        output_hidden_states: bool = False,
        compute_logits: bool = True,
        dsa=None,  # training.losses.DSATraining for the indexer loss / dense warm-up; None for inference
        hidden_in: torch.Tensor | None = None,  # pipeline stage: the previous stage's hidden state [B, S, D]
        topk_in=NOT_GIVEN,  # pipeline stage: the top-k the previous stage's last layer passed on (carried)
    ) -> Output:
        """A pipeline stage is this model with other layers deleted (parallel/pipeline_stage.py): without
        `embed_tokens` it starts from `hidden_in`, without `norm` it returns its last block's output unnormed."""
        B, S = input_ids.shape
        if cache is not None and not hasattr(cache, "advance"):
            want = getattr(family(self.cfg.model_type).cache, "__name__", "LatentCache")
            raise ValueError(f"{self.cfg.model_type} needs a {want} as cache (inference.runner.new_cache makes one), "
                             f"got {type(cache).__name__}")
        offset = cache.seq_len if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(offset, offset + S, device=input_ids.device).expand(B, S)
        vis = Visibility(S, offset + S, offset, None if attention_mask is None else attention_mask.bool(), segment_ids,
                         input_ids.device)
        x = self.model.embed_tokens(input_ids) if hidden_in is None else hidden_in
        ctx = self.context(input_ids, position_ids, vis, x.dtype, cache, dsa)
        if self.cfg.hyper and hidden_in is None:  # [B, S, D] -> [B, S, N, D]
            x = x.unsqueeze(2).expand(B, S, self.cfg.hc_mult, x.shape[-1]).contiguous()
        hidden, topks = [x] if output_hidden_states else [], []
        topk = topk_in
        for block in self.model.layers.values():
            x, topk = block(x, ctx, topk)
            topks.append(topk)
            if output_hidden_states:
                hidden.append(x)
        if cache is not None:
            cache.advance(S)
        if self.model.norm is None:  # a pipeline stage before the last one
            return Output(None, x, hidden, topks)
        streams = None
        if self.cfg.hyper:
            streams, x = x, self.model.hc_head(x)
        h = self.model.norm(x)
        return Output(self.head(h) if compute_logits else None, h, hidden, topks, streams)

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, position_ids=None,
                    attention_mask=None, segment_ids=None, dsa=None, topk=None) -> list[torch.Tensor]:
        """Logits of every MTP depth: depth d at position t predicts token t+2+d from token t+1+d.

        hidden is `Output.mtp_input` ([B,S,D] last hidden, or [B,S,N,D] streams); next_ids [B,S] are the tokens one
        step ahead (x_{t+1}); depth d > 0 uses next_ids shifted d further (the tail is padded with the last id and
        its logits are meaningless). topk is the trunk forward's `Output.topk`: an MTP layer that the IndexShare
        schedule makes "shared" reuses its trunk source layer's selection, and raises without it.
        """
        B, S = next_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=next_ids.device).expand(B, S)
        vis = Visibility(S, S, 0, None if attention_mask is None else attention_mask.bool(), segment_ids,
                         next_ids.device)
        ctx = self.context(next_ids, position_ids, vis, hidden.dtype, dsa=dsa)
        out, ids, h, prev = [], next_ids, hidden, NOT_GIVEN
        for d, layer in enumerate(self.mtp):
            if d > 0:
                ids = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
                ctx.input_ids = ids
            h, logits, prev = layer.step(h, ids, ctx, self.model.embed_tokens, self.head,
                                         self.mtp_topk(d, topk, prev))
            out.append(logits)
        return out

    def mtp_topk(self, depth: int, trunk_topk, previous=NOT_GIVEN):
        """The top-k MTP layer `depth` receives: its trunk source's entry of `trunk_topk` (a list per trunk layer, or
        a dict keyed by layer index) when the schedule shares it with a trunk layer, else the previous depth's."""
        c = self.cfg
        i = c.num_hidden_layers + depth
        if c.layer_indexer_type(i) != "shared":
            return previous
        src = source_layer(c.indexer_types, i)
        if src >= c.num_hidden_layers:
            return previous
        if trunk_topk is None:
            return NOT_GIVEN
        if isinstance(trunk_topk, dict):
            return trunk_topk.get(src, NOT_GIVEN)
        return trunk_topk[src] if src < len(trunk_topk) else NOT_GIVEN

    # ----- init / io -----
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None,
                     router_bias_std: float = 0.0) -> None:
        """Random init for models trained from scratch: normal(0, std) weights, unit norms, zero biases; mHC
        (fn normal, base 0, scale 1), zero sinks and position biases (HF `_init_weights`), and a random tid2eid of
        k distinct experts per token (HF leaves zeros for the checkpoint). router_bias_std > 0 draws the router's
        selection bias too (test models, so its selection-only role shows)."""
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
        for name, p in self.named_parameters():  # mHC, sinks, V4's grouped output (after the rest: same draws)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("fn", "hc_fn") or name.endswith("o_a_proj.weight"):
                p.normal_(0.0, std, generator=generator)
            elif leaf in ("base", "hc_base", "sinks", "position_bias"):
                p.zero_()
            elif leaf in ("scale", "hc_scale"):
                p.fill_(1.0)
        for name, b in self.named_buffers():
            if name.endswith("tid2eid"):
                V, k = b.shape
                r = torch.rand(V, self.cfg.n_routed_experts, generator=generator)
                b.copy_(r.argsort(dim=-1)[:, :k].to(b.device))
        self._draw_router_bias(router_bias_std, generator)

    @torch.no_grad()
    def _draw_router_bias(self, std: float, generator) -> None:
        for name, b in self.named_buffers():
            if std and name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=generator).to(b.device) * std)

    def save_pretrained(self, path: str, **kwargs) -> None:
        from dsalite.checkpoint.save import save_pretrained

        save_pretrained(self, path, **kwargs)

    def flops_per_token(self, seq_len: int, training: bool = True, mtp: bool = True) -> float:
        """Model FLOPs per token at context `seq_len` (causal): 2 per multiply-add of every weight a token uses
        (routed experts: only the k it is sent to), plus each layer's attention over the keys it sees and its
        indexer's scoring (`attention_flops` of MLA / V4 attention), plus the mHC stream mixing; ×3 for forward +
        backward when training."""
        return sum(self.flops_by_part(seq_len, training, mtp).values())

    def flops_by_part(self, seq_len: int, training: bool = True, mtp: bool = True) -> dict[str, float]:
        """`flops_per_token` split by where the work happens: "layers.i" per trunk block, "mtp.k" per MTP layer
        (its projections and head included), "head" for everything else (final norm, head, mHC head); the
        embedding lookup costs nothing. The pipeline split balances stages by these figures."""
        c = self.cfg
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        parts: dict[str, float] = {f"layers.{i}": 0 for i in self.model.layers}
        parts.update({f"mtp.{k}": 0 for k in range(len(self.mtp))} if mtp else {})
        parts["head"] = 0

        def part(name: str) -> str:
            if name.startswith("model.layers."):
                return "layers." + name.split(".")[2]
            return ".".join(name.split(".")[:2]) if name.startswith("mtp.") else "head"

        for name, p in self.named_parameters():
            if "embed_tokens" in name or (not mtp and name.startswith("mtp.")):
                continue
            if name.endswith(("experts.gate_up_proj", "experts.down_proj", "position_bias")):
                continue  # experts counted per routed token below; position biases are added, not multiplied
            if p.dim() >= 2:
                parts[part(name)] += 2 * p.numel()
        blocks = {f"layers.{i}": b for i, b in self.model.layers.items()}
        blocks.update({f"mtp.{k}": b for k, b in enumerate(self.mtp)} if mtp else {})
        for key, b in blocks.items():
            if hasattr(b.mlp, "experts"):
                parts[key] += 2 * c.num_experts_per_tok * per_expert
            parts[key] += b.self_attn.attention_flops(seq_len)
            if c.hyper:  # two hyper-connections a block: combᵀ @ x (N×N×D) and post·out (N×D) multiply-adds
                parts[key] += 2 * 2 * (c.hc_mult * c.hc_mult + c.hc_mult) * c.hidden_size
        return {k: v * (3 if training else 1) for k, v in parts.items()}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, mtp_own_embeddings: bool = True) -> Transformer:
    """The model of any family (kept for callers of the earlier API: `Transformer(cfg)` is the same)."""
    return Transformer(cfg, mtp_own_embeddings)
