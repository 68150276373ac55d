"""GGUF names for the DSA family: architecture ids, tensor names and metadata keys as llama.cpp's converter writes them.

One declarative table, read by `checkpoint/gguf.py` in both directions. Tensor names are dsalite names with `{i}` for
the global layer index; MTP layer k is GGUF block L+k (L = num_hidden_layers), its block tensors named like a trunk
block's plus the `nextn.*` extras (llama.cpp `conversion/glm.py`, `conversion/deepseek.py`, `gguf-py/constants.py`).
Two dsalite tensors split into two GGUF tensors each: `kv_b_proj` → `attn_k_b` (per head, transposed) + `attn_v_b`
(absorbed MLA), and the fused expert `gate_up_proj` → `ffn_gate_exps` + `ffn_up_exps`.
DeepSeek-V4 (`deepseek4`) has its own names (`V4_*`, llama.cpp `DeepseekV4Model`); its MTP layer goes to a second,
draft-only file as llama.cpp's `--mtp` writes it (see `families/deepseek_v4/gguf.py`).
"""

from __future__ import annotations

# HF model_type -> llama.cpp architecture name
ARCH = {"glm_moe_dsa": "glm-dsa", "deepseek_v32": "deepseek32", "deepseek_v3": "deepseek2", "deepseek_v4": "deepseek4"}
MODEL_TYPE = {v: k for k, v in ARCH.items()}

GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# Block tensors (prefix `model.layers.{i}.` or `mtp.{k}.` in dsalite, `blk.{i}.` in GGUF).
# Router, experts and the NextN input norms: the same names in every architecture (V3 family and V4).
MOE_AND_NEXTN = {
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
}

BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
    "self_attn.indexer.wk.weight": "indexer.attn_k.weight",
    "self_attn.indexer.k_norm.weight": "indexer.k_norm.weight",
    "self_attn.indexer.k_norm.bias": "indexer.k_norm.bias",
    "self_attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    **MOE_AND_NEXTN,
    # MTP (NextN) extras
    "eh_proj.weight": "nextn.eh_proj.weight",
    "embed_tokens.weight": "nextn.embed_tokens.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
    "shared_head.head.weight": "nextn.shared_head_head.weight",
}

# dsalite tensor -> the two GGUF tensors it is split into
SPLIT = {
    "self_attn.kv_b_proj.weight": ("attn_k_b.weight", "attn_v_b.weight"),
    "mlp.experts.gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
}

# Tensors llama.cpp's converter keeps in F32 whatever the file type (besides 1-D tensors, `*_norm.weight` and every
# name not ending in `.weight`): the router and the indexer's head weights.
KEEP_F32 = ("ffn_gate_inp.weight", "indexer.proj.weight")

# general.file_type (llama.cpp LlamaFileType) and the GGML tensor type of quantisable tensors, per --dtype
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
GGML_TYPE = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "bf16": "BF16"}

GATING_SIGMOID = 2  # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
GATING_SQRT_SOFTPLUS = 4  # LLAMA_EXPERT_GATING_FUNC_TYPE_SQRT_SOFTPLUS (DeepSeek-V4)
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

