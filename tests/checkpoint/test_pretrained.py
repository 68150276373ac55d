"""Model-level checkpoint tests: HF ↔ dsalite round trips, MTP on disk, FP8 with ragged blocks, `convert`, mismatches.

Checkpoints are built and saved by transformers itself (tests/hf_fixtures.py) or exported by dsalite; the FP8
checkpoints are written by hand here and every dequantised weight is checked against a reference written in this
file (not quant.py's code), bit for bit.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsalite import cli
from dsalite.checkpoint import quant
from dsalite.checkpoint.convert import convert
from dsalite.checkpoint.io import INDEX_NAME, CheckpointError, read_config
from dsalite.checkpoint.pretrained import from_pretrained
from dsalite.config import ModelConfig
from dsalite.model import Transformer
from dsalite.presets import PRESETS
from hf_fixtures import DSA, build_hf, make_checkpoint

# --------------------------------------------------------------------------- helpers


def disk_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in a directory, read with safetensors itself."""
    out = {}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    assert files, f"no safetensors files in {path}"
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = h.get_tensor(k)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def assert_same_bytes(ours: dict, theirs: dict, skip=()) -> None:
    assert ours.keys() == theirs.keys(), (sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys()))
    bad = [k for k in theirs if k not in skip and not same_bytes(ours[k], theirs[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


def edited_copy(src: str, dst, **config_changes) -> str:
    shutil.copytree(src, dst)
    p = os.path.join(dst, "config.json")
    with open(p) as f:
        c = json.load(f)
    c.update(config_changes)
    with open(p, "w") as f:
        json.dump(c, f)
    return str(dst)


def rewrite_single(path: str, tensors: dict) -> None:
    """Replace a single-file checkpoint's tensors."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))


def hf_load(path):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)


# --------------------------------------------------------------------------- HF -> dsalite -> HF


@pytest.fixture(scope="module")
def hf_ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    out = {case: make_checkpoint(base, case) for case in ("glm52_schedule", "v32_groups", "v3")}
    out["glm52_schedule_bf16"] = make_checkpoint(base / "bf16", "glm52_schedule", dtype=torch.bfloat16)
    return out


@pytest.mark.parametrize("case", ["glm52_schedule", "v32_groups", "v3"])
def test_hf_dsalite_hf_is_byte_identical(hf_ckpts, tmp_path, case):
    src = hf_ckpts[case]
    model = from_pretrained(src, dtype=None)
    model.save_pretrained(tmp_path / "out")
    theirs, ours = disk_tensors(src), disk_tensors(str(tmp_path / "out"))
    assert any(".experts.0.gate_proj.weight" in k for k in theirs)  # per-expert on disk, fused in memory
    assert_same_bytes(ours, theirs)


def test_hf_dsalite_hf_bf16_keeps_values_and_dtypes(hf_ckpts, tmp_path):
    src = hf_ckpts["glm52_schedule_bf16"]
    model = from_pretrained(src, dtype=None)
    model.save_pretrained(tmp_path / "out")
    theirs, ours = disk_tensors(src), disk_tensors(str(tmp_path / "out"))
    assert {t.dtype for t in theirs.values()} == {torch.bfloat16}
    assert_same_bytes(ours, theirs)


def test_hf_dsalite_hf_bf16_router_bias_keeps_stored_dtype(hf_ckpts, tmp_path):
    src = hf_ckpts["glm52_schedule_bf16"]
    from_pretrained(src, dtype=None).save_pretrained(tmp_path / "out")
    theirs, ours = disk_tensors(src), disk_tensors(str(tmp_path / "out"))
    bias = [k for k in theirs if k.endswith("e_score_correction_bias")]
    assert all(same_bytes(ours[k], theirs[k]) for k in bias)


def test_transformers_checkpoint_without_mtp_loads_with_one_warning(hf_ckpts, caplog):
    src = hf_ckpts["v3"]
    assert read_config(src)["num_nextn_predict_layers"] == 1
    assert not any(k.startswith("model.layers.4.") for k in disk_tensors(src))
    with caplog.at_level(logging.WARNING, logger="dsalite"):
        model = from_pretrained(src)
    assert len(model.mtp) == 0
    warnings = [r for r in caplog.records if r.name == "dsalite" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "num_nextn_predict_layers=1" in warnings[0].getMessage()


# --------------------------------------------------------------------------- config / weights mismatch


@pytest.mark.parametrize(
    "changes, named",
    [
        # one layer fewer and no MTP: the last trunk layer's tensors are unexpected
        (dict(num_hidden_layers=3, num_nextn_predict_layers=0),
         ["model.layers.3.self_attn.q_a_proj.weight: unexpected", "model.layers.3.mlp.experts.7.down_proj.weight"]),
        # one layer fewer, MTP declared: layer 3 would be the MTP layer but holds a plain block
        (dict(num_hidden_layers=3), ["num_hidden_layers=3", "model.layers.3 holds a decoder block"]),
        # a different hidden size: every tensor with a hidden dimension is named, in one error
        (dict(hidden_size=48),
         ["model.embed_tokens.weight: shape [256, 64], expected [256, 48]", "lm_head.weight: shape [256, 64]",
          "model.layers.0.self_attn.q_a_proj.weight: shape [48, 64], expected [48, 48]"]),
    ],
    ids=["fewer_layers", "fewer_layers_mtp", "hidden_size"],
)
def test_config_weights_mismatch_names_the_tensors(hf_ckpts, tmp_path, changes, named):
    path = edited_copy(hf_ckpts["v3"], tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(path)
    msg = str(e.value)
    for n in named:
        assert n in msg, msg[:2000]


# --------------------------------------------------------------------------- dsalite export -> transformers


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    cfg = ModelConfig.from_hf(PRESETS["glm-5.2-tiny"])
    g = torch.Generator().manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.1, generator=g, router_bias_std=0.05)
    path = str(tmp_path_factory.mktemp("export") / "glm52-tiny")
    model.save_pretrained(path)
    return model, path


def test_dsalite_export_loads_in_transformers(export):
    from dsalite.verify import compare

    model, path = export
    L = model.cfg.num_hidden_layers
    theirs, info = hf_load(path)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    del theirs
    rep = compare(path, batch=1, seed=2)
    assert rep.ok, rep.format()
    assert rep.max_abs <= 1e-4


def test_mtp_tensors_on_disk_and_back(export):
    model, path = export
    L = model.cfg.num_hidden_layers
    assert len(model.mtp) == 1
    disk = disk_tensors(path)
    mtp = model.mtp[0]
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "self_attn.kv_a_proj_with_mqa.weight", "mlp.shared_experts.down_proj.weight"):
        assert same_bytes(disk[f"model.layers.{L}.{name}"], mtp.get_parameter(name).detach()), name
    assert same_bytes(disk[f"model.layers.{L}.mlp.experts.3.up_proj.weight"],
                      mtp.mlp.experts.gate_up_proj[3, model.cfg.moe_intermediate_size:].detach())
    loaded = from_pretrained(path, dtype=None)
    assert len(loaded.mtp) == 1
    a, b = loaded.mtp[0].state_dict(), mtp.state_dict()
    assert a.keys() == b.keys()
    assert all(same_bytes(a[k], b[k]) for k in a)


def test_partial_mtp_names_the_missing_tensor(export, tmp_path):
    model, path = export
    L = model.cfg.num_hidden_layers
    broken = shutil.copytree(path, tmp_path / "partial")
    tensors = disk_tensors(str(broken))
    gone = f"model.layers.{L}.hnorm.weight"
    del tensors[gone]
    rewrite_single(str(broken), tensors)
    with pytest.raises(CheckpointError, match=re.escape(gone)) as e:
        from_pretrained(str(broken))
    assert "partly present" in str(e.value)
    assert f"model.layers.{L}.enorm.weight" not in str(e.value)  # only what is really missing


# --------------------------------------------------------------------------- FP8 with ragged blocks

RAGGED = dict(DSA, hidden_size=160, kv_lora_rank=128, q_lora_rank=144)  # kv_a_proj_with_mqa: [136, 160]
QCFG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
SCALE_FORMATS = {
    "float32": dict(scale_fmt="float"),
    "e8m0_uint8": dict(scale_fmt="ue8m0", e8m0_dtype=torch.uint8),
    "e8m0_float8": dict(scale_fmt="ue8m0", e8m0_dtype=torch.float8_e8m0fnu),
}
_QUANTISED = re.compile(r"\.(self_attn\.(?!indexer\.weights_proj)\S*_proj(_with_mqa)?|self_attn\.indexer\.(wq_b|wk)"
                        r"|mlp\.\S*_proj)\.weight$")
KV_A = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"


def ref_dequant(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The textbook definition: every element times its 128×128 block's scale (last blocks ragged)."""
    rows, cols = w8.shape
    if scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        code = scale.view(torch.uint8).to(torch.int64)
        s = torch.pow(torch.tensor(2.0, dtype=torch.float64), (code - 127).to(torch.float64)).to(torch.float32)
    else:
        assert scale.dtype == torch.float32
        s = scale
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    return w8.float() * full


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """One HF glm_moe_dsa model; per scale format an FP8 checkpoint of it and the reference dequantised tensors."""
    base = tmp_path_factory.mktemp("fp8")
    model = build_hf("glm_moe_dsa", seed=3, **RAGGED)
    plain = str(base / "plain")
    model.save_pretrained(plain)
    disk = disk_tensors(plain)
    assert tuple(disk[KV_A].shape) == (136, 160)
    with open(os.path.join(plain, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = QCFG
    # every block at its own power-of-two magnitude, so a wrong block size or grid mapping cannot go unnoticed
    gains = {}
    out = {}
    for fmt, kw in SCALE_FORMATS.items():
        path = base / fmt
        os.makedirs(path)
        tensors, ref = {}, {}
        for k, t in disk.items():
            if not _QUANTISED.search(k):
                tensors[k] = t
                continue
            assert t.dim() == 2 and t.dtype == torch.float32, k
            if k not in gains:
                r, c = torch.arange(t.shape[0]) // 128, torch.arange(t.shape[1]) // 128
                gains[k] = torch.pow(16.0, (r[:, None] + 2 * c[None, :]).float())  # 16× apart: beats amax noise
            w8, s = quant.quantize_fp8_block(t * gains[k], **kw)
            assert w8.dtype == torch.float8_e4m3fn
            assert s.dtype == (torch.float32 if fmt == "float32" else kw["e8m0_dtype"]), k
            tensors[k], tensors[k + "_scale_inv"] = w8, s
            ref[k] = ref_dequant(w8, s)
        save_file(tensors, str(path / "model.safetensors"))
        with open(path / "config.json", "w") as f:
            json.dump(config, f)
        shutil.copy(os.path.join(plain, "generation_config.json"), path)
        out[fmt] = (str(path), ref)
    return model, disk, out


def test_fp8_fixture_is_ragged_and_discriminating(fp8):
    _, disk, out = fp8
    path, ref = out["float32"]
    stored = disk_tensors(path)
    assert tuple(stored[KV_A + "_scale_inv"].shape) == (2, 2)
    assert len(ref) > 60  # attention, dense MLP, shared experts, every expert, indexer wq_b / wk
    assert KV_A in ref and "model.layers.1.mlp.experts.7.down_proj.weight" in ref
    assert "model.layers.0.self_attn.indexer.weights_proj.weight" not in ref
    assert "model.layers.1.mlp.gate.weight" not in ref
    # transformers-style block derivation (rows // scale_rows) gives another answer on this weight
    w8, s = stored[KV_A], stored[KV_A + "_scale_inv"]
    wrong = w8.float() * s.repeat_interleave(68, 0).repeat_interleave(80, 1)
    assert not torch.equal(wrong, ref[KV_A])
    for fmt in ("e8m0_uint8", "e8m0_float8"):
        s = disk_tensors(out[fmt][0])[KV_A + "_scale_inv"].view(torch.uint8).to(torch.int64)
        assert len(set(s.flatten().tolist())) == 4, s  # four blocks, four distinct exponents


def dsalite_view(sd: dict, disk_name: str, moe_inter: int) -> torch.Tensor:
    """The slice of a dsalite state dict that a disk tensor becomes (per-expert -> fused)."""
    m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", disk_name)
    if not m:
        return sd[disk_name]
    stem, e, part = m.group(1), int(m.group(2)), m.group(3)
    if part == "down_proj":
        return sd[stem + ".down_proj"][e]
    fused = sd[stem + ".gate_up_proj"][e]
    return fused[:moe_inter] if part == "gate_proj" else fused[moe_inter:]


def bits(t: torch.Tensor) -> torch.Tensor:
    assert t.dtype == torch.float32
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("fmt", sorted(SCALE_FORMATS))
def test_fp8_load_is_bit_exact_and_logits_match_hf(fp8, fmt):
    hf_model, disk, out = fp8
    path, ref = out[fmt]
    model = from_pretrained(path, dtype=torch.float32)
    sd = model.state_dict()
    inter = model.cfg.moe_intermediate_size
    for k, t in disk.items():
        ours = dsalite_view(sd, k, inter)
        want = ref.get(k, t)
        assert torch.equal(bits(ours), bits(want)), k

    # the HF model with exactly the reference weights
    fused = {}
    for k, t in hf_model.state_dict().items():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", k)
        if not m:
            fused[k] = ref.get(k, disk.get(k))
            continue
        parts = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
        fused[k] = torch.stack([
            torch.cat([ref[f"{m.group(1)}.{e}.{p}.weight"] for p in parts]) for e in range(t.shape[0])
        ])
        assert fused[k].shape == t.shape
    theirs = copy.deepcopy(hf_model)
    theirs.load_state_dict(fused, strict=True)
    ids = torch.randint(0, 256, (2, 3 * RAGGED["index_topk"] + 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = model(ids).logits
        b = theirs(ids).logits
        plain = hf_model(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert (plain - b).abs().max().item() > 1e-3  # quantisation changed the model: the check above is not vacuous


# --------------------------------------------------------------------------- convert


def test_convert_fp32_dequantises_and_transformers_loads_it(fp8, tmp_path, capsys):
    _, disk, out = fp8
    src, ref = out["e8m0_float8"]
    src = str(shutil.copytree(src, tmp_path / "src"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        f.write('{"model_max_length": 4096}\n')
    with open(os.path.join(src, "configuration_remote.py"), "w") as f:  # remote code named by auto_map
        f.write("# remote code\n")
    dst = str(tmp_path / "converted")
    assert cli.main(["convert", src, dst, "--dtype", "fp32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(dst)) == ["config.json", "configuration_remote.py", "generation_config.json",
                                       "model.safetensors", "tokenizer_config.json"]
    for f in ("generation_config.json", "tokenizer_config.json", "configuration_remote.py"):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "rb") as b:
            assert a.read() == b.read(), f
    cfg_src, cfg_dst = read_config(src), read_config(dst)
    assert "quantization_config" not in cfg_dst
    assert cfg_dst.pop("dtype") == "float32"
    cfg_src.pop("quantization_config"), cfg_src.pop("dtype")
    assert cfg_dst == cfg_src

    conv = disk_tensors(dst)
    assert not [k for k in conv if k.endswith("_scale_inv")]
    assert conv.keys() == disk.keys()
    for k, t in conv.items():
        assert torch.equal(bits(t), bits(ref.get(k, disk[k]))), k

    theirs, info = hf_load(dst)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert torch.equal(theirs.state_dict()[KV_A], ref[KV_A])
    # dsalite reads the converted checkpoint exactly as it reads the FP8 one
    a, b = from_pretrained(dst).state_dict(), from_pretrained(src).state_dict()
    assert all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


def test_convert_bf16_sharded(fp8, tmp_path):
    _, disk, out = fp8
    src, ref = out["float32"]
    dst = str(tmp_path / "bf16")
    limit_gb = 0.0002  # ~210 KB: the ~2 MB model needs many shards
    assert cli.main(["convert", src, dst, "--dtype", "bf16", "--max-shard-gb", str(limit_gb)]) == 0
    files = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))
    assert len(files) > 3 and "model.safetensors" not in files
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files), files
    with open(os.path.join(dst, INDEX_NAME)) as f:
        index = json.load(f)
    total = 0
    for fname in files:
        with safe_open(os.path.join(dst, fname), framework="pt") as h:
            held = list(h.keys())
            nbytes = sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in held)
        assert held and all(index["weight_map"][k] == fname for k in held)
        assert nbytes <= limit_gb * 2**30 or len(held) == 1, (fname, nbytes)
        total += nbytes
    assert index["metadata"]["total_size"] == total
    conv = disk_tensors(dst)
    assert conv.keys() == disk.keys() == index["weight_map"].keys()
    assert read_config(dst)["dtype"] == "bfloat16"
    for k, t in conv.items():
        want = ref.get(k, disk[k])
        want = want if k.endswith("e_score_correction_bias") else want.to(torch.bfloat16)
        assert same_bytes(t, want), k
    assert conv["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert conv["model.norm.weight"].dtype == torch.bfloat16
    model = from_pretrained(dst, dtype=None)
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_convert_plain_checkpoint_keeps_mtp(export, tmp_path):
    model, path = export
    L = model.cfg.num_hidden_layers
    dst = str(tmp_path / "plain")
    convert(path, dst, dtype=torch.float32)
    src, conv = disk_tensors(path), disk_tensors(dst)
    assert f"model.layers.{L}.enorm.weight" in conv and f"model.layers.{L}.mlp.experts.0.gate_proj.weight" in conv
    assert_same_bytes(conv, src)
    assert len(from_pretrained(dst).mtp) == 1


def _leftovers(parent) -> list[str]:
    return [f for f in os.listdir(parent) if ".tmp-" in f or ".old-" in f]


def test_convert_validates_before_writing(fp8, tmp_path, capsys):
    _, _, out = fp8
    src = out["float32"][0]
    tensors = disk_tensors(src)
    # a scale on the wrong grid
    bad = shutil.copytree(src, tmp_path / "grid")
    t = dict(tensors)
    t[KV_A + "_scale_inv"] = t[KV_A + "_scale_inv"][:1].clone()
    rewrite_single(str(bad), t)
    dst = tmp_path / "out" / "converted"
    assert cli.main(["convert", str(bad), str(dst)]) == 2
    err = capsys.readouterr().err
    assert KV_A + "_scale_inv" in err and "(1, 2)" in err and "(2, 2)" in err, err
    assert not os.path.exists(dst) and not os.path.exists(dst.parent)
    # an FP8 weight without its scale and a scale without its weight: both named in one error
    bad = shutil.copytree(src, tmp_path / "pairs")
    t = dict(tensors)
    lone_weight = "model.layers.2.self_attn.o_proj.weight"
    lone_scale = "model.layers.3.mlp.experts.5.up_proj.weight"
    del t[lone_weight + "_scale_inv"], t[lone_scale]
    rewrite_single(str(bad), t)
    with pytest.raises(CheckpointError) as e:
        convert(str(bad), str(tmp_path / "pairs_out"))
    assert lone_weight in str(e.value) and "without its" in str(e.value)
    assert lone_scale + "_scale_inv: scale without its weight" in str(e.value)
    assert not os.path.exists(tmp_path / "pairs_out") and not _leftovers(tmp_path)


def test_convert_failure_mid_write_leaves_dst_untouched(fp8, tmp_path, monkeypatch):
    import safetensors.torch

    _, _, out = fp8
    src = out["float32"][0]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    real, calls = safetensors.torch.save_file, []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="No space"):
        convert(src, str(dst), dtype=torch.float32, max_shard_bytes=200_000)
    assert len(calls) == 3 and all(os.path.dirname(c) != str(dst) for c in calls)
    assert not os.path.exists(os.path.dirname(calls[0]))  # the temporary directory is gone
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"
    assert not _leftovers(tmp_path)
    # and a successful run replaces dst as a whole
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    convert(src, str(dst), dtype=torch.float32)
    assert "keep.txt" not in os.listdir(dst) and "model.safetensors" in os.listdir(dst)
    assert not _leftovers(tmp_path)


def test_convert_refuses_to_overwrite_its_source(fp8, tmp_path):
    src = fp8[2]["float32"][0]
    with pytest.raises(CheckpointError, match="source"):
        convert(src, src)
    with pytest.raises(CheckpointError, match="source"):
        convert(src, os.path.dirname(src))
    assert "model.safetensors" in os.listdir(src)


def test_convert_fp4_and_integer_tensors(tmp_path):
    """Packed E2M1 + E8M0 per-32 scales dequantise (low nibble = even column); integer tensors are copied as is."""
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (4, 32), generator=g, dtype=torch.uint8)
    codes = torch.randint(120, 134, (4, 2), generator=g, dtype=torch.uint8)
    steps = torch.arange(12, dtype=torch.int64).view(3, 4)
    src = tmp_path / "fp4"
    src.mkdir()
    save_file({"w.weight": packed.view(torch.int8), "w.weight_scale_inv": codes, "steps": steps},
              str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "deepseek_v3"}')
    convert(str(src), str(tmp_path / "out"), dtype=torch.float32)
    conv = disk_tensors(str(tmp_path / "out"))
    assert conv.keys() == {"w.weight", "steps"} and same_bytes(conv["steps"], steps)
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    want = torch.empty(4, 64, dtype=torch.float32)
    for r in range(4):
        for c in range(64):
            byte = int(packed[r, c // 2])
            nib = byte & 0xF if c % 2 == 0 else byte >> 4
            v = (-1.0 if nib & 8 else 1.0) * mags[nib & 7]
            want[r, c] = v * 2.0 ** (int(codes[r, c // 32]) - 127)
    assert torch.equal(bits(conv["w.weight"]), bits(want))


def test_convert_reads_the_block_size_from_the_config(tmp_path):
    w = torch.randn(100, 72, generator=torch.Generator().manual_seed(1))
    w8, s = quant.quantize_fp8_block(w, block=(64, 32))
    assert s.shape == (2, 3)
    src = tmp_path / "b64"
    src.mkdir()
    save_file({"x.weight": w8, "x.weight_scale_inv": s}, str(src / "model.safetensors"))
    qc = dict(QCFG, weight_block_size=[64, 32])
    (src / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": qc}))
    convert(str(src), str(tmp_path / "out"), dtype=torch.float32)
    want = w8.float() * s.repeat_interleave(64, 0).repeat_interleave(32, 1)[:100, :72]
    assert torch.equal(bits(disk_tensors(str(tmp_path / "out"))["x.weight"]), bits(want))
    assert "quantization_config" not in read_config(str(tmp_path / "out"))
    qc["weight_block_size"] = [128, 128]  # the same tensors under the default block: the grid no longer fits
    (src / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": qc}))
    with pytest.raises(CheckpointError, match=r"x\.weight_scale_inv"):
        convert(str(src), str(tmp_path / "out2"))
    assert not os.path.exists(tmp_path / "out2")
