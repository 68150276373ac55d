"""ModelConfig: HF normalisation, the IndexShare schedule, round trip of unknown keys, and named errors."""

import math

import pytest

from dsalite.config import ConfigError, ModelConfig
from dsalite.indexshare import indexer_schedule, source_layer
from hf_fixtures import TINY


def glm(**kw):
    d = dict(TINY, model_type="glm_moe_dsa", index_topk=8, index_n_heads=2, index_head_dim=16)
    d.update(kw)
    return d


def test_glm52_schedule_has_21_full_layers():
    types = indexer_schedule(78, 1, freq=4, offset=3)
    full = [i for i, t in enumerate(types[:78]) if t == "full"]
    assert len(full) == 21
    assert full[:5] == [0, 1, 2, 6, 10] and full[-1] == 74
    assert "".join("F" if t == "full" else "S" for t in types[:78]) == "FFF" + "SSSF" * 18 + "SSS"
    assert types[78] == "full"  # the MTP layer is a full layer with its own indexer
    assert source_layer(types, 77) == 74 and source_layer(types, 6) == 6


def test_schedule_matches_transformers():
    from transformers import GlmMoeDsaConfig

    for freq, off, L in [(4, 3, 78), (2, 2, 7), (3, 1, 10), (1, 2, 5), (5, 0, 12)]:
        hf = GlmMoeDsaConfig(num_hidden_layers=L, index_topk_freq=freq, index_skip_topk_offset=off)
        ours = ModelConfig.from_hf(glm(num_hidden_layers=L, index_topk_freq=freq, index_skip_topk_offset=off,
                                       num_nextn_predict_layers=0, first_k_dense_replace=1))
        assert ours.indexer_types == hf.indexer_types, (freq, off)


def test_pattern_and_explicit_list():
    c = ModelConfig.from_hf(glm(index_topk_pattern="FSFS", num_nextn_predict_layers=0))
    assert c.indexer_types == ["full", "shared", "full", "shared"]
    c = ModelConfig.from_hf(glm(indexer_types=["full", "full", "shared", "full"], num_nextn_predict_layers=1))
    assert c.indexer_types == ["full", "full", "shared", "full", "full"]


def test_head_dim_quirk_and_aliases():
    c = ModelConfig.from_hf(glm(head_dim=192, num_experts=16, n_routed_experts=None))
    assert c.qk_rope_head_dim == TINY["qk_rope_head_dim"] and c.n_routed_experts == 16
    v3 = ModelConfig.from_hf(dict(TINY, model_type="deepseek_v3", num_mtp_layers=2))
    assert v3.num_nextn_predict_layers == 2 and not v3.has_indexer
    assert v3.mlp_types == ["dense", "sparse", "sparse", "sparse"]


def test_rope_legacy_and_nested_and_yarn_scale():
    legacy = ModelConfig.from_hf(glm(rope_theta=5e5, rope_scaling={"type": "yarn", "factor": 40,
                                     "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0}))
    assert legacy.rope["rope_type"] == "yarn" and legacy.rope["rope_theta"] == 5e5
    d = (16 + 8) ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    assert legacy.softmax_scale == pytest.approx(d, rel=1e-12)
    nested = ModelConfig.from_hf(glm(rope_parameters={"rope_type": "default", "rope_theta": 8e6}))
    assert nested.rope["rope_theta"] == 8e6 and nested.softmax_scale == (16 + 8) ** -0.5
    # written back in the spelling it came in
    assert legacy.to_hf()["rope_scaling"]["factor"] == 40 and "rope_parameters" not in legacy.to_hf()
    assert nested.to_hf()["rope_parameters"]["rope_theta"] == 8e6


def test_unknown_keys_survive_round_trip():
    d = glm(index_topk_freq=2, index_skip_topk_offset=2, indexer_rope_interleave=True,
            some_future_key={"a": [1, 2]}, eos_token_id=[3, 4])
    c = ModelConfig.from_hf(d)
    back = c.to_hf()
    for k, v in d.items():
        assert back[k] == v, k
    assert ModelConfig.from_hf(back).indexer_types == c.indexer_types


@pytest.mark.parametrize("kw,field", [
    (dict(hidden_size=-4), "hidden_size"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(model_type="llama"), "model_type"),
    (dict(index_topk=0), "index_topk"),
    (dict(index_topk_pattern="FSF"), "index_topk_pattern"),
    (dict(index_topk_pattern="SFFF"), "index_topk_pattern"),
    (dict(indexer_types=["full", "bogus", "full", "full"]), "indexer_types"),
    (dict(n_routed_experts=9, n_group=2), "n_group"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(mlp_layer_types=["dense", "sparse"]), "mlp_layer_types"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "rope_type"),
    (dict(num_experts_per_tok=20), "num_experts_per_tok"),
])
def test_invalid_values_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(glm(**kw))
