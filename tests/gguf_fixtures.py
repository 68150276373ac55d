"""GGUF test inputs: a tiny byte-level BPE tokenizer and checkpoints that carry MTP weights and that tokenizer."""

from __future__ import annotations

import json
import os

import torch

from dsalite.config import _TINY_BASE, ModelConfig
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
    d = dict(_TINY_BASE, model_type=model_type, vocab_size=VOCAB, index_head_dim=64, index_n_heads=16)
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
