"""Tiny DeepSeek-V4 checkpoints that transformers itself builds and saves — ground truth for the V4 tests."""

from __future__ import annotations

import torch

CSA, HCA, SW = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"

TINY_V4 = dict(
    vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=1,
    head_dim=32, q_lora_rank=32, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16, index_topk=3,
    n_routed_experts=4, num_experts_per_tok=2, sliding_window=8, hc_mult=4, initializer_range=0.1,
    max_position_embeddings=4096,
)
# name -> config overrides. Every case: sequence > window, several compressed blocks, index_topk < CSA entries.
CASES = {
    # HF spelling: layer_types / mlp_layer_types / compress_rates / partial_rotary_factor
    "v4_all_types": dict(
        num_hidden_layers=5, partial_rotary_factor=0.25, compress_rates={CSA: 4, HCA: 8},
        layer_types=[SW, CSA, HCA, CSA, SW], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
    ),
    # V4-Flash schedule in DeepSeek's own spelling: two sliding layers then CSA/HCA alternating, 3 hash layers,
    # compress rope with yarn (legacy rope_scaling), qk_rope_head_dim instead of partial_rotary_factor.
    "v4_flash_schedule": dict(
        num_hidden_layers=6, qk_rope_head_dim=8, compress_ratios=[0, 0, 4, 128, 4, 128],
        num_hash_layers=3, compress_rope_theta=160000.0,
        rope_scaling={"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32,
                      "beta_fast": 32, "beta_slow": 1},
    ),
}


def build_hf_v4(case: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random DeepseekV4ForCausalLM (config `case`, then `overrides`); parameters HF initialises to constants (sinks, position biases, mHC base and
    scale, router bias, tid2eid) get random values so that each one's role is actually exercised."""
    import transformers as tf

    kw = dict(TINY_V4, **CASES[case])
    kw.update(overrides)
    torch.manual_seed(seed)
    model = tf.DeepseekV4ForCausalLM(tf.DeepseekV4Config(**kw)).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("sinks", "position_bias", "base", "hc_base", "scale", "hc_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                E = model.config.n_routed_experts
                b.copy_(torch.rand(b.shape[0], E, generator=g).argsort(-1)[:, : b.shape[1]])
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model


def make_v4_checkpoint(tmp_path, case: str, seed: int = 0, dtype=torch.float32) -> str:
    path = tmp_path / case
    build_hf_v4(case, seed, dtype).save_pretrained(str(path))
    return str(path)
