"""Every named architecture preset in one table: HF-style config dicts for `ModelConfig.from_hf`.

`dsalite create --preset`, recipes' `model.preset`, the tests (`ModelConfig.tiny`) and the benches read them here.
"""

from __future__ import annotations

CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# ----- user-facing presets (`dsalite create`, recipes) -----
_MLA_SMALL = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    num_nextn_predict_layers=1, max_position_embeddings=4096, rope_parameters=_ROPE, bos_token_id=0, eos_token_id=1,
)
PRESETS = {
    # A GLM-5.2-shaped toy: 8 layers on the 5.2 IndexShare schedule (freq 4, offset 3), MTP on, yarn-free rope.
    "glm-5.2-tiny": dict(
        _MLA_SMALL, model_type="glm_moe_dsa", num_hidden_layers=8, n_group=1, topk_group=1, index_topk=32,
        index_n_heads=16, index_head_dim=32, index_topk_freq=4, index_skip_topk_offset=3, rms_norm_eps=1e-5,
        routed_scaling_factor=2.5, tie_word_embeddings=False, pad_token_id=None,
    ),
    "deepseek-v3.2-tiny": dict(
        _MLA_SMALL, model_type="deepseek_v32", num_hidden_layers=4, n_group=2, topk_group=1, index_topk=32,
        index_n_heads=4, index_head_dim=32, rms_norm_eps=1e-6,
    ),
    "deepseek-v3-tiny": dict(
        _MLA_SMALL, model_type="deepseek_v3", num_hidden_layers=4, n_group=2, topk_group=1, rms_norm_eps=1e-6,
    ),
    # A DeepSeek-V4-Flash-shaped toy: 2 sliding layers then CSA/HCA alternating, 3 hash-routed layers, 4 mHC
    # streams, one MTP layer.
    "deepseek-v4-tiny": dict(
        model_type="deepseek_v4", vocab_size=512, hidden_size=128, moe_intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, partial_rotary_factor=0.25, q_lora_rank=64,
        o_groups=2, o_lora_rank=32, index_n_heads=8, index_head_dim=32, index_topk=8, n_routed_experts=8,
        num_experts_per_tok=2, sliding_window=16, hc_mult=4, num_hash_layers=3, num_nextn_predict_layers=1,
        compress_rates={CSA: 4, HCA: 16}, layer_types=[SLIDING] * 2 + [CSA, HCA] * 2,
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
    ),
}

# ----- test presets (`ModelConfig.tiny(model_type)`): the smallest shapes that exercise every path -----
TINY_MLA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=1, topk_group=1, first_k_dense_replace=1, index_topk=16, index_n_heads=8, index_head_dim=16,
    max_position_embeddings=4096, rms_norm_eps=1e-5, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
    rope_parameters=_ROPE, tie_word_embeddings=False,
)
# every V4 layer type, hash layers, 2 mHC streams, an MTP layer
TINY_V4 = dict(
    model_type="deepseek_v4", vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=1, head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32,
    o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=3, n_routed_experts=4,
    num_experts_per_tok=2, sliding_window=8, compress_rates={CSA: 4, HCA: 8}, hc_mult=2,
    layer_types=[SLIDING, SLIDING, CSA, HCA], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    num_nextn_predict_layers=1, max_position_embeddings=4096,
)


def tiny(model_type: str = "glm_moe_dsa", **overrides) -> dict:
    """The test preset of a family as an HF config dict."""
    if model_type == "deepseek_v4":
        d = dict(TINY_V4)
    else:
        d = dict(TINY_MLA, model_type=model_type)
        if model_type == "deepseek_v32":
            d.update(n_group=2, topk_group=1)
        if model_type == "deepseek_v3":
            for k in ("index_topk", "index_n_heads", "index_head_dim"):
                d.pop(k)
    d.update(overrides)
    return d


# ----- bench presets (`bench/`) -----
# hf-reference §10 "bench-small": D 256, 4 layers (1 dense + 3 MoE), 8 experts top-2, index_topk 256, fp32.
BENCH_SMALL = dict(
    model_type="glm_moe_dsa", vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, index_topk=256, index_n_heads=4,
    index_head_dim=32, max_position_embeddings=16384, num_nextn_predict_layers=0, initializer_range=0.1,
)
# DeepSeek-V4 at the same scale: sliding / CSA (m 4, top-64 entries) / HCA (m' 128) layers, 4 mHC streams, fp32.
BENCH_V4 = dict(
    model_type="deepseek_v4", vocab_size=1000, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=1, head_dim=128, partial_rotary_factor=0.25, q_lora_rank=128,
    o_groups=2, o_lora_rank=64, n_routed_experts=8, num_experts_per_tok=2, index_topk=64, index_n_heads=4,
    index_head_dim=32, sliding_window=128, hc_mult=4, num_hash_layers=1, num_nextn_predict_layers=0,
    layer_types=[SLIDING, CSA, HCA, CSA], max_position_embeddings=16384, initializer_range=0.1,
)
# hidden >= 1024: a bench-medium GLM (1 dense + 3 MoE layers) where GEMMs dominate at S = 2048.
BENCH_MEDIUM = dict(
    BENCH_SMALL, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_attention_heads=8,
    num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, index_n_heads=8, index_head_dim=64, index_topk=256,
)
