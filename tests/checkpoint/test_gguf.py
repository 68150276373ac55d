"""GGUF export → import: exact F32 round trips (MTP included), quantised types against an independent rounding
reference, metadata and tokenizer read back with the gguf package, bad input, atomic writes, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")

import dsalite  # noqa: E402
from dsalite.checkpoint import gguf as G  # noqa: E402
from dsalite.checkpoint import quant  # noqa: E402
from dsalite.checkpoint.pretrained import from_pretrained  # noqa: E402
from gguf_fixtures import SPECIAL, V4_ORIGINAL, make_checkpoint, make_tokenizer, make_v4_checkpoint  # noqa: E402

ARCHS = {"glm_moe_dsa": "glm-dsa", "deepseek_v32": "deepseek32", "deepseek_v3": "deepseek2"}
GLM52 = dict(num_hidden_layers=6, index_topk_freq=2, index_skip_topk_offset=3)  # full and shared indexer layers


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_src")
    return {mt: make_checkpoint(root / mt, mt, **(GLM52 if mt == "glm_moe_dsa" else {})) for mt in ARCHS}


def logits_and_mtp(model, ids):
    with torch.no_grad():
        out = model(ids)
        return out.logits, model.mtp_forward(out.last_hidden, torch.roll(ids, -1, dims=1))


def assert_same_weights(src, back):
    """Every tensor of src's state dict, bit for bit, and nothing else."""
    sd_src, sd_back = src.state_dict(), back.state_dict()
    assert sd_src.keys() == sd_back.keys()
    bad = [k for k in sd_src if not torch.equal(sd_src[k], sd_back[k])]
    assert not bad, f"tensors changed by the round trip: {bad[:5]}"


