"""Interop with the real engine: GGUFs dsalite exports, run by llama.cpp (llama-cpp-python 0.3.36 built from sdist).

llama.cpp's logits on a prompt 3-4× longer than index_topk (so DSA selection drops keys) must match transformers'
and dsalite's to 1e-3 in F32, and greedy continuations must be identical. The checkpoints are built and saved by
transformers (the parity ground truth); the MTP cases are dsalite checkpoints, since transformers drops MTP weights.
DeepSeek-V4 runs a 321-token prompt: 40× its sliding window, two HCA entries (ratio 128), 80 CSA entries for
index_topk 3.
With the llama.cpp sources unpacked (`make llamacpp` sets DSALITE_LLAMACPP_SRC), the export is also compared key by
key and tensor by tensor with what llama.cpp's own converter writes for the same checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (make llamacpp builds it)")
gguf = pytest.importorskip("gguf")

from dsalite import verify  # noqa: E402
from dsalite.checkpoint import gguf as G  # noqa: E402
from dsalite.checkpoint.pretrained import from_pretrained  # noqa: E402
from gguf_fixtures import (  # noqa: E402
    TEXT,
    VOCAB,
    make_checkpoint,
    make_tokenizer,
    make_v4_checkpoint,
    make_v4_hf_checkpoint,
)
from hf_fixtures import build_hf, save_hf  # noqa: E402

pytestmark = pytest.mark.llamacpp

# 16 indexer heads: a score is an exact ReLU zero only when all heads are negative, so the top-k boundary is tie-free
DSA64 = dict(index_topk=12, index_n_heads=16, index_head_dim=64)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0,
        "beta_fast": 32, "beta_slow": 1}
CASES = {
    "glm52_schedule": ("glm_moe_dsa", dict(DSA64, num_hidden_layers=6, index_topk_freq=2, index_skip_topk_offset=3)),
    "v32_groups": ("deepseek_v32", dict(DSA64, n_group=4, topk_group=2, num_experts_per_tok=3)),
    "v3": ("deepseek_v3", dict(n_group=2, topk_group=1)),
    "v3_yarn": ("deepseek_v3", dict(n_group=2, topk_group=1, rope_scaling=YARN, rope_theta=10000.0)),
    "v32_yarn": ("deepseek_v32", dict(DSA64, rope_scaling=YARN, rope_theta=10000.0)),
}
GREEDY = 8
TOL = 1e-3


def llama(path: str, n_ctx: int = 128) -> "llama_cpp.Llama":
    """F32 KV cache (the default F16 one would round the latents) and every position's logits."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2,
                           logits_all=True, type_k=0, type_v=0, verbose=False)


def prompt_ids(tok_dir: str, repeat: int = 1) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).encode(" ".join(TEXT * repeat)).ids


def llama_logits_and_greedy(path, ids: list[int], n_ctx: int = 128) -> tuple[np.ndarray, list[int]]:
    llm = llama(path, n_ctx)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    out = []
    for _ in range(GREEDY):  # llama.cpp's own incremental decode over its DSA cache
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return logits, out


@torch.no_grad()
def dsalite_greedy(model, ids: list[int]) -> list[int]:
    """A plain greedy loop over full forwards (reference for the engine's continuation)."""
    seq = torch.tensor([ids])
    for _ in range(GREEDY):
        nxt = model(seq).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(ids):].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_llamacpp_matches_transformers_and_dsalite(tmp_path, case):
    mt, overrides = CASES[case]
    path = save_hf(build_hf(mt, seed=0, vocab_size=VOCAB, **overrides), tmp_path / case)
    make_tokenizer(path)
    out = tmp_path / f"{case}.gguf"
    G.export_checkpoint(path, out, "f32")
    ids = prompt_ids(path)
    cfg = from_pretrained(path).cfg
    if cfg.has_indexer:
        assert len(ids) >= 3 * cfg.index_topk

    theirs, llama_cont = llama_logits_and_greedy(out, ids)
    assert_matches_llama(case, path, ids, theirs, llama_cont)


def assert_matches_llama(name, path, ids, theirs, llama_cont):
    """llama.cpp's logits within TOL of transformers' and dsalite's on a sparse, tie-free selection; same greedy
    continuation. Returns verify's report (dsalite vs transformers)."""
    rep = verify.compare(path, input_ids=torch.tensor([ids]))  # dsalite vs transformers, with selection checks
    for r in rep.layers:
        if r.topk_overlap is not None:
            assert r.excluded_fraction > 0.2, f"layer {r.layer}: selection is not sparse"
            assert r.boundary_gap > 1e-6, f"layer {r.layer}: top-k boundary tie makes the selection undefined"
    with torch.no_grad():
        hf_logits = verify.load_hf(path)(torch.tensor([ids])).logits[0].double().numpy()
    model = from_pretrained(path)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    d_hf, d_ours = np.abs(theirs - hf_logits).max(), np.abs(theirs - ours).max()
    print(f"{name}: {len(ids)} tokens, llama.cpp vs transformers max|Δ| {d_hf:.2e}, vs dsalite {d_ours:.2e}, "
          f"dsalite vs transformers {rep.max_abs:.2e}")
    assert d_hf <= TOL and d_ours <= TOL
    assert dsalite_greedy(model, ids) == llama_cont
    return rep


