"""DeepSeek-V4 config: both spellings read like transformers reads them, written back in the spelling they came in."""

import pytest

from dsalite.config import ConfigError, ModelConfig
from dsalite.presets import CSA, HCA, SLIDING, TINY_V4

_MLP = {"hash_moe": "hash", "moe": "sparse"}


def v4(**kw):
    d = dict(TINY_V4)
    d.update(kw)
    return d


@pytest.mark.parametrize("kw", [
    dict(layer_types=None, mlp_layer_types=None, num_hidden_layers=7),  # HF defaults: V4-Pro schedule, 3 hash
    dict(layer_types=None, compress_ratios=[0, 0, 4, 128, 4, 128], num_hidden_layers=6, num_hash_layers=2,
         mlp_layer_types=None, compress_rates=None),
    dict(qk_rope_head_dim=16, partial_rotary_factor=None),
])
def test_schedules_match_transformers(kw):
    from transformers import DeepseekV4Config

    d = {k: v for k, v in v4(**kw).items() if v is not None}
    hf = DeepseekV4Config(**{k: v for k, v in d.items() if k != "model_type"})
    ours = ModelConfig.from_hf(d)
    assert ours.layer_types[: ours.num_hidden_layers] == hf.layer_types
    assert ours.mlp_types == [_MLP[t] for t in hf.mlp_layer_types]
    assert ours.qk_rope_head_dim == hf.qk_rope_head_dim
    assert ours.compress_rope["rope_theta"] == hf.rope_parameters["compress"]["rope_theta"]


def test_round_trip_keeps_unknown_keys_and_the_original_spelling():
    d = v4(layer_types=None, mlp_layer_types=None, compress_rates=None, num_hidden_layers=4,
           compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1, qk_rope_head_dim=8, partial_rotary_factor=None,
           rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64},
           compress_rope_theta=160000, expert_dtype="fp4", some_future_key={"a": 1})
    d = {k: v for k, v in d.items() if v is not None}
    c = ModelConfig.from_hf(d)
    assert c.layer_types == [SLIDING, CSA, HCA, CSA, SLIDING]  # the 5th ratio is the MTP layer's
    out = c.to_hf()
    assert out["compress_ratios"] == d["compress_ratios"] and "layer_types" not in out
    assert out["num_hash_layers"] == 1 and "mlp_layer_types" not in out
    assert out["qk_rope_head_dim"] == 8 and out["some_future_key"] == {"a": 1} and out["expert_dtype"] == "fp4"
    assert out["rope_scaling"]["factor"] == 16 and out["compress_rope_theta"] == 160000
    again = ModelConfig.from_hf(out)
    for f in ("layer_types", "mlp_types", "rope", "compress_rope", "qk_rope_head_dim", "compress_rates"):
        assert getattr(again, f) == getattr(c, f), f


def test_hf_spelling_round_trips_through_transformers():
    from transformers import DeepseekV4Config

    c = ModelConfig.tiny("deepseek_v4")
    d = c.to_hf()
    hf = DeepseekV4Config(**{k: v for k, v in d.items() if k != "model_type"})
    assert hf.layer_types == c.layer_types[:4] and hf.qk_rope_head_dim == c.qk_rope_head_dim
    assert ModelConfig.from_hf(hf.to_dict()).layer_types[:4] == c.layer_types[:4]


@pytest.mark.parametrize("kw, match", [
    (dict(layer_types=None, compress_ratios=[0, 4, 128, 5]), "compress_ratios entry 5"),
    (dict(o_groups=3), "o_groups=3 must divide num_attention_heads=4"),
    (dict(num_key_value_heads=4), "num_key_value_heads=4"),
    (dict(scoring_func="softmax"), "scoring_func='softmax'"),
    (dict(mlp_layer_types=["hash_moe", "dense", "moe", "moe"]), "'dense'"),
    (dict(layer_types=[SLIDING, "full_attention", CSA, HCA]), "'full_attention'"),
    (dict(layer_types=[SLIDING, CSA]), "layer_types has 2 trunk entries"),
    (dict(compress_rates={CSA: 0, HCA: 8}), "compress_rates"),
    (dict(partial_rotary_factor=0.3), "must be even"),
])
def test_bad_fields_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(v4(**kw))
