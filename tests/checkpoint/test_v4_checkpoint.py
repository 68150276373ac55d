"""DeepSeek-V4 checkpoints: byte-exact round trips in both layouts, MTP kept, hand-built FP8 + FP4 original-layout
files dequantised bit-exact against a reference written here (not quant.py's), `convert`, and named errors."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from dsalite.checkpoint import quant
from dsalite.families.deepseek_v4 import checkpoint as v4
from dsalite.checkpoint.convert import convert
from dsalite.checkpoint.io import CheckpointError
from dsalite.checkpoint.pretrained import from_pretrained
from dsalite.config import ModelConfig
from dsalite.model import build_model
from test_pretrained import assert_same_bytes, disk_tensors
from v4_fixtures import make_v4_checkpoint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A bf16 checkpoint written by transformers (HF save layout, no MTP)."""
    return make_v4_checkpoint(tmp_path_factory.mktemp("v4"), "v4_all_types", dtype=torch.bfloat16)


def tiny_with_mtp(seed: int = 0):
    cfg = ModelConfig.tiny("deepseek_v4")
    model = build_model(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def write_config(path, cfg, **extra) -> None:
    d = cfg.to_hf()
    d.update(extra)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)


# --------------------------------------------------------------------------- names


def test_table_maps_both_ways():
    L = 4
    for ours, orig, hf_name in [
        ("model.layers.2.self_attn.kv_norm.weight", "layers.2.attn.kv_norm.weight", "model.layers.2.attn.norm.weight"),
        ("model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
         "layers.1.attn.indexer.weights_proj.weight", "model.layers.1.attn.indexer.weights_proj.weight"),
        ("model.layers.0.mlp.experts.7.up_proj.weight", "layers.0.ffn.experts.7.w3.weight",
         "model.layers.0.ffn.experts.7.w3.weight"),
        ("model.hc_head.hc_fn", "hc_head_fn", "model.hc_head.hc_fn"),
        ("model.layers.4.hc_head.hc_scale", "mtp.0.hc_head_scale", "mtp.0.hc_head_scale"),
        ("model.layers.5.self_attn.kv_norm.weight", "mtp.1.attn.kv_norm.weight", "mtp.1.attn.norm.weight"),
    ]:
        assert v4.to_disk(ours, "original", L) == orig and v4.from_disk(orig, "original", L) == ours
        assert v4.to_disk(ours, "hf", L) == hf_name and v4.from_disk(hf_name, "hf", L) == ours
    assert v4.from_disk("layers.0.attn.wq_a.scale", "original", L) == "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    assert v4.from_disk("layers.0.attn.bogus.weight", "original", L) is None


# --------------------------------------------------------------------------- round trips


def test_hf_layout_round_trip_is_byte_exact(hf_dir, tmp_path):
    model = from_pretrained(hf_dir, dtype=None)
    assert model.checkpoint_layout == "hf"
    model.save_pretrained(str(tmp_path / "out"), layout="hf")
    assert_same_bytes(disk_tensors(str(tmp_path / "out")), disk_tensors(hf_dir))
    with open(os.path.join(hf_dir, "config.json")) as f, open(tmp_path / "out" / "config.json") as g:
        src, out = json.load(f), json.load(g)
    assert out.pop("num_nextn_predict_layers") == 0  # the MTP weights were not in the source, so not in the model
    src.pop("num_nextn_predict_layers")
    assert src == out


def test_original_layout_round_trip_is_byte_exact_with_mtp(tmp_path):
    model = tiny_with_mtp()
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):  # DeepSeek ships the hash table as int32
            b.data = b.to(torch.int32)
    model.save_pretrained(str(tmp_path / "a"), layout="original")
    first = disk_tensors(str(tmp_path / "a"))
    assert "mtp.0.e_proj.weight" in first and "mtp.0.hc_head_fn" in first and "mtp.0.attn.wq_a.weight" in first
    assert first["layers.0.ffn.gate.tid2eid"].dtype == torch.int32
    again = from_pretrained(str(tmp_path / "a"), dtype=None)
    assert again.checkpoint_layout == "original" and len(again.mtp) == 1
    again.save_pretrained(str(tmp_path / "b"), layout="original")
    assert_same_bytes(disk_tensors(str(tmp_path / "b")), first)

    loaded = from_pretrained(str(tmp_path / "a"))  # default fp32 load: int64 hash table, same routing
    assert loaded.model.layers["0"].mlp.gate.tid2eid.dtype == torch.int64
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
        assert torch.equal(a.logits, b.logits)
        ma = model.mtp_forward(a.streams, ids)
        mb = loaded.mtp_forward(b.streams, ids)
    assert ma[0].shape == (1, 24, 128) and torch.equal(ma[0], mb[0])


def test_layouts_convert_into_each_other(hf_dir, tmp_path):
    model = from_pretrained(hf_dir, dtype=None)
    model.save_pretrained(str(tmp_path / "orig"), layout="original")
    back = from_pretrained(str(tmp_path / "orig"), dtype=None)
    back.save_pretrained(str(tmp_path / "hf"), layout="hf")
    assert_same_bytes(disk_tensors(str(tmp_path / "hf")), disk_tensors(hf_dir))


# --------------------------------------------------------------------------- FP8 + FP4


def ref_e8m0(codes: torch.Tensor) -> torch.Tensor:
    e = codes.view(torch.uint8).to(torch.float64)
    return torch.where(e == 255, torch.nan, torch.pow(2.0, e - 127)).to(torch.float32)


def ref_fp8(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = s.float() if s.dtype == torch.float32 else ref_e8m0(s)
    full = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
    return w.float() * full


def ref_fp4(packed: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).long()
    codes = torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)  # low nibble = even column
    mag = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])[codes & 7]
    vals = torch.where(codes >= 8, -mag, mag)
    return vals * ref_e8m0(s).repeat_interleave(32, 1)


