"""DeepSeek-V4 (`deepseek_v4`) side of ModelConfig: reading both config spellings, writing them back, checks.

Two spellings reach us: HF's (`layer_types`, `mlp_layer_types`, `compress_rates`, nested `rope_parameters`
{main, compress}, `partial_rotary_factor`) and DeepSeek's original one (`compress_ratios` 0/4/128 per layer, MTP layers
included; `num_hash_layers`; `qk_rope_head_dim`; `compress_rope_theta` + legacy `rope_scaling`). HF's
`DeepseekV4Config.__post_init__` folds the second into the first; we do the same and write back in whichever
spelling the file used, so unknown keys and the spelling survive a round trip.
MLA-shaped fields get V4's meaning: qk_rope_head_dim = rope width p, qk_nope = head_dim - p, v_head_dim and
kv_lora_rank = head_dim (one shared K=V head).
"""

from __future__ import annotations

import copy

from dsalite.config import ConfigError
from dsalite.presets import CSA, HCA, SLIDING

LAYER_TYPES = (SLIDING, CSA, HCA)
_MLP_FROM_HF = {"hash_moe": "hash", "moe": "sparse"}
_MLP_TO_HF = {v: k for k, v in _MLP_FROM_HF.items()}

# HF 5.23 DeepseekV4Config defaults, for keys a config.json leaves out.
DEFAULTS = dict(
    vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43, num_attention_heads=64,
    head_dim=512, q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256, n_shared_experts=1,
    scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, max_position_embeddings=1048576,
    rope_theta=10000.0, compress_rope_theta=160000.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
    swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024, index_n_heads=64, index_head_dim=128,
    index_topk=512, num_nextn_predict_layers=1, hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
    attention_bias=False, num_hash_layers=3, partial_rotary_factor=64 / 512,
)
DEFAULT_COMPRESS_RATES = {CSA: 4, HCA: 128}

def _error(msg: str) -> ConfigError:
    return ConfigError(msg)


def from_hf(cls, d: dict):
    def get(key, *aliases):
        for k in (key, *aliases):
            if d.get(k) is not None:
                return d[k]
        return DEFAULTS.get(key)

    head_dim = get("head_dim")
    if d.get("partial_rotary_factor") is not None:
        p = int(head_dim * d["partial_rotary_factor"])
    elif d.get("qk_rope_head_dim") is not None:
        p = d["qk_rope_head_dim"]
    else:
        p = int(head_dim * DEFAULTS["partial_rotary_factor"])
    L = get("num_hidden_layers")
    n_mtp = int(get("num_nextn_predict_layers") or 0)
    rates = dict(d.get("compress_rates") or DEFAULT_COMPRESS_RATES)
    if d.get("compress_rate_csa") is not None:
        rates[CSA] = d["compress_rate_csa"]
    if d.get("compress_rate_hca") is not None:
        rates[HCA] = d["compress_rate_hca"]
    main, compress = _ropes(d, get)
    c = cls(
        model_type="deepseek_v4",
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        intermediate_size=get("moe_intermediate_size"), moe_intermediate_size=get("moe_intermediate_size"),
        num_hidden_layers=L, num_attention_heads=get("num_attention_heads"), q_lora_rank=get("q_lora_rank"),
        kv_lora_rank=head_dim, qk_nope_head_dim=head_dim - p if isinstance(head_dim, int) and isinstance(p, int) else 0,
        qk_rope_head_dim=p, v_head_dim=head_dim, head_dim=head_dim,
        n_routed_experts=get("n_routed_experts", "num_local_experts"), n_shared_experts=get("n_shared_experts"),
        num_experts_per_tok=get("num_experts_per_tok"), n_group=1, topk_group=1,
        routed_scaling_factor=float(get("routed_scaling_factor")), norm_topk_prob=bool(get("norm_topk_prob")),
        scoring_func=get("scoring_func"), hidden_act=get("hidden_act"), rms_norm_eps=float(get("rms_norm_eps")),
        max_position_embeddings=get("max_position_embeddings"), rope=main, compress_rope=compress,
        attention_bias=bool(get("attention_bias")), tie_word_embeddings=bool(get("tie_word_embeddings")),
        index_topk=get("index_topk"), index_n_heads=get("index_n_heads"), index_head_dim=get("index_head_dim"),
        indexer_rope_interleave=True, num_nextn_predict_layers=n_mtp,
        compress_rates=rates, hc_mult=get("hc_mult"), hc_sinkhorn_iters=get("hc_sinkhorn_iters"),
        hc_eps=float(get("hc_eps")), swiglu_limit=float(get("swiglu_limit")), sliding_window=get("sliding_window"),
        o_groups=get("o_groups"), o_lora_rank=get("o_lora_rank"),
        pad_token_id=d.get("pad_token_id"), bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        raw=d,
    )
    c.layer_types = _layer_types(d, L, n_mtp, rates)
    c.mlp_types = _mlp_types(d, L)
    c.validate()
    return c


