"""`--dry-run`: the planner's per-rank figures equal the analytic ones (tiny models, exactly; real sizes, within the
padding of FSDP's dim-0 shards), on the fake process group, in this one process."""

import math

import pytest
import torch

from dsalite.cli import main
from dsalite.model import Transformer
from dsalite.parallel.plan import ideal_shard_bytes, plan
from dsalite.training.recipe import load_recipe
from dsalite.training.trainer import model_config
from workers import recipe

ROOT = __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", "recipes")


def _padded(cfg, dp_shard, ep=1):
    """fp32 bytes on rank 0: FSDP gives rank 0 ceil(d0 / F) rows of every tensor; routed experts are first split
    into ep blocks of E / ep, then sharded over efsdp = dp_shard / ep."""
    with torch.device("meta"):
        m = Transformer(cfg)
    total = 0
    for n, p in m.named_parameters():
        d0, rest = p.shape[0], p.numel() // p.shape[0]
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")) and ep > 1:
            total += math.ceil(d0 // ep / (dp_shard // ep)) * rest
        else:
            total += math.ceil(d0 / dp_shard) * rest
    return 4 * total


@pytest.mark.parametrize("family, layout, n", [("glm-5.2", {"dp_shard": 4}, 4),
                                              ("deepseek-v3", {"dp_shard": 4, "ep": 2}, 4),
                                              ("deepseek-v3.2", {"dp_shard": 2, "dp_replicate": 2}, 4)])
def test_tiny_plans_equal_the_analytic_figures(family, layout, n):
    r = recipe(family, [], layout)
    cfg = model_config(r)
    p = plan(r, n)
    assert p.params == _padded(cfg, p.layout.dp_shard, p.layout.ep)
    assert p.grads == p.params and p.optimizer == 2 * p.params  # fp32 gradients, AdamW's two fp32 moments
    if family == "glm-5.2":  # FSDP only: 3× the parameters per step, (F-1)/F of them, minus the root's 2nd gather
        with torch.device("meta"):
            m = Transformer(cfg)
        total = sum(q.numel() for q in m.parameters())
        root = m.model.norm.weight.numel() + m.lm_head.weight.numel()
        assert p.comm["FSDP"] == int((3 * total - root) * 4 * 3 / 4)
    if family == "deepseek-v3":
        tokens = r.data.batch_size // 4 * r.data.seq_len
        moe = sum(t == "sparse" for t in cfg.mlp_types) + cfg.num_nextn_predict_layers
        assert p.comm["EP all-to-all"] == int(4 * moe * tokens * cfg.num_experts_per_tok * cfg.hidden_size * 4 / 2)
    if family == "deepseek-v3.2":
        assert "HSDP all-reduce" in p.comm


@pytest.mark.parametrize("name, nproc, billions", [("glm5-744b", 256, 755.77), ("deepseek-v32-671b", 64, 685.36),
                                                   ("deepseek-v4-flash-284b", 128, 290.94)])
def test_real_size_plans(name, nproc, billions):
    r = load_recipe(f"{ROOT}/{name}.toml")
    p = plan(r, nproc)
    assert round(p.n_params / 1e9, 2) == billions
    ratio = p.params / ideal_shard_bytes(model_config(r), p.layout)
    assert 1.0 <= ratio < 1.01, ratio  # an even split, but for the padding of dim-0 shards
    assert (name.startswith("deepseek-v4")) == any("DeepSeek-V4" in n for n in p.notes)


def test_cli_dry_run(capsys):
    assert main(["train", f"{ROOT}/glm5-744b.toml", "--dry-run", "--nproc", "256", "--ep", "16"]) == 0
    out = capsys.readouterr().out
    assert "755.77B parameters" in out and "dp_shard=256, ep=16 (efsdp=16)" in out and "AdamW state" in out
