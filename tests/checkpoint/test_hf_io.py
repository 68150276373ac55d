"""HF-layout checkpoints (checkpoint/names, load, save, io): name mapping, byte-exact save/load, sharding, FP8,
strict errors, atomic save."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from dsalite.checkpoint import names
from dsalite.checkpoint.io import CheckpointError, CheckpointReader, read_config
from dsalite.checkpoint.load import load_state_dict
from dsalite.checkpoint.save import save_state_dict
from dsalite.config import ModelConfig


# --------------------------------------------------------------------------- synthetic checkpoints


def make_state_dict(cfg, dtype=torch.float32, seed=0):
    """A random state dict in dsalite naming whose shapes follow from cfg (trunk + MTP layers)."""
    g = torch.Generator().manual_seed(seed)
    D, H = cfg.hidden_size, cfg.num_attention_heads
    nope, rope, v, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    def block(prefix, i):
        sd = {
            prefix + "input_layernorm.weight": rnd(D),
            prefix + "post_attention_layernorm.weight": rnd(D),
        }
        a = prefix + "self_attn."
        if cfg.q_lora_rank:
            sd[a + "q_a_proj.weight"] = rnd(cfg.q_lora_rank, D)
            sd[a + "q_a_layernorm.weight"] = rnd(cfg.q_lora_rank)
            sd[a + "q_b_proj.weight"] = rnd(H * (nope + rope), cfg.q_lora_rank)
        else:
            sd[a + "q_proj.weight"] = rnd(H * (nope + rope), D)
        sd[a + "kv_a_proj_with_mqa.weight"] = rnd(r + rope, D)
        sd[a + "kv_a_layernorm.weight"] = rnd(r)
        sd[a + "kv_b_proj.weight"] = rnd(H * (nope + v), r)
        sd[a + "o_proj.weight"] = rnd(D, H * v)
        if cfg.has_indexer and cfg.indexer_types[i] == "full":
            Hi, Di = cfg.index_n_heads, cfg.index_head_dim
            sd[a + "indexer.wq_b.weight"] = rnd(Hi * Di, cfg.q_lora_rank)
            sd[a + "indexer.wk.weight"] = rnd(Di, D)
            sd[a + "indexer.k_norm.weight"] = rnd(Di)
            sd[a + "indexer.k_norm.bias"] = rnd(Di)
            sd[a + "indexer.weights_proj.weight"] = rnd(Hi, D)
        m = prefix + "mlp."
        if cfg.layer_mlp_type(i) == "dense":
            Im = cfg.intermediate_size
            sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"] = rnd(Im, D), rnd(Im, D)
            sd[m + "down_proj.weight"] = rnd(D, Im)
        else:
            E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
            Is = I * cfg.n_shared_experts
            sd[m + "gate.weight"] = rnd(E, D)
            sd[m + "gate.e_score_correction_bias"] = rnd(E, dt=torch.float32)
            sd[m + "experts.gate_up_proj"] = rnd(E, 2 * I, D)
            sd[m + "experts.down_proj"] = rnd(E, D, I)
            sd[m + "shared_experts.gate_proj.weight"] = rnd(Is, D)
            sd[m + "shared_experts.up_proj.weight"] = rnd(Is, D)
            sd[m + "shared_experts.down_proj.weight"] = rnd(D, Is)
        return sd

    sd = {"model.embed_tokens.weight": rnd(cfg.vocab_size, D), "model.norm.weight": rnd(D)}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = rnd(cfg.vocab_size, D)
    for i in range(cfg.num_hidden_layers):
        sd.update(block(f"model.layers.{i}.", i))
    for k in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{k}."
        sd.update(block(p, cfg.num_hidden_layers + k))
        sd.update({
            p + "enorm.weight": rnd(D), p + "hnorm.weight": rnd(D), p + "eh_proj.weight": rnd(D, 2 * D),
            p + "shared_head.norm.weight": rnd(D), p + "shared_head.head.weight": rnd(cfg.vocab_size, D),
            p + "embed_tokens.weight": rnd(cfg.vocab_size, D),
        })
    return sd


def expected_of(sd, dtype=None):
    return {k: (t.shape, dtype) for k, t in sd.items()}


def assert_bytes_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)), k


def read_disk(path):
    r = CheckpointReader(path)
    return {k: r.get(k) for k in r.keys()}


def write_disk(path, cfg, tensors):
    """A single-file checkpoint holding exactly `tensors` (disk names), bypassing save_state_dict's mapping."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    save_file({k: v.clone() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.tiny("glm_moe_dsa")