# Metadata keys (`{a}` = architecture). Tokenizer keys are global.
K = dict(
    vocab_size="{a}.vocab_size",
    context_length="{a}.context_length",
    embedding_length="{a}.embedding_length",
    block_count="{a}.block_count",
    leading_dense_block_count="{a}.leading_dense_block_count",
    feed_forward_length="{a}.feed_forward_length",
    expert_feed_forward_length="{a}.expert_feed_forward_length",
    expert_count="{a}.expert_count",
    expert_used_count="{a}.expert_used_count",
    expert_shared_count="{a}.expert_shared_count",
    expert_group_count="{a}.expert_group_count",
    expert_group_used_count="{a}.expert_group_used_count",
    expert_weights_scale="{a}.expert_weights_scale",
    expert_weights_norm="{a}.expert_weights_norm",
    expert_gating_func="{a}.expert_gating_func",
    nextn_predict_layers="{a}.nextn_predict_layers",
    head_count="{a}.attention.head_count",
    head_count_kv="{a}.attention.head_count_kv",
    key_length="{a}.attention.key_length",
    value_length="{a}.attention.value_length",
    key_length_mla="{a}.attention.key_length_mla",
    value_length_mla="{a}.attention.value_length_mla",
    layer_norm_rms_epsilon="{a}.attention.layer_norm_rms_epsilon",
    q_lora_rank="{a}.attention.q_lora_rank",
    kv_lora_rank="{a}.attention.kv_lora_rank",
    indexer_head_count="{a}.attention.indexer.head_count",
    indexer_key_length="{a}.attention.indexer.key_length",
    indexer_top_k="{a}.attention.indexer.top_k",
    indexer_types="{a}.attention.indexer.types",
    rope_dimension_count="{a}.rope.dimension_count",
    rope_freq_base="{a}.rope.freq_base",
    rope_scaling_type="{a}.rope.scaling.type",
    rope_scaling_factor="{a}.rope.scaling.factor",
    rope_scaling_orig_ctx="{a}.rope.scaling.original_context_length",
    rope_yarn_beta_fast="{a}.rope.scaling.yarn_beta_fast",
    rope_yarn_beta_slow="{a}.rope.scaling.yarn_beta_slow",
    rope_yarn_log_mul="{a}.rope.scaling.yarn_log_multiplier",
    rope_yarn_attn_factor="{a}.rope.scaling.yarn_attn_factor",
    embedding_length_out="{a}.embedding_length_out",
    sliding_window="{a}.attention.sliding_window",
    output_group_count="{a}.attention.output_group_count",
    output_lora_rank="{a}.attention.output_lora_rank",
    compress_ratios="{a}.attention.compress_ratios",
    compress_rope_freq_base="{a}.attention.compress_rope_freq_base",
    swiglu_clamp_exp="{a}.swiglu_clamp_exp",
    swiglu_clamp_shexp="{a}.swiglu_clamp_shexp",
    hc_count="{a}.hyper_connection.count",
    hc_sinkhorn_iterations="{a}.hyper_connection.sinkhorn_iterations",
    hc_epsilon="{a}.hyper_connection.epsilon",
    hash_layer_count="{a}.hash_layer_count",
    architecture="general.architecture",
    type="general.type",
    name="general.name",
    file_type="general.file_type",
    quantization_version="general.quantization_version",
    tok_model="tokenizer.ggml.model",
    tok_pre="tokenizer.ggml.pre",
    tok_tokens="tokenizer.ggml.tokens",
    tok_types="tokenizer.ggml.token_type",
    tok_merges="tokenizer.ggml.merges",
    add_bos="tokenizer.ggml.add_bos_token",
    add_eos="tokenizer.ggml.add_eos_token",
    chat_template="tokenizer.chat_template",
)
# special token role -> key (llama.cpp spells "seperator")
SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
    "pad": "tokenizer.ggml.padding_token_id", "cls": "tokenizer.ggml.cls_token_id",
    "mask": "tokenizer.ggml.mask_token_id", "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
}
# GLM's converter (`_set_vocab_glm`) pins these roles to named added tokens when the tokenizer has them.
GLM_SPECIAL = {"bos": "[gMASK]", "eot": "<|user|>", "unk": "<|endoftext|>", "eom": "<|observation|>"}
# llama.cpp token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# tokenizer.ggml.pre that llama.cpp's converter assigns to each family's released tokenizer
FAMILY_PRE = {"glm_moe_dsa": "glm4", "deepseek_v32": "deepseek-v3", "deepseek_v3": "deepseek-v3",
              "deepseek_v4": "deepseek-v3"}


def block_name(dsalite_suffix: str, i: int) -> str:
    return f"blk.{i}.{BLOCK[dsalite_suffix]}"


# --------------------------------------------------------------------------- DeepSeek-V4 (deepseek4)

V4_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.hc_head.hc_fn": "output_hc_fn.weight",
    "model.hc_head.hc_base": "output_hc_base.weight",
    "model.hc_head.hc_scale": "output_hc_scale.weight",
}
# Block tensors: trunk `model.layers.{i}.` / MTP `mtp.{k}.` in dsalite, `blk.{i}.` in GGUF.
V4_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"{s}_hc.{p}": f"hc_{s}_{p}.weight" for s in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "self_attn.sinks": "attn_sinks.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_norm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_proj.weight": "attn_kv.weight",
    "self_attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_a_proj.weight": "attn_output_a.weight",
    "self_attn.o_b_proj.weight": "attn_output_b.weight",
    **{f"self_attn.compressor.{'indexer.' if who == 'indexer' else ''}{ours}": f"{who}_compressor_{theirs}.weight"
       for who in ("attn", "indexer")
       for ours, theirs in (("kv_proj.weight", "kv"), ("gate_proj.weight", "gate"), ("position_bias", "ape"),
                            ("kv_norm.weight", "norm"))},
    "self_attn.compressor.indexer.q_b_proj.weight": "indexer.attn_q_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "indexer.proj.weight",
    **MOE_AND_NEXTN,
    "mlp.gate.tid2eid": "ffn_gate_tid2eid.weight",
    # MTP extras (the draft file); DeepSeek's MTP `norm` is the shared head norm
    "norm.weight": "nextn.shared_head_norm.weight",
}
# The MTP layer's own hc_head is the draft file's root `output_hc_*` (llama.cpp's MTP graph reads the root one).
V4_MTP_ROOT = {f"hc_head.{p}": f"output_{p}.weight" for p in ("hc_fn", "hc_base", "hc_scale")}
# e_proj and h_proj [D, D] are one GGUF tensor [D, 2D]: llama.cpp projects concat(enorm(e), hnorm(h)).
V4_EH_PROJ = ("e_proj.weight", "h_proj.weight", "nextn.eh_proj.weight")
# Kept F32 whatever the file type, besides the generic rule: what HF keeps in fp32 (`_keep_in_fp32_modules_strict`,
# and DeepSeek's release stores in F32, which llama.cpp's converter keeps): mHC mixers and compressor position biases.
V4_KEEP_F32 = KEEP_F32 + ("hc_attn_fn.weight", "hc_ffn_fn.weight", "output_hc_fn.weight", "compressor_ape.weight")
# hash routing table, written as integers
V4_INT = ("ffn_gate_tid2eid.weight",)