def _ropes(d: dict, get) -> tuple[dict, dict]:
    """(main, compress) rope dicts: nested `rope_parameters` as HF saves it, else rope_theta / compress_rope_theta
    with the legacy yarn `rope_scaling` on the compress side only; yarn gets attention_factor 1.0 (HF forces it)."""
    rp = d.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, compress = dict(rp["main"]), dict(rp["compress"])
    else:
        yarn = {k: v for k, v in (rp or d.get("rope_scaling") or {}).items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": get("rope_theta")}
        compress = dict(yarn, rope_theta=get("compress_rope_theta"))
    for r in (main, compress):
        r["rope_type"] = r.get("rope_type", r.get("type", "default"))
        if r["rope_type"] == "yarn":
            r.setdefault("attention_factor", 1.0)
            r.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    return main, compress


def _layer_types(d: dict, L, n_mtp: int, rates: dict) -> list[str]:
    """Trunk + MTP attention types: explicit `layer_types` > `compress_ratios` > HF's default (V4-Pro) schedule.
    MTP layers take their entry of `compress_ratios` when the file has one, else sliding attention."""
    if not isinstance(L, int) or L < 1:
        return []
    ratios = d.get("compress_ratios")
    # HF maps 0/4/128 literally (whatever compress_rates says); the configured rates are accepted too
    by_ratio = {0: SLIDING, 4: CSA, 128: HCA, rates.get(CSA): CSA, rates.get(HCA): HCA}
    from_ratios = None
    if ratios is not None:
        if not isinstance(ratios, list):
            raise _error(f"compress_ratios must be a list, got {type(ratios).__name__}")
        bad = [r for r in ratios if r not in by_ratio]
        if bad:
            raise _error(f"compress_ratios entry {bad[0]!r} is not 0 (sliding), 4 or {rates.get(CSA)} (CSA), "
                         f"or 128 or {rates.get(HCA)} (HCA)")
        from_ratios = [by_ratio[r] for r in ratios]
    types = d.get("layer_types")
    if types is not None:
        if not isinstance(types, list):
            raise _error(f"layer_types must be a list, got {type(types).__name__}")
        trunk = list(types[:L])
    elif from_ratios is not None:
        trunk = from_ratios[:L]
    else:
        trunk = [HCA] * min(L, 2) + [CSA if i % 2 else HCA for i in range(max(L - 2, 0))]
    mtp = [(from_ratios[L + k] if from_ratios and L + k < len(from_ratios) else SLIDING) for k in range(n_mtp)]
    return trunk + mtp


def _mlp_types(d: dict, L) -> list[str]:
    if not isinstance(L, int) or L < 1:
        return []
    t = d.get("mlp_layer_types")
    if t is not None:
        if not isinstance(t, list):
            raise _error(f"mlp_layer_types must be a list, got {type(t).__name__}")
        bad = [x for x in t if x not in _MLP_FROM_HF]
        if bad:
            raise _error(f"mlp_layer_types entries must be 'hash_moe' or 'moe' for deepseek_v4, got {bad[0]!r}")
        return [_MLP_FROM_HF[x] for x in t[:L]]
    n_hash = d.get("num_hash_layers", DEFAULTS["num_hash_layers"])
    if not isinstance(n_hash, int) or n_hash < 0:
        raise _error(f"num_hash_layers must be a non-negative integer, got {n_hash!r}")
    return ["hash"] * min(L, n_hash) + ["sparse"] * max(0, L - n_hash)


def to_hf(c) -> dict:
    """`raw` with every owned field written back, in the spelling (HF or original DeepSeek) the file used."""
    d = copy.deepcopy(c.raw)
    L = c.num_hidden_layers
    d.update(
        model_type="deepseek_v4", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=L,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=1, head_dim=c.head_dim,
        q_lora_rank=c.q_lora_rank, n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
        num_experts_per_tok=c.num_experts_per_tok, scoring_func=c.scoring_func, norm_topk_prob=c.norm_topk_prob,
        routed_scaling_factor=c.routed_scaling_factor, max_position_embeddings=c.max_position_embeddings,
        hc_mult=c.hc_mult, hc_sinkhorn_iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps, swiglu_limit=c.swiglu_limit,
        sliding_window=c.sliding_window, o_groups=c.o_groups, o_lora_rank=c.o_lora_rank,
        index_n_heads=c.index_n_heads, index_head_dim=c.index_head_dim, index_topk=c.index_topk,
        num_nextn_predict_layers=c.num_nextn_predict_layers, hidden_act=c.hidden_act, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    original = "compress_ratios" in c.raw and "layer_types" not in c.raw
    if original:
        rate = {SLIDING: 0, **c.compress_rates}
        kept = c.raw["compress_ratios"]
        if _layer_types(c.raw, L, c.num_nextn_predict_layers, c.compress_rates) != c.layer_types:
            kept = [rate[t] for t in c.layer_types]
        d["compress_ratios"] = kept
    else:
        d["layer_types"] = list(c.layer_types[:L])
        d["compress_rates"] = dict(c.compress_rates)
    if "num_hash_layers" in c.raw and "mlp_layer_types" not in c.raw:
        d["num_hash_layers"] = c.mlp_types.count("hash")
    else:
        d["mlp_layer_types"] = [_MLP_TO_HF[t] for t in c.mlp_types]
    factor = c.qk_rope_head_dim / c.head_dim
    if "qk_rope_head_dim" in c.raw and "partial_rotary_factor" not in c.raw:
        d["qk_rope_head_dim"] = c.qk_rope_head_dim
    else:
        d["partial_rotary_factor"] = factor
    rp = c.raw.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) or "rope_parameters" in c.raw or not original:
        d["rope_parameters"] = {"main": dict(c.rope, partial_rotary_factor=factor),
                                "compress": dict(c.compress_rope, partial_rotary_factor=factor)}
    else:
        d["rope_theta"] = c.rope["rope_theta"]
        d["compress_rope_theta"] = c.compress_rope["rope_theta"]
        extra = {k: v for k, v in c.compress_rope.items() if k != "rope_theta"}
        if extra.get("rope_type") != "default" or "rope_scaling" in c.raw:
            d["rope_scaling"] = extra
    return d


def validate(c) -> None:
    positive = [
        "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
        "q_lora_rank", "qk_rope_head_dim", "n_routed_experts", "num_experts_per_tok", "max_position_embeddings",
        "hc_mult", "hc_sinkhorn_iters", "sliding_window", "o_groups", "o_lora_rank", "index_topk", "index_n_heads",
        "index_head_dim",
    ]
    c.check_counts(positive)
    if c.qk_rope_head_dim % 2 or c.qk_rope_head_dim > min(c.head_dim, c.index_head_dim):
        raise _error(f"rope width {c.qk_rope_head_dim} (head_dim × partial_rotary_factor) must be even and fit "
                     f"head_dim={c.head_dim} and index_head_dim={c.index_head_dim}")
    n_kv = c.raw.get("num_key_value_heads")
    if n_kv is not None and n_kv != 1:
        raise _error(f"num_key_value_heads={n_kv}: DeepSeek-V4 has one shared K=V head")
    if c.num_attention_heads % c.o_groups:
        raise _error(f"o_groups={c.o_groups} must divide num_attention_heads={c.num_attention_heads}")
    if c.num_experts_per_tok > c.n_routed_experts:
        raise _error(f"num_experts_per_tok={c.num_experts_per_tok} exceeds n_routed_experts={c.n_routed_experts}")
    if c.scoring_func != "sqrtsoftplus":
        raise _error(f"scoring_func={c.scoring_func!r} is not supported for deepseek_v4 (sqrtsoftplus)")
    for t in (CSA, HCA):
        r = c.compress_rates.get(t)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise _error(f"compress_rates[{t!r}] must be a positive integer, got {r!r}")
    if len(c.layer_types) != c.num_hidden_layers + c.num_nextn_predict_layers:
        raise _error(f"layer_types has {len(c.layer_types) - c.num_nextn_predict_layers} trunk entries, "
                     f"expected num_hidden_layers={c.num_hidden_layers}")
    bad = [t for t in c.layer_types if t not in LAYER_TYPES]
    if bad:
        raise _error(f"layer_types entries must be one of {LAYER_TYPES}, got {bad[0]!r}")
    if len(c.mlp_types) != c.num_hidden_layers:
        raise _error(f"mlp_layer_types has {len(c.mlp_types)} entries, expected num_hidden_layers={c.num_hidden_layers}")
    if not (c.swiglu_limit and c.swiglu_limit > 0):
        raise _error(f"swiglu_limit must be a positive number, got {c.swiglu_limit!r}")
    for label, rope in (("main", c.rope), ("compress", c.compress_rope)):
        rt = rope.get("rope_type", "default")
        if rt not in ("default", "yarn"):
            raise _error(f"rope_parameters.{label}.rope_type={rt!r} is not supported (default or yarn)")
        if not (isinstance(rope.get("rope_theta"), (int, float)) and rope["rope_theta"] > 0):
            raise _error(f"rope_parameters.{label}.rope_theta must be a positive number, got {rope.get('rope_theta')!r}")
        if rt == "yarn" and not rope.get("factor"):
            raise _error(f"rope_parameters.{label}.factor is required for yarn rope")