@pytest.mark.parametrize("mt", ["glm_moe_dsa", "deepseek_v32", "deepseek_v3"])
def test_llamacpp_runs_gguf_with_mtp_block(tmp_path, mt):
    """The NextN block sits at blk.L in the layout llama.cpp loads; the trunk computes the same logits."""
    path = make_checkpoint(tmp_path / mt, mt)
    out = tmp_path / f"{mt}.gguf"
    G.export_checkpoint(path, out, "f32")
    md = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
    assert md[f"{G.T.ARCH[mt]}.nextn_predict_layers"] == 1
    ids = prompt_ids(path)
    theirs, cont = llama_logits_and_greedy(out, ids)
    model = from_pretrained(path)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    ours = out.logits[0].double().numpy()
    for i, t in enumerate(model.cfg.indexer_types[: model.cfg.num_hidden_layers]):
        if t == "full":
            assert verify.boundary_gap(model, i, out.hidden_states[i]) > 1e-6, f"layer {i}: top-k boundary tie"
    d = np.abs(theirs - ours).max()
    print(f"{mt} + MTP: llama.cpp vs dsalite max|Δ| {d:.2e}")
    assert d <= TOL and dsalite_greedy(model, ids) == cont


def test_llamacpp_tokenizes_like_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    path = make_checkpoint(tmp_path / "glm", "glm_moe_dsa")
    out = tmp_path / "glm.gguf"
    G.export_checkpoint(path, out, "f32")
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    llm = llama(out)
    text = "hello world, the quick brown fox! Sparse attention: 12 keys."
    ids = tok.encode(text).ids
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == text
    assert llm.token_bos() == tok.token_to_id("[gMASK]")


def test_llamacpp_deepseek4_matches_transformers_and_dsalite(tmp_path):
    """DeepSeek-V4: sliding window, CSA with its indexer, HCA, hash-routed layers, mHC, yarn on the compress rope."""
    path = make_v4_hf_checkpoint(tmp_path / "v4")
    out = tmp_path / "v4.gguf"
    G.export_checkpoint(path, out, "f32")
    ids = prompt_ids(path, repeat=4)
    cfg = from_pretrained(path).cfg
    assert len(ids) > 2 * 128 and len(ids) // 4 > 20 * cfg.index_topk and len(ids) > 20 * cfg.sliding_window

    theirs, llama_cont = llama_logits_and_greedy(out, ids, n_ctx=512)
    rep = assert_matches_llama("deepseek4", path, ids, theirs, llama_cont)
    csa = [r for r in rep.layers if r.topk_overlap is not None]  # the CSA layers pick exactly HF's entries
    assert csa and all(r.topk_overlap == 1.0 for r in csa)


# --------------------------------------------------------------------------- llama.cpp's own converter

