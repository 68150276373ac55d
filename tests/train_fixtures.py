"""Small recipes and a synthetic corpus for the training tests (seconds per run on one core)."""

from __future__ import annotations

import random

from dsalite.training.recipe import parse_recipe

WORDS = ("the king queen lord lady sword crown night day love death blood heart fair foul speak hear see go come "
         "what why when where thou thee thy art hath doth").split()

TINY_MODEL = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
    num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    index_topk=8, index_n_heads=4, index_head_dim=16, index_topk_pattern="FFSF",
)


def write_corpus(path, n_lines=300, seed=0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_lines):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".\n")
    return str(path)


def tiny_recipe(files, stage="pretrain", **train):
    t = dict(stage=stage, max_steps=4, lr=3e-3, warmup_steps=2, save_every=2, keep_last=2, threads=1)
    t.update(train)
    return parse_recipe({
        "model": {"preset": "glm-5.2-tiny", "overrides": dict(TINY_MODEL), "init_std": 0.05},
        "data": {"files": [str(f) for f in files], "vocab_size": 300, "seq_len": 32, "batch_size": 2},
        "train": t,
        "lora": {"rank": 4, "alpha": 8.0, "targets": ["attention", "indexer", "mlp", "experts"]},
    })
