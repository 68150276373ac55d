"""`--init-from` under a parallel layout: the model is built on meta and each rank reads only its slices; the
loaded shards equal a one-process `from_pretrained` (plain and FP8 block-scaled checkpoints, experts split over ep),
and each rank's peak memory growth while loading is about its share, well below the model's bytes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsalite import presets
from dsalite.checkpoint import quant
from dsalite.config import ModelConfig
from dsalite.model import Transformer
from workers import FAMILIES, run_ranks


def _checkpoint(path, **over):
    hf = dict(presets.PRESETS["glm-5.2-tiny"], **FAMILIES["glm-5.2"][1], vocab_size=300)
    hf.update(over)
    m = Transformer(ModelConfig.from_hf(hf))
    m.init_weights(std=0.05, generator=torch.Generator().manual_seed(0), router_bias_std=0.05)
    m.save_pretrained(str(path))
    return str(path)


def _to_fp8(path, block=(32, 32)):
    """Every projection weight FP8 with 32×32 scale blocks: the 96-row dense MLP splits at row 48 over 2 ranks,
    inside a scale block, so the per-slice dequantisation must widen and cut."""
    f = f"{path}/model.safetensors"
    t = load_file(f)
    n = 0
    for k in list(t):
        if k.endswith("_proj.weight") and t[k].dim() == 2 and "weights_proj" not in k:
            t[k], t[k + "_scale_inv"] = quant.quantize_fp8_block(t[k], block=block)
            n += 1
    save_file(t, f)
    cfg = json.load(open(f"{path}/config.json"))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    json.dump(cfg, open(f"{path}/config.json", "w"))
    assert n > 20 and t["model.layers.0.mlp.gate_proj.weight"].shape[0] == 96
    return path


@pytest.mark.timeout(200)
def test_each_rank_reads_only_its_slices(tmp_path):
    big = _checkpoint(tmp_path / "big", hidden_size=384, moe_intermediate_size=384, n_routed_experts=32,
                      intermediate_size=512)  # 60M parameters, 240 MB
    fp8 = _to_fp8(_checkpoint(tmp_path / "fp8"))
    args = {"warmup": _checkpoint(tmp_path / "small"), "ckpts": [big, fp8], "parallel": {"dp_shard": 2, "ep": 2}}
    res = run_ranks("sharded_load", args, 2, str(tmp_path), timeout=150)["results"]
    for r in res:
        assert r["max_diff"] == 0.0
    full = res[0]["model_bytes"]
    assert full > 200e6
    for growth in res[0]["rss_growth"]:  # half the model is this rank's; nothing else of a model's size appears
        assert growth < 0.6 * full, (growth, full)