@pytest.fixture(scope="module")
def sd(cfg):
    return make_state_dict(cfg)


@pytest.fixture(scope="module")
def disk(cfg, sd, tmp_path_factory):
    """The tiny fp32 checkpoint's disk tensors, written once and edited per bad-input case."""
    p = tmp_path_factory.mktemp("good") / "ckpt"
    save_state_dict(str(p), cfg, sd)
    return read_disk(str(p))


def load_err(path, cfg, sd, **kw):
    with pytest.raises(CheckpointError) as ei:
        load_state_dict(str(path), cfg, expected_of(sd), **kw)
    return str(ei.value)


# --------------------------------------------------------------------------- names


def test_name_mapping_both_ways(cfg):
    L = cfg.num_hidden_layers
    keys = [
        "model.layers.1.mlp.experts.0.up_proj.weight", "model.layers.1.mlp.experts.0.gate_proj.weight",
        "model.layers.1.mlp.experts.1.gate_proj.weight", "model.layers.1.mlp.experts.1.up_proj.weight",
        f"model.layers.{L}.mlp.experts.0.down_proj.weight", f"model.layers.{L}.enorm.weight",
        f"model.layers.{L}.mlp.experts.0.down_proj.weight_scale_inv", "model.norm.weight",
        f"model.layers.{L + 1}.enorm.weight",  # beyond the declared MTP layers: stays as is
    ]
    m = names.disk_to_dsalite_names(keys, cfg)
    assert m["model.layers.1.mlp.experts.gate_up_proj"] == [
        "model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.experts.0.up_proj.weight",
        "model.layers.1.mlp.experts.1.gate_proj.weight", "model.layers.1.mlp.experts.1.up_proj.weight",
    ]
    assert m["mtp.0.mlp.experts.down_proj"] == [f"model.layers.{L}.mlp.experts.0.down_proj.weight"]
    assert m["mtp.0.enorm.weight"] == [f"model.layers.{L}.enorm.weight"]
    assert m["model.norm.weight"] == ["model.norm.weight"]
    assert m[f"model.layers.{L + 1}.enorm.weight"] == [f"model.layers.{L + 1}.enorm.weight"]
    assert not any(k.endswith("_scale_inv") for v in m.values() for k in v)
    assert names.dsalite_to_disk_name("mtp.0.eh_proj.weight", cfg) == f"model.layers.{L}.eh_proj.weight"
    assert names.dsalite_to_disk_names("mtp.0.mlp.experts.gate_up_proj", cfg, 2) == [
        f"model.layers.{L}.mlp.experts.0.gate_proj.weight", f"model.layers.{L}.mlp.experts.0.up_proj.weight",
        f"model.layers.{L}.mlp.experts.1.gate_proj.weight", f"model.layers.{L}.mlp.experts.1.up_proj.weight",
    ]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_roundtrip_is_byte_exact(tmp_path, cfg, dtype):
    sd = make_state_dict(cfg, dtype, seed=1)
    path = tmp_path / "ckpt"
    save_state_dict(str(path), cfg, sd, extra_files={"tokenizer.json": b"{}"})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # temp dir renamed away
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((path / "config.json").read_text()) == json.loads(json.dumps(cfg.to_hf()))
    L, E = cfg.num_hidden_layers, cfg.n_routed_experts
    r = CheckpointReader(str(path))
    keys = set(r.keys())
    assert not any(k.startswith("mtp.") or k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    assert f"model.layers.{L}.eh_proj.weight" in keys
    assert f"model.layers.{L}.mlp.experts.{E - 1}.down_proj.weight" in keys
    assert r.shape("model.layers.1.mlp.experts.3.gate_proj.weight") == (cfg.moe_intermediate_size, cfg.hidden_size)
    assert r.dtype("model.layers.1.mlp.experts.3.up_proj.weight") == dtype
    gu = sd["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(r.get("model.layers.1.mlp.experts.3.up_proj.weight"), gu[3, cfg.moe_intermediate_size :])
    out = load_state_dict(str(path), cfg, expected_of(sd))
    assert_bytes_equal(out, sd)
    # keep-dtype default vs explicit cast; the router bias stays float32 either way
    out16 = load_state_dict(r, cfg, expected_of(sd), dtype=torch.float16)
    assert out16["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.float16
    assert out16["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert torch.equal(out16["lm_head.weight"], sd["lm_head.weight"].to(torch.float16))


def test_sharded_roundtrip(tmp_path, cfg, sd):
    path = tmp_path / "ckpt"
    save_state_dict(str(path), cfg, sd, max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 3 and "model.safetensors" not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    for f in shards:  # no shard beyond the limit unless it holds a single oversize tensor
        n = len(CheckpointReader(str(path / f)))
        assert os.path.getsize(path / f) <= 64 * 1024 + 8192 or n == 1
    assert_bytes_equal(load_state_dict(str(path), cfg, expected_of(sd)), sd)


def test_directory_without_index_reads_all_safetensors(tmp_path, cfg, disk, sd):
    keys = sorted(disk)
    half = len(keys) // 2
    os.makedirs(tmp_path / "c")
    save_file({k: disk[k] for k in keys[:half]}, str(tmp_path / "c" / "a.safetensors"))
    save_file({k: disk[k] for k in keys[half:]}, str(tmp_path / "c" / "b.safetensors"))
    assert_bytes_equal(load_state_dict(str(tmp_path / "c"), cfg, expected_of(sd)), sd)


def test_tied_and_view_tensors_are_saved(tmp_path, cfg, sd):
    sd2 = dict(sd)
    sd2["lm_head.weight"] = sd2["model.embed_tokens.weight"]  # shared storage, as with tied weights
    sd2["model.norm.weight"] = torch.randn(3, cfg.hidden_size)[1]  # a view into a bigger storage
    save_state_dict(str(tmp_path / "ckpt"), cfg, sd2)
    assert_bytes_equal(load_state_dict(str(tmp_path / "ckpt"), cfg, expected_of(sd2)), sd2)


def test_optional_tensor_may_be_absent(tmp_path, cfg, disk, sd):
    name = "mtp.0.shared_head.head.weight"
    d = {k: v for k, v in disk.items() if k != names.dsalite_to_disk_name(name, cfg)}
    out = load_state_dict(write_disk(tmp_path / "c", cfg, d), cfg, expected_of(sd), optional={name})
    assert name not in out and len(out) == len(sd) - 1
    msg = load_err(tmp_path / "c", cfg, sd)
    assert name in msg and f"model.layers.{cfg.num_hidden_layers}.shared_head.head.weight" in msg


# --------------------------------------------------------------------------- FP8


def test_fp8_weights_dequantise_exactly(tmp_path):
    from dsalite.checkpoint import quant

    # 576 = 512 + 64 rows for kv_a_proj_with_mqa: a ragged last 128-row block; 192 columns: a ragged column block too
    cfg = ModelConfig.tiny("glm_moe_dsa", kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=64, hidden_size=192)
    sd = make_state_dict(cfg, torch.bfloat16, seed=3)
    path = tmp_path / "ckpt"
    save_state_dict(str(path), cfg, sd)
    d = read_disk(str(path))
    L = cfg.num_hidden_layers
    kva = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert d[kva].shape == (576, 192)
    plan = {kva: "float", f"model.layers.{L}.self_attn.q_b_proj.weight": "e8m0f8"}
    for e in range(cfg.n_routed_experts):
        plan[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"] = "e8m0u8"
        plan[f"model.layers.2.mlp.experts.{e}.up_proj.weight"] = "float"
        plan[f"model.layers.2.mlp.experts.{e}.down_proj.weight"] = "e8m0u8"
    ref = {}
    for k, fmt in plan.items():
        if fmt == "float":
            q, s = quant.quantize_fp8_block(d[k], scale_fmt="float")
        else:
            q, s = quant.quantize_fp8_block(
                d[k], scale_fmt="ue8m0", e8m0_dtype=torch.uint8 if fmt == "e8m0u8" else torch.float8_e8m0fnu
            )
        d[k], d[k + "_scale_inv"] = q, s
        ref[k] = quant.dequantize(q, s, name=k)
    assert d[kva + "_scale_inv"].shape == (5, 2)
    assert d["model.layers.2.mlp.experts.0.gate_proj.weight_scale_inv"].dtype == torch.uint8
    src = write_disk(tmp_path / "fp8", cfg, d)

    out = load_state_dict(src, cfg, expected_of(sd))  # dtype=None: dequantised -> float32, rest as stored
    assert out["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float32
    assert torch.equal(out["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"], ref[kva])
    assert torch.equal(out["mtp.0.self_attn.q_b_proj.weight"], ref[f"model.layers.{L}.self_attn.q_b_proj.weight"])
    gu, dn = out["model.layers.2.mlp.experts.gate_up_proj"], out["model.layers.2.mlp.experts.down_proj"]
    for e in range(cfg.n_routed_experts):
        want = torch.cat([ref[f"model.layers.2.mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up")], 0)
        assert torch.equal(gu[e], want)
        assert torch.equal(dn[e], ref[f"model.layers.2.mlp.experts.{e}.down_proj.weight"])
    assert out["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(out["model.layers.1.self_attn.o_proj.weight"], sd["model.layers.1.self_attn.o_proj.weight"])

    outb = load_state_dict(src, cfg, expected_of(sd), dtype=torch.bfloat16)
    assert torch.equal(outb[kva], ref[kva].to(torch.bfloat16))
    assert outb["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_fp8_scale_grid_mismatch_is_reported(tmp_path, cfg, disk, sd):
    from dsalite.checkpoint import quant

    d = dict(disk)
    k = "model.layers.1.self_attn.q_b_proj.weight"
    q, s = quant.quantize_fp8_block(d[k])
    d[k], d[k + "_scale_inv"] = q, torch.ones(3, 3)
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    assert k + "_scale_inv" in msg and "[3, 3]" in msg and "[1, 1]" in msg


# --------------------------------------------------------------------------- strict validation


def test_missing_tensor(tmp_path, cfg, disk, sd):
    d = {k: v for k, v in disk.items() if k != "model.layers.2.self_attn.o_proj.weight"}
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    assert "model.layers.2.self_attn.o_proj.weight: missing" in msg


def test_unexpected_tensor_named_by_disk_name(tmp_path, cfg, disk, sd):
    L = cfg.num_hidden_layers
    d = dict(disk)
    d["model.layers.1.self_attn.bogus.weight"] = torch.zeros(2)
    d[f"model.layers.{L}.mlp.experts.0.extra_proj.weight"] = torch.zeros(2)
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    assert "model.layers.1.self_attn.bogus.weight: unexpected" in msg
    assert f"model.layers.{L}.mlp.experts.0.extra_proj.weight: unexpected" in msg
    assert "mtp.0.mlp.experts.0.extra_proj.weight:" not in msg


def test_wrong_shape(tmp_path, cfg, disk, sd):
    d = dict(disk)
    d["model.layers.1.self_attn.q_a_proj.weight"] = torch.zeros(47, cfg.hidden_size)
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    D = cfg.hidden_size
    assert f"model.layers.1.self_attn.q_a_proj.weight: shape [47, {D}], expected [48, {D}]" in msg


def test_wrong_dtype_int_where_float_expected(tmp_path, cfg, disk, sd):
    d = dict(disk)
    d["model.layers.0.input_layernorm.weight"] = torch.zeros(cfg.hidden_size, dtype=torch.int32)
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    assert "model.layers.0.input_layernorm.weight: wrong dtype torch.int32" in msg


def test_missing_and_extra_expert_index(tmp_path, cfg, disk, sd):
    E = cfg.n_routed_experts
    d = {k: v for k, v in disk.items() if k != "model.layers.2.mlp.experts.5.up_proj.weight"}
    d[f"model.layers.3.mlp.experts.{E}.down_proj.weight"] = disk["model.layers.3.mlp.experts.0.down_proj.weight"]
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    assert "model.layers.2.mlp.experts.5.up_proj.weight: missing (expert 5 of 8" in msg
    assert f"model.layers.3.mlp.experts.{E}.down_proj.weight: unexpected expert index {E}" in msg


def test_per_expert_shape_named_before_stacking(tmp_path, cfg, disk, sd):
    d = dict(disk)
    k = f"model.layers.{cfg.num_hidden_layers}.mlp.experts.6.down_proj.weight"
    d[k] = torch.zeros(cfg.hidden_size, cfg.moe_intermediate_size + 1)
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    assert f"{k}: shape [64, 33], expected [64, 32] (for mtp.0.mlp.experts.down_proj)" in msg


def test_fp8_weight_without_scale(tmp_path, cfg, disk, sd):
    d = dict(disk)
    k = "model.layers.1.mlp.experts.2.gate_proj.weight"
    d[k] = d[k].to(torch.float8_e4m3fn)
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    assert f"{k}: torch.float8_e4m3fn weight without its {k}_scale_inv" in msg


def test_scale_without_weight(tmp_path, cfg, disk, sd):
    d = dict(disk)
    d["model.layers.1.self_attn.q_zz.weight_scale_inv"] = torch.ones(1, 1)
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    assert "model.layers.1.self_attn.q_zz.weight_scale_inv: scale without its weight" in msg


def test_all_offenders_listed_in_one_error(tmp_path, cfg, disk, sd):
    drop = ("model.norm.weight", "model.layers.1.mlp.experts.0.gate_proj.weight")
    d = {k: v for k, v in disk.items() if k not in drop}
    d["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(3, 3)
    d["model.layers.2.self_attn.kv_a_layernorm.weight"] = torch.zeros(cfg.kv_lora_rank, dtype=torch.int64)
    d["junk"] = torch.zeros(1)
    msg = load_err(write_disk(tmp_path / "c", cfg, d), cfg, sd)
    offenders = [
        "model.norm.weight", "model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.2.self_attn.kv_a_layernorm.weight", "junk",
    ]
    lines = msg.splitlines()[1:]
    assert len(lines) == len(offenders)
    for name in offenders:
        assert sum(line.startswith(name + ":") for line in lines) == 1, name


# --------------------------------------------------------------------------- broken files


def test_truncated_shard(tmp_path, cfg, sd):
    path = tmp_path / "ckpt"
    save_state_dict(str(path), cfg, sd, max_shard_bytes=256 * 1024)
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    size = os.path.getsize(path / shard)
    with open(path / shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=shard) as ei:
        CheckpointReader(str(path))
    assert "truncated" in str(ei.value)
    with open(path / shard, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match=f"{shard}: truncated"):
        load_state_dict(str(path), cfg, expected_of(sd))


def test_corrupt_header(tmp_path, cfg, disk):
    p = write_disk(tmp_path / "c", cfg, disk)
    f = os.path.join(p, "model.safetensors")
    with open(f, "r+b") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        fh.seek(8)
        fh.write(b"\xff{not json" + b" " * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt header"):
        CheckpointReader(p)
    with open(f, "r+b") as fh:  # a header length beyond the file
        fh.write(struct.pack("<Q", n + 10**9))
    with pytest.raises(CheckpointError, match="model.safetensors: truncated or not a safetensors file"):
        CheckpointReader(p)


def test_data_offsets_inconsistent_with_shape(tmp_path, cfg):
    p = tmp_path / "c"
    os.makedirs(p)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    (p / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'w': data_offsets span 12 bytes"):
        CheckpointReader(str(p))


def _sharded(tmp_path, cfg, sd):
    path = tmp_path / "ckpt"
    save_state_dict(str(path), cfg, sd, max_shard_bytes=256 * 1024)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, index


def test_index_points_at_missing_shard(tmp_path, cfg, sd):
    path, index = _sharded(tmp_path, cfg, sd)
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(path / shard)
    with pytest.raises(CheckpointError, match=f"{shard}: shard listed in model.safetensors.index.json is missing"):
        load_state_dict(str(path), cfg, expected_of(sd))


def test_duplicate_tensor_across_shards_and_wrong_index_entry(tmp_path, cfg, sd):
    path, index = _sharded(tmp_path, cfg, sd)
    shards = sorted(set(index["weight_map"].values()))
    r = CheckpointReader(str(path / shards[1]))
    held = {k: r.get(k) for k in r.keys()}
    held["model.norm.weight"] = sd["model.norm.weight"]  # also in another shard
    save_file(held, str(path / shards[1]))
    wm = index["weight_map"]
    moved = next(k for k, v in wm.items() if v == shards[0])
    wm[moved] = shards[-1]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(str(path))
    msg = str(ei.value)
    assert "model.norm.weight: duplicate tensor" in msg and shards[1] in msg
    assert f"{moved}: model.safetensors.index.json maps it to {shards[-1]}, which does not hold it" in msg


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "glm_moe_dsa"}')
    assert read_config(str(tmp_path)) == {"model_type": "glm_moe_dsa"}


# --------------------------------------------------------------------------- MTP presence


def test_detect_mtp(cfg, disk):
    L = cfg.num_hidden_layers
    keys = set(disk)
    assert names.detect_mtp(keys, cfg) == "present" and names.missing_mtp_keys(keys, cfg) == []
    assert names.optional_mtp_keys(keys, cfg) == {
        f"model.layers.{L}.embed_tokens.weight": True, f"model.layers.{L}.shared_head.head.weight": True,
    }
    trunk = {k for k in keys if not k.startswith(f"model.layers.{L}.")}
    assert names.detect_mtp(trunk, cfg) == "absent"
    gone = {f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.mlp.experts.3.up_proj.weight"}
    partial = keys - gone
    assert names.detect_mtp(partial, cfg) == "partial"
    assert sorted(names.missing_mtp_keys(partial, cfg)) == sorted(gone)
    no_head = keys - {f"model.layers.{L}.shared_head.head.weight", f"model.layers.{L}.embed_tokens.weight"}
    assert names.detect_mtp(no_head, cfg) == "present"
    assert not any(names.optional_mtp_keys(no_head, cfg).values())


# --------------------------------------------------------------------------- atomic save


def test_failed_save_leaves_nothing_and_keeps_previous(tmp_path, cfg, sd, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    fresh = tmp_path / "fresh" / "nested" / "ckpt"
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(str(fresh), cfg, sd, max_shard_bytes=256 * 1024)
    assert len(calls) == 2 and ".tmp-" in calls[0]
    assert os.listdir(tmp_path) == []  # no temp dir, no partial checkpoint, no parents created for it

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    prev = tmp_path / "ckpt"
    save_state_dict(str(prev), cfg, sd)
    before = {f: (prev / f).read_bytes() for f in os.listdir(prev)}
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(str(prev), cfg, make_state_dict(cfg, seed=9), max_shard_bytes=256 * 1024)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert {f: (prev / f).read_bytes() for f in os.listdir(prev)} == before

    monkeypatch.setattr(safetensors.torch, "save_file", real)  # a successful save replaces it
    sd2 = make_state_dict(cfg, seed=9)
    save_state_dict(str(prev), cfg, sd2)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert_bytes_equal(load_state_dict(str(prev), cfg, expected_of(sd2)), sd2)


def test_unsavable_tensor_fails_before_writing(tmp_path, cfg, sd):
    bad = dict(sd)
    bad["model.norm.weight"] = torch.empty(cfg.hidden_size, device="meta")
    bad["model.layers.1.mlp.experts.down_proj"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as ei:
        save_state_dict(str(tmp_path / "ckpt"), cfg, bad)
    assert "model.norm.weight: is on the meta device" in str(ei.value)
    assert "model.layers.1.mlp.experts.down_proj: shape [3, 3]" in str(ei.value)
    assert os.listdir(tmp_path) == []
