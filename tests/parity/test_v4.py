"""DeepSeek-V4 fp32 parity with transformers 5.23.0 `DeepseekV4ForCausalLM` on tiny models it builds and saves.

Sequences are longer than the sliding window, span several HCA and CSA blocks, and the CSA indexer keeps fewer
entries than are visible; the selection must be HF's exactly and its top-k boundary tie-free.
"""

import pytest
import torch

from dsalite.checkpoint.pretrained import from_pretrained
from dsalite.presets import CSA, HCA
from dsalite.layers.rope import inv_freq_and_scale
from dsalite.verify import compare, default_seq_len
from v4_fixtures import CASES, make_v4_checkpoint


def check_report(rep, cfg):
    print(rep.format())
    assert rep.max_abs <= 1e-4, rep.format()
    assert rep.cosine > 0.999999
    for r in rep.layers:
        assert r.hidden_max_abs <= 1e-4, f"layer {r.layer}: {r.hidden_max_abs}"
    assert rep.seq_len > cfg.sliding_window
    assert rep.seq_len >= 2 * cfg.compress_rates[HCA], "fewer than two HCA entries"
    csa = [r for r in rep.layers if r.indexer == "csa"]
    assert len(csa) == cfg.layer_types[: cfg.num_hidden_layers].count(CSA) > 0
    assert {"window", "csa", "hca"} <= {r.indexer for r in rep.layers}
    for r in csa:
        assert r.excluded_fraction > 0.2, f"layer {r.layer}: CSA selection is not sparse"
        assert r.boundary_gap > 1e-6, f"layer {r.layer}: tie at the top-k boundary; the comparison is undefined"
        assert r.topk_overlap == 1.0, f"layer {r.layer}: selected entries differ from HF"


@pytest.mark.parametrize("case", sorted(CASES))
def test_v4_logits_match_transformers(tmp_path, case):
    path = make_v4_checkpoint(tmp_path, case)
    cfg = from_pretrained(path).cfg
    check_report(compare(path, batch=2, seed=1), cfg)
    assert cfg.mlp_types[:2] == ["hash", "hash"] and cfg.hc_mult == 4


def test_v4_flash_schedule_reads_the_original_config_spelling(tmp_path):
    path = make_v4_checkpoint(tmp_path, "v4_flash_schedule")
    cfg = from_pretrained(path).cfg
    assert cfg.layer_types[:6] == ["sliding_attention"] * 2 + [CSA, HCA] * 2
    assert cfg.mlp_types == ["hash"] * 3 + ["sparse"] * 3
    assert cfg.compress_rope["rope_type"] == "yarn" and cfg.compress_rope["attention_factor"] == 1.0
    yarn, _ = inv_freq_and_scale(cfg.compress_rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings)
    plain, _ = inv_freq_and_scale({"rope_theta": 160000.0}, cfg.qk_rope_head_dim, cfg.max_position_embeddings)
    assert not torch.equal(yarn, plain), "yarn must change the compress rope for this test to mean anything"
    assert default_seq_len(cfg) > 2 * 128


def test_v4_original_layout_loads_in_both(tmp_path):
    """Saved in DeepSeek's original names, the checkpoint loads in transformers and in dsalite with parity."""
    src = make_v4_checkpoint(tmp_path, "v4_all_types")
    model = from_pretrained(src, dtype=None)
    dst = tmp_path / "original"
    model.save_pretrained(str(dst), layout="original")
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.attn.kv_norm.weight",
            "layers.1.attn.indexer.compressor.ape", "layers.0.ffn.gate.tid2eid", "layers.2.ffn.gate.bias",
            "layers.3.ffn.experts.1.w3.weight"} <= keys
    assert not any(k.startswith("model.") for k in keys)
    check_report(compare(str(dst), batch=2, seed=2), model.cfg)


def test_v4_left_padding_matches_transformers(tmp_path):
    """attention_mask hides padded window keys (compressed entries pool over them, as in HF)."""
    from dsalite.verify import load_hf

    path = make_v4_checkpoint(tmp_path, "v4_all_types")
    ours, theirs = from_pretrained(path), load_hf(path)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
        plain = ours(ids).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-4
    assert not torch.allclose(a[0], plain[0], atol=1e-3), "the mask must change the padded row"
    from dsalite.inference.runner import new_cache

    with pytest.raises(ValueError, match="with a cache does not take segment_ids"):  # packing is for training
        ours(ids, segment_ids=torch.zeros(2, 40, dtype=torch.long), cache=new_cache(ours, 2, 64))
    with pytest.raises(ValueError, match="cache"):
        ours(ids, cache=object())


def test_v4_bf16_follows_transformers_mixed_precision(tmp_path):
    """In bf16, HF keeps norms, mHC, sinks, position biases and the router bias in fp32 (`_keep_in_fp32_modules_
    strict`) and mixes them with bf16 activations; dsalite loads and computes the same way, so the results agree to
    within one bf16 ulp of the logits (measured: identical) although each is ~1.7 away from the fp32 logits."""
    from dsalite.verify import load_hf

    path = make_v4_checkpoint(tmp_path, "v4_all_types", dtype=torch.bfloat16)
    ours, theirs = from_pretrained(path, dtype=torch.bfloat16), load_hf(path, dtype=torch.bfloat16)
    assert ours.model.layers["1"].self_attn.sinks.dtype == torch.float32
    assert ours.model.layers["1"].attn_hc.fn.dtype == torch.float32
    assert ours.model.layers["1"].self_attn.q_b_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids, output_hidden_states=True)
        b = theirs(ids, output_hidden_states=True)
    assert torch.equal(a.hidden_states[1], b.hidden_states[1])
    ulp = torch.finfo(torch.bfloat16).eps * b.logits.float().abs().max()
    assert (a.logits.float() - b.logits.float()).abs().max() <= ulp


def test_v4_short_sequences_match_transformers(tmp_path):
    """No complete window yet (S < m), exactly one CSA entry, fewer entries than index_topk, one token."""
    from dsalite.verify import load_hf

    path = make_v4_checkpoint(tmp_path, "v4_all_types")
    ours, theirs = from_pretrained(path), load_hf(path)
    for S in (1, 3, 4, 9):
        ids = torch.randint(0, 128, (2, S), generator=torch.Generator().manual_seed(S))
        with torch.no_grad():
            assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-4, S