def read(path):
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("mt", sorted(ARCHS))
def test_f32_round_trip_is_exact_mtp_included(ckpts, tmp_path, mt):
    out = tmp_path / "m.gguf"
    info = G.export_checkpoint(ckpts[mt], out, "f32")
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary left behind
    src = from_pretrained(ckpts[mt])
    back = dsalite.from_pretrained(str(out))
    assert back.cfg.num_nextn_predict_layers == 1 and back.cfg.indexer_types == src.cfg.indexer_types
    assert_same_weights(src, back)
    ids = torch.randint(0, src.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    (a, a_mtp), (b, b_mtp) = logits_and_mtp(src, ids), logits_and_mtp(back, ids)
    assert (a - b).abs().max() <= 1e-5
    assert len(a_mtp) == len(b_mtp) == 1 and (a_mtp[0] - b_mtp[0]).abs().max() <= 1e-5
    _, tensors = read(out)
    assert info["tensors"] == len(tensors) and {t.tensor_type.name for t in tensors.values()} == {"F32"}
    assert any(n.startswith("blk.4.nextn.") or n.startswith("blk.6.nextn.") for n in tensors)


def expected_type(name: str, shape: tuple, dtype: str) -> str:
    """llama.cpp converter's rule, restated: 1-D, norms, biases, router and indexer head weights stay F32."""
    if len(shape) == 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight", "indexer.proj.weight")) \
            or not name.endswith(".weight"):
        return "F32"
    if dtype == "q8_0":
        return "Q8_0" if shape[-1] % 32 == 0 else "F16"
    return dtype.upper()


def reference_round(t: torch.Tensor, kind: str) -> torch.Tensor:
    """F16 / BF16 casts; Q8_0 as ggml defines it: blocks of 32, d = max|x|/127 kept as fp16, q = roundf(x/d)
    (C roundf: halves away from zero, not to even)."""
    if kind == "F32":
        return t
    if kind == "F16":
        return t.half().float()
    if kind == "BF16":
        return t.bfloat16().float()
    x = t.reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    y = x * torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return (q * d.half().float()).reshape(t.shape)


def gguf_name_types(path) -> dict[str, str]:
    _, tensors = read(path)
    return {n: t.tensor_type.name for n, t in tensors.items()}


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_quantised_export_matches_an_independent_rounding(ckpts, tmp_path, dtype):
    path = ckpts["glm_moe_dsa"]
    out = tmp_path / f"m-{dtype}.gguf"
    G.export_checkpoint(path, out, dtype)
    md, tensors = read(out)
    assert md["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    for n, t in tensors.items():
        shape = tuple(int(s) for s in reversed(t.shape))  # ggml order -> torch order
        assert t.tensor_type.name == expected_type(n, shape, dtype), n
    kinds = {t.tensor_type.name for t in tensors.values()}
    assert {"F32", dtype.upper()} <= kinds

    src = from_pretrained(path)
    back = G.load(str(out))
    # the GGML type each stored tensor got, looked up by the dsalite tensor (and part) it came from
    kind = {}
    for n, t in tensors.items():
        name, part = G._dsalite_name(n, src.cfg.num_hidden_layers)
        kind[name, part] = t.tensor_type.name
    H, nope = src.cfg.num_attention_heads, src.cfg.qk_nope_head_dim
    ref = {}
    for name, t in src.state_dict().items():
        t = t.float()
        if name.endswith("kv_b_proj.weight"):  # per head: nope rows -> attn_k_b (transposed), value rows -> attn_v_b
            w = t.view(H, -1, t.shape[-1])
            k = reference_round(w[:, :nope].transpose(1, 2).contiguous(), kind[name, 0]).transpose(1, 2)
            ref[name] = torch.cat([k, reference_round(w[:, nope:].contiguous(), kind[name, 1])], 1).reshape(t.shape)
        elif name.endswith("gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            ref[name] = torch.cat([reference_round(gate.contiguous(), kind[name, 0]),
                                   reference_round(up.contiguous(), kind[name, 1])], dim=1)
        else:
            ref[name] = reference_round(t, kind[name, None])
    got = back.state_dict()
    bad = [k for k in ref if not torch.equal(ref[k], got[k].float())]
    assert not bad, f"{len(bad)} tensors differ from the reference rounding, e.g. {bad[:4]}"
    # and the imported model computes what the source computes with those rounded weights
    src.load_state_dict(ref)
    ids = torch.randint(0, src.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    (a, a_mtp), (b, b_mtp) = logits_and_mtp(src, ids), logits_and_mtp(back, ids)
    assert (a - b).abs().max() <= 1e-5 and (a_mtp[0] - b_mtp[0]).abs().max() <= 1e-5


def test_metadata_and_tokenizer_read_back(ckpts):
    path = ckpts["glm_moe_dsa"]
    out = os.path.join(os.path.dirname(path), "meta.gguf")
    G.export_checkpoint(path, out, "f32")
    md, tensors = read(out)
    cfg = from_pretrained(path).cfg
    a = "glm-dsa"
    L = cfg.num_hidden_layers
    assert md["general.architecture"] == a and md["general.type"] == "model"
    assert md[f"{a}.block_count"] == L + 1 and md[f"{a}.nextn_predict_layers"] == 1
    assert md[f"{a}.attention.head_count_kv"] == 1
    assert md[f"{a}.attention.key_length"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert md[f"{a}.attention.value_length"] == cfg.kv_lora_rank
    assert md[f"{a}.attention.key_length_mla"] == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert md[f"{a}.attention.indexer.types"] == [t == "full" for t in cfg.indexer_types[:L]]
    assert False in md[f"{a}.attention.indexer.types"]  # the schedule has shared layers
    assert md[f"{a}.expert_gating_func"] == 2 and md[f"{a}.leading_dense_block_count"] == 1
    # the absorbed-MLA split: k_b [H, r, n], v_b [H, v, r] (ggml dims reversed)
    H, n, v, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    assert list(tensors["blk.0.attn_k_b.weight"].shape) == [n, r, H]
    assert list(tensors["blk.0.attn_v_b.weight"].shape) == [r, v, H]
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [cfg.hidden_size, cfg.moe_intermediate_size,
                                                                 cfg.n_routed_experts]
    shared = [i for i, t in enumerate(cfg.indexer_types[:L]) if t == "shared"]
    assert shared and f"blk.{shared[0]}.indexer.attn_k.weight" not in tensors
    assert "blk.0.indexer.k_norm.bias" in tensors and f"blk.{L}.nextn.eh_proj.weight" in tensors

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg.vocab_size == len(types)
    assert all(tokens[i] == t for t, i in vocab.items())
    assert all(types[i] == (3 if t in SPECIAL else 1) for t, i in vocab.items())  # specials are CONTROL
    assert all(types[i] == 5 and tokens[i] == f"[PAD{i}]" for i in range(len(vocab), cfg.vocab_size))
    assert len(md["tokenizer.ggml.merges"]) > 0 and md["tokenizer.ggml.pre"] == "gpt-2"
    assert md["tokenizer.ggml.bos_token_id"] == vocab["[gMASK]"]  # GLM pins bos/eot/unk/eom like llama.cpp
    assert md["tokenizer.ggml.eot_token_id"] == vocab["<|user|>"]
    assert md["tokenizer.ggml.eos_token_id"] == vocab["<|endoftext|>"]
    assert md["tokenizer.ggml.add_bos_token"] is True and "messages" in md["tokenizer.chat_template"]


def test_no_mtp_drops_the_nextn_block(ckpts, tmp_path):
    out = tmp_path / "trunk.gguf"
    G.export_checkpoint(ckpts["deepseek_v3"], out, "f32", mtp=False)
    md, tensors = read(out)
    assert md["deepseek2.block_count"] == 4 and "deepseek2.nextn_predict_layers" not in md
    assert not [n for n in tensors if n.startswith("blk.4.")]
    assert G.load(str(out)).cfg.num_nextn_predict_layers == 0


# --------------------------------------------------------------------------- what cannot be exported


@pytest.mark.parametrize("mt, overrides, reason", [
    ("glm_moe_dsa", dict(index_head_dim=16), "index_head_dim=16 is not a multiple of 64"),
    ("deepseek_v32", dict(attention_bias=True), "attention_bias"),
    ("glm_moe_dsa", dict(mlp_layer_types=["dense", "sparse", "dense", "sparse"]), "leading dense layers"),
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave=false"),
    ("deepseek_v3", dict(q_lora_rank=None), "q_lora_rank=null with num_hidden_layers=4"),
    ("glm_moe_dsa", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                          "original_max_position_embeddings": 64, "mscale": 1.0,
                                          "mscale_all_dim": 1.0}), "ignores rope.scaling.yarn_log_multiplier"),
    ("deepseek_v3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                          "original_max_position_embeddings": 64, "mscale": 1.0,
                                          "mscale_all_dim": 0.5}), "assumes mscale = mscale_all_dim"),
])
def test_unexportable_models_name_the_reason(tmp_path, mt, overrides, reason):
    path = make_checkpoint(tmp_path / "src", mt, **overrides)
    with pytest.raises(G.GGUFError, match="cannot export to GGUF") as e:
        G.export_checkpoint(path, tmp_path / "x.gguf", "f32")
    assert reason in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_bad_arguments(ckpts, tmp_path):
    with pytest.raises(G.GGUFError, match="dtype='q4_k' is not supported"):
        G.export_checkpoint(ckpts["deepseek_v3"], tmp_path / "x.gguf", "q4_k")
    with pytest.raises(G.GGUFError, match="is a directory"):
        G.export_checkpoint(ckpts["deepseek_v3"], tmp_path, "f32")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(G.GGUFError, match="tokenizer.json: not found"):
        G.export_checkpoint(ckpts["deepseek_v3"], tmp_path / "x.gguf", "f32", tokenizer=str(bare))
    small = tmp_path / "small_vocab"
    make_tokenizer(str(small), 400)
    with pytest.raises(G.GGUFError, match="outside the model's vocab_size=320"):
        G.export_checkpoint(ckpts["deepseek_v3"], tmp_path / "x.gguf", "f32", tokenizer=str(small))


