"""Tiny random checkpoints that transformers itself builds and saves — the ground truth for parity tests."""

from __future__ import annotations

import torch

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    first_k_dense_replace=1, max_position_embeddings=4096, initializer_range=0.1, n_group=1, topk_group=1,
)
# 16 indexer heads: a key scores exactly 0 (a ReLU tie) only if all 16 heads clip it, so the top-k boundary is
# tie-free; every test still checks that (verify.boundary_gap) instead of assuming it.
DSA = dict(index_topk=12, index_n_heads=16, index_head_dim=16)

# name -> (model_type, overrides)
CASES = {
    "glm_all_full": ("glm_moe_dsa", dict(DSA)),
    "glm52_schedule": ("glm_moe_dsa", dict(DSA, num_hidden_layers=6, index_topk_freq=2, index_skip_topk_offset=3)),
    "glm_pattern": ("glm_moe_dsa", dict(DSA, index_topk_pattern="FSFS")),
    "glm_yarn": ("glm_moe_dsa", dict(DSA, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 512,
        "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})),
    "v32_groups": ("deepseek_v32", dict(DSA, n_group=4, topk_group=2, num_experts_per_tok=3)),
    "v3": ("deepseek_v3", dict(n_group=2, topk_group=1)),
    "v3_yarn_noq_lora": ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 1.0,
        "mscale_all_dim": 1.0}, rope_theta=10000.0)),
}


def hf_classes(model_type: str):
    import transformers as tf

    return {
        "glm_moe_dsa": (tf.GlmMoeDsaConfig, tf.GlmMoeDsaForCausalLM),
        "deepseek_v32": (tf.DeepseekV32Config, tf.DeepseekV32ForCausalLM),
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
    }[model_type]


def build_hf(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised HF model (init with the model's own `_init_weights`, seeded)."""
    Cfg, Model = hf_classes(model_type)
    kw = dict(TINY)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Model(Cfg(**kw)).to(dtype).eval()
    # HF initialises the router bias to zero; give it values so the selection-only role of the bias is tested.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.05)
    return model


def save_hf(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def make_checkpoint(tmp_path, case: str, seed: int = 0, dtype=torch.float32) -> str:
    model_type, overrides = CASES[case]
    return save_hf(build_hf(model_type, seed, dtype, **overrides), tmp_path / case)