SRC = os.environ.get("DSALITE_LLAMACPP_SRC")
_CONVERT = """
import sys
src = sys.argv.pop(1)
sys.path[:0] = [src + "/gguf-py", src]
import conversion.base as base, conversion.deepseek as ds
# our tiny test tokenizer is unknown to its hash table, and V3.2's converter asks a tokenizer attribute that
# transformers 5 no longer sets; both only concern the vocabulary, which both sides take from tokenizer.json
base.TextModel.get_vocab_base_pre = lambda self, tok: "gpt-2"
ds.DeepseekV32Model.set_vocab = lambda self: self._set_vocab_gpt2()
import runpy
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def _contents(path):
    r = gguf.GGUFReader(str(path))
    kv = {k: (list(f.types), f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return kv, {t.name: t for t in r.tensors}


@pytest.mark.skipif(not SRC, reason="DSALITE_LLAMACPP_SRC (the unpacked llama.cpp sources) is not set")
@pytest.mark.parametrize("mt", ["glm_moe_dsa", "deepseek_v32", "deepseek_v3"])
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_export_equals_llamacpp_converter(tmp_path, mt, dtype):
    path = make_checkpoint(tmp_path / mt, mt, **({"num_hidden_layers": 6, "index_topk_freq": 2,
                                                   "index_skip_topk_offset": 3} if mt == "glm_moe_dsa" else {}))
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    c["scoring_func"] = "sigmoid"  # as in the released configs; llama.cpp reads the gating function from it
    c["architectures"] = [{"glm_moe_dsa": "GlmMoeDsaForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
                           "deepseek_v3": "DeepseekV3ForCausalLM"}[mt]]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f)
    ref = tmp_path / "ref.gguf"
    r = subprocess.run([sys.executable, "-c", _CONVERT, SRC, path, "--outfile", str(ref), "--outtype", dtype],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = tmp_path / "ours.gguf"
    G.export_checkpoint(path, ours, dtype)
    (kv_ref, t_ref), (kv_ours, t_ours) = _contents(ref), _contents(ours)
    arch = G.T.ARCH[mt]
    if mt == "deepseek_v3":  # its converter drops the MTP block; we keep it as block L (what glm-dsa does)
        L = from_pretrained(path).cfg.num_hidden_layers
        assert kv_ours.pop(f"{arch}.nextn_predict_layers")[1] == 1
        assert kv_ours[f"{arch}.block_count"][1] == L + 1
        kv_ours[f"{arch}.block_count"] = kv_ref[f"{arch}.block_count"]
        kv_ours.pop("general.size_label"), kv_ref.pop("general.size_label")
        t_ours = {n: t for n, t in t_ours.items() if not n.startswith(f"blk.{L}.")}
    assert kv_ours.keys() == kv_ref.keys()
    for k in kv_ref:
        assert kv_ours[k] == kv_ref[k], k
    assert t_ours.keys() == t_ref.keys()
    for n, t in t_ref.items():
        o = t_ours[n]
        assert (o.tensor_type, list(o.shape)) == (t.tensor_type, list(t.shape)), n
        assert np.array_equal(np.asarray(o.data), np.asarray(t.data)), n


@pytest.mark.skipif(not SRC, reason="DSALITE_LLAMACPP_SRC (the unpacked llama.cpp sources) is not set")
def test_deepseek4_export_equals_llamacpp_converter(tmp_path):
    """llama.cpp's DeepSeek-V4 converter reads only DeepSeek's release format (original names and config spelling,
    routed experts in FP4), so the source is that. It keeps each tensor's source precision: FP4 experts are repacked
    losslessly to MXFP4 (file type MOSTLY_MXFP4_MOE) and the MTP `eh_proj` is forced to Q8_0. Our F32 export equals
    it key for key and byte for byte except there: the same expert values in F32, `eh_proj` whose Q8_0 rounding is
    the converter's bytes. The trunk is the default output, the MTP draft the `--mtp` output."""
    path = make_v4_checkpoint(tmp_path / "v4", fp4_experts=True)
    ours = tmp_path / "ours.gguf"
    G.export_checkpoint(path, ours, "f32")
    for flag, ref, mine in (([], "ref.gguf", ours), (["--mtp"], "ref-mtp.gguf", tmp_path / "mtp-ours.gguf")):
        r = subprocess.run([sys.executable, "-c", _CONVERT, SRC, path, "--outfile", str(tmp_path / ref),
                            "--outtype", "f32", *flag], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        (kv_ref, t_ref), (kv_ours, t_ours) = _contents(tmp_path / ref), _contents(mine)
        assert kv_ref.pop("general.file_type")[1] == 38 and kv_ours.pop("general.file_type")[1] == 0
        assert kv_ours.keys() == kv_ref.keys()
        for k in kv_ref:
            assert kv_ours[k] == kv_ref[k], k
        assert t_ours.keys() == t_ref.keys()
        for n, t in t_ref.items():
            o = t_ours[n]
            assert list(o.shape) == list(t.shape), n
            if "_exps." in n:
                assert (t.tensor_type.name, o.tensor_type.name) == ("MXFP4", "F32"), n
                assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), np.asarray(o.data)), n
            elif n.endswith("nextn.eh_proj.weight"):
                assert (t.tensor_type.name, o.tensor_type.name) == ("Q8_0", "F32"), n
                q = gguf.quants.quantize(np.asarray(o.data), gguf.GGMLQuantizationType.Q8_0)
                assert np.array_equal(q, np.asarray(t.data)), n
            else:
                assert o.tensor_type == t.tensor_type, n
                assert np.array_equal(np.asarray(o.data), np.asarray(t.data)), n
    # and dsalite imports the converter's pair: MXFP4 experts dequantise to the source's FP4 values exactly
    os.replace(tmp_path / "ref-mtp.gguf", tmp_path / "mtp-ref.gguf")
    src, back = from_pretrained(path), G.load(str(tmp_path / "ref.gguf"))
    assert back.cfg.num_nextn_predict_layers == 1
    sd_src, sd_back = src.state_dict(), back.state_dict()
    eh = ("mtp.0.e_proj.weight", "mtp.0.h_proj.weight")  # Q8_0 in the converter's file
    assert sd_src.keys() == sd_back.keys() and all(torch.equal(sd_src[k], sd_back[k]) for k in sd_src if k not in eh)
    ids = torch.tensor([prompt_ids(path, repeat=4)])
    with torch.no_grad():
        assert torch.equal(src(ids).logits, back(ids).logits)