def test_failed_export_keeps_the_old_file(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    calls = []

    def failing(a, q, real=gguf.quants.quantize):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(a, q)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError, match="disk full"):
        G.export_checkpoint(ckpts["deepseek_v3"], out, "f32")
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.gguf"]


def test_import_errors_name_the_problem(ckpts, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(G.GGUFError, match="not a readable GGUF"):
        G.load(str(junk))
    with pytest.raises(G.GGUFError, match="not found"):
        G.load(str(tmp_path / "missing.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(G.GGUFError, match="architecture 'llama' is not one dsalite imports"):
        G.load(str(tmp_path / "llama.gguf"))
    # a file whose tensors do not match its metadata: drop one tensor by rewriting without it
    full = tmp_path / "full.gguf"
    G.export_checkpoint(ckpts["deepseek_v3"], full, "f32")
    r = gguf.GGUFReader(str(full))
    w = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "deepseek2")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(k, f.contents())
        else:
            w.add_key_value(k, f.contents(), f.types[0])
    for t in r.tensors:
        if t.name != "blk.2.attn_v_b.weight":
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(G.GGUFError, match=r"model.layers.2.self_attn.kv_b_proj.weight: missing attn_v_b.weight"):
        G.load(str(tmp_path / "cut.gguf"))


def test_cli_export_gguf(ckpts, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dsalite.cli", "export-gguf"]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0
    for opt in ("--dtype", "--tokenizer", "--tokenizer-pre", "--no-mtp", "q8_0", "bf16"):
        assert opt in r.stdout
    out = tmp_path / "cli.gguf"
    r = subprocess.run([*cmd, ckpts["deepseek_v32"], str(out), "--dtype", "q8_0"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "Q8_0" in r.stdout and out.is_file()
    r = subprocess.run([*cmd, ckpts["deepseek_v32"], str(tmp_path / "y.gguf"), "--tokenizer", str(tmp_path)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "tokenizer.json: not found" in r.stderr


def test_fp8_checkpoint_exports_dequantised(ckpts, tmp_path):
    """An FP8 block-scaled (E8M0) checkpoint goes through the bridge's dequantisation on the way to GGUF."""
    src = ckpts["deepseek_v32"]
    fp8 = tmp_path / "fp8"
    shutil.copytree(src, fp8)
    tensors = load_file(str(fp8 / "model.safetensors"))
    n = 0
    for k in list(tensors):
        if k.endswith("_proj.weight") and tensors[k].dim() == 2 and "weights_proj" not in k:
            tensors[k], tensors[k + "_scale_inv"] = quant.quantize_fp8_block(tensors[k], scale_fmt="ue8m0")
            n += 1
    assert n > 20
    save_file(tensors, str(fp8 / "model.safetensors"))
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "fp8.gguf"
    G.export_checkpoint(str(fp8), out, "f32")
    want, got = from_pretrained(str(fp8)).state_dict(), G.load(str(out)).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(want["model.layers.0.self_attn.o_proj.weight"],
                           from_pretrained(src).state_dict()["model.layers.0.self_attn.o_proj.weight"])


# --------------------------------------------------------------------------- DeepSeek-V4 (deepseek4)


@pytest.fixture(scope="module")
def v4_ckpt(tmp_path_factory):
    return make_v4_checkpoint(tmp_path_factory.mktemp("gguf_v4") / "v4")


def v4_logits(model, ids):
    with torch.no_grad():
        out = model(ids)
        return out.logits, model.mtp_forward(out.streams, torch.roll(ids, -1, dims=1))[0]


def test_v4_f32_round_trip_is_exact_mtp_in_its_draft_file(v4_ckpt, tmp_path):
    out = tmp_path / "v4.gguf"
    info = G.export_checkpoint(v4_ckpt, out, "f32")
    assert sorted(os.listdir(tmp_path)) == ["mtp-v4.gguf", "v4.gguf"] and info["mtp"]["path"].endswith("mtp-v4.gguf")
    src = from_pretrained(v4_ckpt)
    back = dsalite.from_pretrained(str(out))  # picks up mtp-v4.gguf beside it
    assert back.cfg.num_nextn_predict_layers == 1 and back.cfg.layer_types == src.cfg.layer_types
    assert back.cfg.mlp_types == src.cfg.mlp_types and back.cfg.compress_rope == src.cfg.compress_rope
    assert_same_weights(src, back)
    # longer than the window, two HCA entries (ratio 128), many more CSA entries than index_topk
    ids = torch.randint(0, src.cfg.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    (a, a_mtp), (b, b_mtp) = v4_logits(src, ids), v4_logits(back, ids)
    assert (a - b).abs().max() <= 1e-5 and (a_mtp - b_mtp).abs().max() <= 1e-5
    # without the draft file: the trunk alone
    os.remove(info["mtp"]["path"])
    trunk = G.load(str(out))
    assert trunk.cfg.num_nextn_predict_layers == 0 and torch.equal(trunk(ids).logits, b)


def v4_expected_type(name: str, shape: tuple, dtype: str) -> str:
    """llama.cpp's rule (see expected_type) plus what DeepSeek-V4 keeps in fp32: mHC mixers and compressor position
    biases; the hash table is integers."""
    if name.endswith("ffn_gate_tid2eid.weight"):
        return "I32"
    if name.endswith(("hc_attn_fn.weight", "hc_ffn_fn.weight", "output_hc_fn.weight", "compressor_ape.weight")):
        return "F32"
    return expected_type(name, shape, dtype)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_v4_quantised_export_matches_an_independent_rounding(v4_ckpt, tmp_path, dtype):
    """Every tensor of both files equals the independent rounding of the F32 export (itself bit-exact to the source);
    the import dequantises through the mapping the F32 round trip checks."""
    G.export_checkpoint(v4_ckpt, tmp_path / "f32.gguf", "f32")
    G.export_checkpoint(v4_ckpt, tmp_path / "q.gguf", dtype)
    for name in ("f32.gguf", "mtp-f32.gguf"):
        md, exact = read(tmp_path / name)
        qmd, quant = read(tmp_path / name.replace("f32", "q"))
        assert qmd["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
        assert exact.keys() == quant.keys()
        kinds = set()
        for n, t in quant.items():
            shape = tuple(int(s) for s in reversed(t.shape))
            kind = v4_expected_type(n, shape, dtype)
            assert t.tensor_type.name == kind, n
            kinds.add(kind)
            if kind == "I32":
                assert np.array_equal(np.asarray(t.data), np.asarray(exact[n].data)), n
                continue
            want = reference_round(torch.from_numpy(np.array(exact[n].data, dtype=np.float32)), kind)
            got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            assert torch.equal(want, got.reshape(want.shape)), n
        assert {"F32", dtype.upper()} <= kinds
    # the imported model computes what the source model computes with those rounded weights
    back = G.load(str(tmp_path / "q.gguf"))
    src = from_pretrained(v4_ckpt)
    src.load_state_dict(back.state_dict())
    ids = torch.randint(0, back.cfg.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    (a, a_mtp), (b, b_mtp) = v4_logits(src, ids), v4_logits(back, ids)
    assert (a - b).abs().max() <= 1e-5 and (a_mtp - b_mtp).abs().max() <= 1e-5


def test_v4_metadata_and_draft_file(v4_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    G.export_checkpoint(v4_ckpt, out, "f32")
    md, tensors = read(out)
    dmd, draft = read(tmp_path / "mtp-m.gguf")
    cfg = from_pretrained(v4_ckpt).cfg
    a, L, D = "deepseek4", cfg.num_hidden_layers, cfg.hidden_size
    assert md["general.architecture"] == dmd["general.architecture"] == a
    assert md[f"{a}.block_count"] == L and f"{a}.nextn_predict_layers" not in md
    assert dmd[f"{a}.block_count"] == L + 1 and dmd[f"{a}.nextn_predict_layers"] == 1
    assert md[f"{a}.attention.compress_ratios"] == V4_ORIGINAL["compress_ratios"]  # MTP layer's entry included
    assert md[f"{a}.hash_layer_count"] == 2 and md[f"{a}.expert_gating_func"] == 4
    assert md[f"{a}.swiglu_clamp_exp"] == [10.0] * L and dmd[f"{a}.swiglu_clamp_shexp"] == [10.0] * (L + 1)
    assert md[f"{a}.hyper_connection.count"] == 4 and md[f"{a}.embedding_length_out"] == 4 * D
    assert md[f"{a}.rope.freq_base"] == 10000.0 and md[f"{a}.attention.compress_rope_freq_base"] == 160000.0
    assert md[f"{a}.rope.scaling.type"] == "yarn" and md[f"{a}.rope.scaling.factor"] == 16.0
    assert not [n for n in tensors if n.startswith(f"blk.{L}.")]
    assert tensors["blk.0.ffn_gate_tid2eid.weight"].tensor_type.name == "I32"
    assert "blk.0.exp_probs_b.bias" not in tensors  # hash layers route by table, without the selection bias
    assert "blk.2.ffn_gate_tid2eid.weight" not in tensors and "blk.2.exp_probs_b.bias" in tensors
    assert "blk.1.indexer_compressor_ape.weight" in tensors and "blk.2.indexer.proj.weight" not in tensors  # HCA
    # the draft file: shared embedding / final norm / head, the MTP block at blk.L, its own hc_head at the root
    src = from_pretrained(v4_ckpt).state_dict()

    def arr(t):
        return torch.from_numpy(np.array(t.data)).reshape(tuple(int(s) for s in reversed(t.shape)))

    assert not [n for n in draft if n.startswith("blk.") and not n.startswith(f"blk.{L}.")]
    assert torch.equal(arr(draft["output_hc_fn.weight"]), src["mtp.0.hc_head.hc_fn"])
    assert torch.equal(arr(draft["output.weight"]), src["lm_head.weight"])
    assert torch.equal(arr(draft[f"blk.{L}.nextn.shared_head_norm.weight"]), src["mtp.0.norm.weight"])
    assert torch.equal(arr(draft[f"blk.{L}.nextn.eh_proj.weight"]),
                       torch.cat([src["mtp.0.e_proj.weight"], src["mtp.0.h_proj.weight"]], dim=1))
    with pytest.raises(G.GGUFError, match="is an MTP draft file"):
        G.load(str(tmp_path / "mtp-m.gguf"))


def test_v4_no_mtp_writes_no_draft_file(v4_ckpt, tmp_path):
    G.export_checkpoint(v4_ckpt, tmp_path / "trunk.gguf", "f32", mtp=False)
    assert os.listdir(tmp_path) == ["trunk.gguf"]
    shutil.copy(tmp_path / "trunk.gguf", tmp_path / "mtp-trunk.gguf")  # a file in the draft's place that is not one
    with pytest.raises(G.GGUFError, match="mtp-trunk.gguf: not the deepseek4 MTP draft file"):
        G.load(str(tmp_path / "trunk.gguf"))


def test_cli_export_gguf_v4_names_both_files(v4_ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsalite.cli", "export-gguf", v4_ckpt, str(tmp_path / "v4.gguf"),
                        "--dtype", "bf16"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert "BF16" in r.stdout and f"wrote {tmp_path / 'mtp-v4.gguf'} (MTP draft" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["mtp-v4.gguf", "v4.gguf"]


@pytest.mark.parametrize("overrides, reason", [
    (dict(hc_mult=2), "hc_mult=2: llama.cpp's deepseek4 graph asserts 4 mHC streams"),
    (dict(compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
          compress_ratios=[0, 4, 8, 4, 0]), "compress_rates['heavily_compressed_attention']=8"),
    (dict(index_head_dim=32), "index_head_dim=32 is not a multiple of 64"),
    (dict(mlp_layer_types=["moe", "hash_moe", "moe", "moe"]), "hash-routes the first hash_layer_count layers"),
    (dict(rope_parameters={"main": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                    "original_max_position_embeddings": 64},
                           "compress": {"rope_type": "default", "rope_theta": 1.6e5}}),
     "rotates sliding-window layers with plain rope"),
    (dict(tie_word_embeddings=True), "needs its own output.weight"),
])
def test_v4_unexportable_configs_name_the_reason(overrides, reason):
    cfg = dsalite.ModelConfig.from_hf(dict(V4_ORIGINAL, **overrides))
    with pytest.raises(G.GGUFError, match="cannot export to GGUF") as e:
        G.check_exportable(cfg, "f32")
    assert reason in str(e.value)


def test_v4_mtp_layer_llamacpp_cannot_run_is_refused(tmp_path):
    """llama.cpp's deepseek4 MTP graph has sliding-window attention only; the trunk still exports without it."""
    path = make_v4_checkpoint(tmp_path / "src", compress_ratios=[0, 4, 128, 4, 4])
    with pytest.raises(G.GGUFError, match="MTP layer type 'compressed_sparse_attention'.*--no-mtp"):
        G.export_checkpoint(path, tmp_path / "x.gguf", "f32")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    G.export_checkpoint(path, tmp_path / "x.gguf", "f32", mtp=False)
    assert G.load(str(tmp_path / "x.gguf")).cfg.num_nextn_predict_layers == 0
