"""ModelConfig: one normalised schema for the DSA family, built from an HF `config.json` and written back to it.

`from_hf` absorbs HF's quirks once (rope dims from `qk_rope_head_dim`, never `head_dim`; legacy `rope_scaling` +
`rope_theta`; `num_experts` / `num_mtp_layers` aliases; the IndexShare schedule) and derives the per-layer lists
(`mlp_types`, `indexer_types`) that the model reads. Keys it does not know are kept verbatim in `raw`, so `to_hf`
loses nothing. Every invalid value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field

from dsalite import presets
from dsalite.families import FAMILIES, family
from dsalite.indexshare import indexer_schedule


class ConfigError(ValueError):
    """A config field has a value dsalite cannot build a model from; the message names the field."""


@dataclass
class ModelConfig:
    model_type: str = "glm_moe_dsa"
    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    q_lora_rank: int | None = 2048
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 192
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 202752
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    rope_interleave: bool = True  # MLA rope layout (only deepseek_v3 lets a config turn it off)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    mlp_types: list[str] = field(default_factory=list)  # "dense" | "sparse" per trunk layer
    # DSA lightning indexer (absent in deepseek_v3).
    index_topk: int = 2048
    index_n_heads: int = 32
    index_head_dim: int = 128
    indexer_rope_interleave: bool = True  # GLM: interleaved; DeepSeek-V3.2: half-split
    indexer_types: list[str] = field(default_factory=list)  # "full" | "shared", trunk + MTP layers
    num_nextn_predict_layers: int = 0
    # DeepSeek-V4 (see families/deepseek_v4/config.py); inert defaults for the MLA families.
    layer_types: list[str] = field(default_factory=list)  # per trunk + MTP layer: sliding / CSA / HCA attention
    head_dim: int = 0  # V4's single shared K=V head width
    compress_rates: dict = field(default_factory=dict)  # layer type -> tokens per compressed entry
    compress_rope: dict = field(default_factory=dict)  # rope of CSA/HCA layers; `rope` is the sliding layers' one
    hc_mult: int = 0  # mHC residual streams; 0 = plain residual
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float | None = None  # clamp of the SwiGLU gate/up pre-activations
    sliding_window: int = 0
    o_groups: int = 0
    o_lora_rank: int = 0
    scoring_func: str = "sigmoid"
    pad_token_id: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the HF dict as read, unknown keys included

    # ----- derived -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        """The MLA-family DSA indexer (V4's CSA indexer lives in its compressor instead)."""
        return self.model_type not in ("deepseek_v3", "deepseek_v4")

    @property
    def hyper(self) -> bool:
        """Residual carried as hc_mult mHC streams instead of one hidden state."""
        return self.hc_mult > 0

    def layer_attention_type(self, i: int) -> str | None:
        """V4: 'sliding_attention' | 'compressed_sparse_attention' | 'heavily_compressed_attention'; else None."""
        return self.layer_types[i] if self.layer_types else None

    @property
    def num_layers_total(self) -> int:
        """Trunk layers plus MTP layers: MTP layer k sits at global index num_hidden_layers + k."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale² for scaled rope (HF `yarn_apply_mscale`)."""
        scale = self.qk_head_dim**-0.5
        if self.rope.get("rope_type", "default") != "default":
            mscale_all_dim = self.rope.get("mscale_all_dim", 0)
            factor = self.rope.get("factor")
            if mscale_all_dim and factor and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

    def layer_mlp_type(self, i: int) -> str:
        """MTP layers are always MoE blocks in every released checkpoint."""
        return self.mlp_types[i] if i < self.num_hidden_layers else "sparse"

    def layer_indexer_type(self, i: int) -> str | None:
        return self.indexer_types[i] if self.has_indexer else None

    # ----- HF round trip -----
    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        d = copy.deepcopy(d)
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ConfigError(f"model_type={mt!r} is unknown; expected one of {', '.join(FAMILIES)}")
        own = family(mt).config
        if own is not None:
            return own.from_hf(cls, d)
        defaults = _FAMILY_DEFAULTS[mt]

        def get(key, *aliases):
            for k in (key, *aliases):
                if k in d and d[k] is not None:
                    return d[k]
            return defaults.get(key)

        c = cls(
            model_type=mt,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            moe_intermediate_size=get("moe_intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=get("num_attention_heads"),
            q_lora_rank=d.get("q_lora_rank", defaults["q_lora_rank"]) if mt == "deepseek_v3" else get("q_lora_rank"),
            kv_lora_rank=get("kv_lora_rank"),
            qk_nope_head_dim=get("qk_nope_head_dim"),
            # HF overwrites `head_dim` with qk_rope_head_dim: the hub's "head_dim" (e.g. 192) is never a rope width.
            qk_rope_head_dim=get("qk_rope_head_dim"),
            v_head_dim=get("v_head_dim"),
            n_routed_experts=get("n_routed_experts", "num_experts", "num_local_experts"),
            n_shared_experts=get("n_shared_experts"),
            num_experts_per_tok=get("num_experts_per_tok"),
            n_group=get("n_group"),
            topk_group=get("topk_group"),
            routed_scaling_factor=float(get("routed_scaling_factor")),
            norm_topk_prob=bool(get("norm_topk_prob")),
            hidden_act=get("hidden_act"),
            rms_norm_eps=float(get("rms_norm_eps")),
            max_position_embeddings=get("max_position_embeddings"),
            rope=_rope_from_hf(d, defaults),
            rope_interleave=bool(d.get("rope_interleave", True)) if mt == "deepseek_v3" else True,
            attention_bias=bool(get("attention_bias")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            index_topk=0 if mt == "deepseek_v3" else get("index_topk"),
            index_n_heads=0 if mt == "deepseek_v3" else get("index_n_heads"),
            index_head_dim=0 if mt == "deepseek_v3" else get("index_head_dim"),
            # HF hard-codes the indexer rope per family and ignores `indexer_rope_interleave` (hf-reference §2).
            indexer_rope_interleave=(mt == "glm_moe_dsa"),
            num_nextn_predict_layers=int(get("num_nextn_predict_layers", "num_mtp_layers") or 0),
            pad_token_id=d.get("pad_token_id"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            raw=d,
        )
        c.mlp_types = _mlp_types(d, c, mt)
        if c.has_indexer:
            c.indexer_types = _indexer_types(d, c, mt)
        c.validate()
        return c

    def to_hf(self) -> dict:
        """The HF config dict: `raw` with every field dsalite owns written back in the family's spelling."""
        own = family(self.model_type).config
        if own is not None:
            return own.to_hf(self)
        d = copy.deepcopy(self.raw)
        d.update(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, moe_intermediate_size=self.moe_intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
            n_routed_experts=self.n_routed_experts, n_shared_experts=self.n_shared_experts,
            num_experts_per_tok=self.num_experts_per_tok, n_group=self.n_group, topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor, norm_topk_prob=self.norm_topk_prob,
            hidden_act=self.hidden_act, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, attention_bias=self.attention_bias,
            tie_word_embeddings=self.tie_word_embeddings, num_nextn_predict_layers=self.num_nextn_predict_layers,
            pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        )
        d.setdefault("num_key_value_heads", self.num_attention_heads)
        d.setdefault("head_dim", self.qk_rope_head_dim)
        if "rope_scaling" in self.raw or ("rope_theta" in self.raw and "rope_parameters" not in self.raw):
            extra = {k: v for k, v in self.rope.items() if k not in ("rope_theta",)}
            d["rope_theta"] = self.rope["rope_theta"]
            d["rope_scaling"] = None if extra.get("rope_type") == "default" and len(extra) == 1 else extra
            if d["rope_scaling"] is None and "rope_scaling" not in self.raw:
                del d["rope_scaling"]
        else:
            d["rope_parameters"] = dict(self.rope)
        if self.model_type == "deepseek_v3":
            d["rope_interleave"] = self.rope_interleave
            n_dense = self.mlp_types.index("sparse") if "sparse" in self.mlp_types else self.num_hidden_layers
            d["first_k_dense_replace"] = n_dense
            d.pop("num_mtp_layers", None)
        else:
            d["mlp_layer_types"] = list(self.mlp_types)
            d.update(index_topk=self.index_topk, index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim)
        if self.model_type == "glm_moe_dsa":
            d["indexer_types"] = list(self.indexer_types[: self.num_hidden_layers])
        return d

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        p = os.path.join(path, "config.json") if os.path.isdir(path) else path
        try:
            with open(p) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config.json not found at {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
        return cls.from_hf(d)

    # ----- checks -----
    def validate(self) -> None:
        own = family(self.model_type).config
        if own is not None:
            return own.validate(self)
        positive = [
            "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_experts_per_tok",
            "n_group", "topk_group", "max_position_embeddings",
        ]
        if "dense" in self.mlp_types:
            positive.append("intermediate_size")
        if "sparse" in self.mlp_types:
            positive.append("n_routed_experts")
        self.check_counts(positive)
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.q_lora_rank is None and self.model_type != "deepseek_v3":
            raise ConfigError(f"q_lora_rank must be set for {self.model_type} (only deepseek_v3 has a plain q_proj)")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        n_kv = self.raw.get("num_key_value_heads")
        if n_kv is not None and n_kv != self.num_attention_heads:
            raise ConfigError(
                f"num_key_value_heads={n_kv} must equal num_attention_heads={self.num_attention_heads} "
                "(MLA expands one latent into every head)"
            )
        if "sparse" in self.mlp_types:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
            if self.topk_group > self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}"
                )
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                raise ConfigError(f"n_group={self.n_group} leaves fewer than 2 experts per group")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group={self.topk_group}"
                    f" groups ({self.topk_group * per_group})"
                )
        if len(self.mlp_types) != self.num_hidden_layers:
            raise ConfigError(
                f"mlp_layer_types has {len(self.mlp_types)} entries, expected num_hidden_layers={self.num_hidden_layers}"
            )
        bad = [t for t in self.mlp_types if t not in ("dense", "sparse")]
        if bad:
            raise ConfigError(f"mlp_layer_types entries must be 'dense' or 'sparse', got {bad[0]!r}")
        if self.has_indexer:
            for name in ("index_topk", "index_n_heads", "index_head_dim"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
            if self.index_head_dim < self.qk_rope_head_dim:
                raise ConfigError(
                    f"index_head_dim={self.index_head_dim} is smaller than qk_rope_head_dim={self.qk_rope_head_dim}"
                )
        rope_type = self.rope.get("rope_type", "default")
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported (default or yarn)")
        if not (isinstance(self.rope.get("rope_theta"), (int, float)) and self.rope["rope_theta"] > 0):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope.get('rope_theta')!r}")
        if rope_type == "yarn" and not (self.rope.get("factor") or self.rope.get("original_max_position_embeddings")):
            raise ConfigError("rope_parameters.factor is required for yarn rope")

    def check_counts(self, positive: list[str]) -> None:
        """Fields in `positive` must be integers >= 1; the shared-expert and MTP counts integers >= 0."""
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("n_shared_experts", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")

    # ----- the test presets (dsalite/presets.py) -----
    @classmethod
    def tiny(cls, model_type: str = "glm_moe_dsa", **overrides) -> "ModelConfig":
        return cls.from_hf(presets.tiny(model_type, **overrides))


_COMMON_DEFAULTS = dict(
    n_shared_experts=1, norm_topk_prob=True, hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
    moe_intermediate_size=2048, kv_lora_rank=512, qk_rope_head_dim=64, routed_scaling_factor=2.5,
    num_experts_per_tok=8, n_routed_experts=256, first_k_dense_replace=3, num_nextn_predict_layers=0,
)
# HF 5.23 class defaults, used for keys a config.json leaves out.
_FAMILY_DEFAULTS = {
    "deepseek_v3": dict(
        _COMMON_DEFAULTS, vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
        num_attention_heads=128, q_lora_rank=1536, qk_nope_head_dim=128, v_head_dim=128, n_group=8, topk_group=4,
        rms_norm_eps=1e-6, max_position_embeddings=4096, num_nextn_predict_layers=1,
    ),
    "deepseek_v32": dict(
        _COMMON_DEFAULTS, vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
        num_attention_heads=128, q_lora_rank=1536, qk_nope_head_dim=128, v_head_dim=128, n_group=8, topk_group=4,
        rms_norm_eps=1e-6, max_position_embeddings=163840, index_topk=2048, index_head_dim=128, index_n_heads=64,
    ),
    "glm_moe_dsa": dict(
        _COMMON_DEFAULTS, vocab_size=154880, hidden_size=6144, intermediate_size=12288, num_hidden_layers=78,
        num_attention_heads=64, q_lora_rank=2048, qk_nope_head_dim=192, v_head_dim=256, n_group=1, topk_group=1,
        rms_norm_eps=1e-5, max_position_embeddings=202752, index_topk=2048, index_head_dim=128, index_n_heads=32,
    ),
}


def _rope_from_hf(d: dict, defaults: dict) -> dict:
    """Nested `rope_parameters` wins; else legacy `rope_scaling` merged with `rope_theta` (HF standardize_rope_params)."""
    rp = d.get("rope_parameters")
    if rp:
        rope = dict(rp)
    else:
        rope = dict(d.get("rope_scaling") or {})
    if "rope_theta" not in rope or rope["rope_theta"] is None:
        rope["rope_theta"] = d.get("rope_theta", 10000.0)
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] == "yarn":
        rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    return rope


def _mlp_types(d: dict, c: ModelConfig, mt: str) -> list[str]:
    L = c.num_hidden_layers
    if mt != "deepseek_v3" and d.get("mlp_layer_types") is not None:
        t = d["mlp_layer_types"]
        if not isinstance(t, list):
            raise ConfigError(f"mlp_layer_types must be a list, got {type(t).__name__}")
        return list(t)
    k = d.get("first_k_dense_replace", _FAMILY_DEFAULTS[mt]["first_k_dense_replace"])
    if k is None or not isinstance(k, int) or k < 0:
        raise ConfigError(f"first_k_dense_replace must be a non-negative integer, got {k!r}")
    n_dense = min(k, L) if isinstance(L, int) and L > 0 else 0
    return ["dense"] * n_dense + ["sparse"] * ((L if isinstance(L, int) and L > 0 else 0) - n_dense)


def _indexer_types(d: dict, c: ModelConfig, mt: str) -> list[str]:
    """Trunk + MTP schedule; V3.2 is all full, GLM follows HF's indexer_types / pattern / freq+offset."""
    L, n_mtp = c.num_hidden_layers, c.num_nextn_predict_layers
    if mt == "deepseek_v32":
        return ["full"] * (L + n_mtp)
    return indexer_schedule(
        L,
        n_mtp,
        indexer_types=d.get("indexer_types"),
        pattern=d.get("index_topk_pattern"),
        freq=d.get("index_topk_freq"),
        offset=d.get("index_skip_topk_offset"),
        error=ConfigError,
    )
