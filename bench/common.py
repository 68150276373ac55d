"""Shared bench helpers: the bench-small GLM config of hf-reference §10, timing with medians, peak memory."""

from __future__ import annotations

import gc
import resource
import statistics
import time

import torch

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
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"], max_position_embeddings=16384, initializer_range=0.1,
)


# --model choices of the benches: config and the one-line description their tables print
MODELS = {
    "glm": (BENCH_SMALL, "bench-small GLM (D 256, 4 layers, 8 experts top-2, index_topk 256)"),
    "v4": (BENCH_V4, "bench DeepSeek-V4 (D 256, sliding/CSA/HCA/CSA, window 128, CSA top-64 of S/4, HCA S/128, "
                     "4 mHC streams)"),
}


def hf_model(cfg: dict):
    import transformers as tf

    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    Cfg, Model = {"glm_moe_dsa": (tf.GlmMoeDsaConfig, tf.GlmMoeDsaForCausalLM),
                  "deepseek_v4": (tf.DeepseekV4Config, tf.DeepseekV4ForCausalLM)}[cfg["model_type"]]
    torch.manual_seed(0)
    m = Model(Cfg(**kw)).eval()
    m.config._attn_implementation = "eager"
    return m


def dsalite_from_hf(hf):
    from dsalite.config import ModelConfig
    from dsalite.model import build_model

    m = build_model(ModelConfig.from_hf(hf.config.to_dict())).eval()
    m.load_state_dict(hf.state_dict(), strict=False)
    return m


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
