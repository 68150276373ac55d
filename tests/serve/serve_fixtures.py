"""Tiny models and a live server for the serving tests."""

import torch

from dsalite.config import ModelConfig
from dsalite.model import build_model
from dsalite.presets import TINY_MLA


def tiny_model(model_type: str = "glm_moe_dsa", seed: int = 0, **overrides):
    """A random tiny MLA model (index_topk 8, so decode past 8 tokens is sparse; 16
    indexer heads make exact-zero ReLU ties at the top-k boundary unlikely); std 0.1 keeps logits tie-free."""
    d = dict(TINY_MLA, model_type=model_type, index_topk=8, index_n_heads=16)
    if model_type == "glm_moe_dsa":
        d.update(index_topk_pattern="FSFS")
    if model_type == "deepseek_v3":
        d.pop("index_topk")
    d.update(overrides)
    m = build_model(ModelConfig.from_hf(d))
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed), router_bias_std=0.05)
    return m.eval()