# dense linears quantised to FP8 in DeepSeek's release; compressor / indexer projections stay unquantised
FP8_LEAVES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
              "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight", "e_proj.weight",
              "h_proj.weight")


def quantised_original(tmp_path, scale_kinds=("e8m0", "uint8", "float")):
    """Original-layout checkpoint: FP8 e4m3 linears (scales cycling float8_e8m0fnu / raw uint8 / float32) and FP4
    routed experts (E8M0 per 32 columns). Returns (dir, {disk weight name: reference float32 tensor})."""
    model = tiny_with_mtp(seed=3)
    d = tmp_path / "fp8fp4"
    model.save_pretrained(str(d), layout="original")
    plain = disk_tensors(str(d))
    out, ref, n = {}, {}, 0
    for k, t in plain.items():
        stem = k[: -len(".weight")]
        if ".ffn.experts." in k:
            q, s = quant.quantize_fp4(t, e8m0_dtype=torch.float8_e8m0fnu if n % 2 else torch.uint8)
            out[k], out[stem + ".scale"] = q, s
            ref[k] = ref_fp4(q, s)
            n += 1
        elif k.endswith(FP8_LEAVES):
            kind = scale_kinds[n % len(scale_kinds)]
            fmt = "float" if kind == "float" else "ue8m0"
            q, s = quant.quantize_fp8_block(t, scale_fmt=fmt, e8m0_dtype=torch.float8_e8m0fnu if kind == "e8m0"
                                            else torch.uint8)
            out[k], out[stem + ".scale"] = q, s
            ref[k] = ref_fp8(q, s)
            n += 1
        else:
            out[k] = t
    save_file(out, str(d / "model.safetensors"))
    write_config(d, model.cfg, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                                    "weight_block_size": [128, 128], "expert_dtype": "fp4"})
    return str(d), ref


def test_fp8_fp4_original_layout_dequantises_bit_exact(tmp_path):
    path, ref = quantised_original(tmp_path)
    assert any(k.endswith("w1.weight") for k in ref) and any(k.endswith("wq_a.weight") for k in ref)
    model = from_pretrained(path)
    sd = model.state_dict()
    L = model.cfg.num_hidden_layers
    for disk, want in ref.items():
        name = v4.from_disk(disk, "original", L).replace(f"model.layers.{L}.", "mtp.0.")
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            fused = sd[f"{m.group(1)}.{'down_proj' if m.group(3) == 'down' else 'gate_up_proj'}"]
            e, inter = int(m.group(2)), model.cfg.moe_intermediate_size
            got = fused[e] if m.group(3) == "down" else fused[e, :inter] if m.group(3) == "gate" else fused[e, inter:]
        else:
            got = sd[name]
        assert torch.equal(got, want), disk
        assert torch.isfinite(want).all()


def test_convert_dequantises_original_fp8_fp4(tmp_path):
    path, ref = quantised_original(tmp_path)
    out = tmp_path / "plain"
    convert(path, str(out), dtype=torch.float32)
    t = disk_tensors(str(out))
    assert not any(k.endswith(".scale") for k in t)
    for k, want in ref.items():
        assert torch.equal(t[k], want), k
    assert t["layers.2.ffn.gate.bias"].dtype == torch.float32 and t["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    a, b = from_pretrained(path), from_pretrained(str(out))
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


# --------------------------------------------------------------------------- bad input


def edited(path: str, edit) -> str:
    """Rewrite a single-file checkpoint with edit(tensors) applied."""
    t = disk_tensors(path)
    edit(t)
    save_file(t, os.path.join(path, "model.safetensors"))
    return path


def plain_original(tmp_path) -> str:
    tiny_with_mtp().save_pretrained(str(tmp_path / "plain"), layout="original")
    return str(tmp_path / "plain")


def test_wrong_scale_grid_names_the_disk_tensor(tmp_path):
    path = edited(quantised_original(tmp_path)[0],
                  lambda t: t.update({"layers.0.attn.wq_a.scale": torch.zeros(2, 2, dtype=torch.uint8)}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wq_a\.scale: scale shape \[2, 2\]"):
        from_pretrained(path)


def test_missing_tid2eid_is_named(tmp_path):
    path = edited(plain_original(tmp_path), lambda t: t.pop("layers.1.ffn.gate.tid2eid"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.ffn\.gate\.tid2eid: missing; layer 1 is hash-routed"):
        from_pretrained(path)


def test_odd_packed_fp4_width_is_named(tmp_path):
    k = "layers.2.ffn.experts.1.w1.weight"
    path = edited(quantised_original(tmp_path)[0], lambda t: t.update({k: t[k][:, :31].contiguous()}))
    with pytest.raises(CheckpointError, match=r"layers\.2\.ffn\.experts\.1\.w1\.(weight|scale)"):
        from_pretrained(path)


def test_unknown_and_partial_mtp_tensors_are_named(tmp_path):
    path = edited(plain_original(tmp_path), lambda t: t.update({"layers.0.attn.mystery.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.mystery\.weight"):
        from_pretrained(path)
    edited(path, lambda t: (t.pop("layers.0.attn.mystery.weight"), t.pop("mtp.0.h_proj.weight")))
    with pytest.raises(CheckpointError, match=r"mtp\.0\.h_proj\.weight: missing"):
        from_pretrained(path)


def test_bad_layout_name(tmp_path):
    with pytest.raises(CheckpointError, match="layout must be one of"):
        tiny_with_mtp().save_pretrained(str(tmp_path / "e"), layout="megatron")
