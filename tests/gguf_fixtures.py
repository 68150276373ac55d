"""GGUF test inputs: a tiny byte-level BPE tokenizer and checkpoints that carry MTP weights and that tokenizer."""

from __future__ import annotations

import json
import os

import torch

from dsalite.config import ModelConfig
from dsalite.presets import TINY_MLA
from dsalite.model import Transformer

VOCAB = 320  # the byte-level alphabet (256) + specials + a few merges must fit
SPECIAL = ["<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>"]
TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, sparse attention gathers the top-k keys",
        "mixture of experts route every token to a few experts"]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def make_tokenizer(path: str, vocab_size: int = VOCAB):
    """Train a BPE tokenizer (GPT-2 style ByteLevel) into path/tokenizer.json, with a tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 16, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 20, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "[gMASK]",
                   "eos_token": "<|endoftext|>", "chat_template": TEMPLATE}, f)
    return tok


def tiny_config(model_type: str, **overrides) -> ModelConfig:
    """The tiny test shape with an indexer head dim llama.cpp can run (64) and room for the tokenizer."""
    d = dict(TINY_MLA, model_type=model_type, vocab_size=VOCAB, index_head_dim=64, index_n_heads=16)
    if model_type == "deepseek_v32":
        d.update(n_group=2, topk_group=1)
    if model_type == "deepseek_v3":
        for k in ("index_topk", "index_n_heads", "index_head_dim"):
            d.pop(k)
        d.update(n_group=2, topk_group=1)
    d.update(overrides)
    return ModelConfig.from_hf(d)


def make_checkpoint(path, model_type: str, seed: int = 0, **overrides) -> str:
    """A random dsalite model saved in HF layout (MTP included) with the tiny tokenizer beside it."""
    cfg = tiny_config(model_type, **overrides)
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(std=0.1, generator=g, router_bias_std=0.05)
    path = str(path)
    model.save_pretrained(path)
    make_tokenizer(path, cfg.vocab_size)
    return path


# DeepSeek-V4 in shapes llama.cpp's deepseek4 graph runs: 4 mHC streams, CSA ratio 4 / HCA ratio 128 (the only ratios
# it knows), indexer width 64 (its Hadamard rotation), hash layers first, a sliding-window MTP layer; yarn on the
# compress rope as in the release. DeepSeek's original config spelling, which llama.cpp's converter reads.
V4_ORIGINAL = dict(
    architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=VOCAB, hidden_size=64,
    moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
    qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=64,
    index_topk=3, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, sliding_window=8, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=2,
    num_nextn_predict_layers=1, rope_theta=10000.0, compress_rope_theta=160000.0,
    rope_scaling={"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                  "beta_slow": 1},
    scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, swiglu_limit=10.0,
    max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=0,
)


def make_v4_hf_checkpoint(path, seed: int = 0, **overrides) -> str:
    """The transformers-built DeepSeek-V4 (no MTP: transformers drops it) as transformers saves it, with the tiny
    tokenizer: the parity ground truth."""
    from v4_fixtures import build_hf_v4

    kw = {k: v for k, v in dict(V4_ORIGINAL, **overrides).items() if k not in ("architectures", "model_type")}
    kw["num_nextn_predict_layers"] = 0
    path = str(path)
    build_hf_v4("v4_flash_schedule", seed, **kw).save_pretrained(path)
    make_tokenizer(path, kw["vocab_size"])
    return path


def make_v4_checkpoint(path, seed: int = 0, fp4_experts: bool = False, **overrides) -> str:
    """The same trunk plus a random MTP layer, saved in DeepSeek's original layout and config spelling (what
    llama.cpp's converter reads) with the tiny tokenizer. fp4_experts stores the routed experts as the release does:
    packed FP4 e2m1 pairs with an E8M0 scale per 32 columns."""
    import tempfile

    from safetensors.torch import load_file, save_file

    from dsalite.checkpoint import quant
    from dsalite.families.deepseek_v4 import checkpoint as v4
    from dsalite.checkpoint.pretrained import from_pretrained
    from dsalite.model import build_model

    with tempfile.TemporaryDirectory() as tmp:
        trunk = from_pretrained(make_v4_hf_checkpoint(tmp, seed, **overrides)).state_dict()
    cfg = ModelConfig.from_hf(dict(V4_ORIGINAL, **overrides))
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed + 7)
    model.init_weights(std=0.1, generator=g, router_bias_std=0.05)
    with torch.no_grad():  # exercise what init leaves constant, as build_hf_v4 does for the trunk
        for name, p in model.named_parameters():
            if name.startswith("mtp.") and name.rsplit(".", 1)[-1] in ("sinks", "base", "hc_base", "scale", "hc_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing), (missing, unexpected)
    path = str(path)
    v4.save(path, cfg, model.state_dict(), layout="original")
    if fp4_experts:
        f = os.path.join(path, "model.safetensors")
        tensors = load_file(f)
        for k in [k for k in tensors if ".ffn.experts." in k]:
            tensors[k], tensors[k[: -len(".weight")] + ".scale"] = quant.quantize_fp4(tensors[k])
        save_file(tensors, f)
    make_tokenizer(path, cfg.vocab_size)
    return path
