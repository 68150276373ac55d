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
from gguf_fixtures import SPECIAL, make_checkpoint, make_tokenizer  # noqa: E402

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
    sd_src, sd_back = src.state_dict(), back.state_dict()
    assert sd_src.keys() == sd_back.keys()
    bad = [k for k in sd_src if not torch.equal(sd_src[k], sd_back[k])]
    assert not bad, f"tensors changed by the round trip: {bad[:5]}"
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
    v4 = tmp_path / "v4"
    v4.mkdir()
    (v4 / "config.json").write_text('{"model_type": "deepseek_v4"}')
    with pytest.raises(G.GGUFError, match="'deepseek4'.*not supported yet"):
        G.export_checkpoint(str(v4), tmp_path / "x.gguf", "f32")
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
