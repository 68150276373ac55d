"""DeepSeek-V4 trains: CE gradients equal transformers' for every parameter it trains, packed documents give the
per-token losses of the documents run alone, the CSA indexer's KL equals a dense reference in both DSA stages and
reaches only the indexer, and `dsalite train` runs V4 end to end (MTP, router bias, recompute, resume, both DSA
stages, LoRA, export in the checkpoint's own layout)."""

from __future__ import annotations

import glob
import json
import shutil

import pytest
import torch

from dsalite.checkpoint.pretrained import from_pretrained
from dsalite.cli import main
from dsalite.config import ModelConfig
from dsalite.model import Transformer
from dsalite.presets import PRESETS
from dsalite.training.data import pack_documents
from dsalite.training.losses import IGNORE, lm_loss, token_losses
from dsalite.verify import load_hf
from safetensors import safe_open
from train_fixtures import write_corpus
from v4_fixtures import make_v4_checkpoint


@pytest.mark.parametrize("case", ["v4_all_types", "v4_flash_schedule"])
def test_ce_gradients_match_transformers(tmp_path, case):
    """Every attention type, hash layers, mHC streams: one CE backward, relative 1e-5 per parameter.

    Run in float64 (both models; the mHC coefficients and the loss are computed in fp32 by both, as HF does): in
    fp32 the one-element `hc_head.hc_scale` gradient, a sum over B·S·N terms, differs by 1.5e-5 relative from
    summation order alone (float64: 1.2e-6 at most over all parameters), so fp32 cannot separate a bug from
    rounding there."""
    path = make_v4_checkpoint(tmp_path, case)
    hf, ours = load_hf(path, experts_impl="eager").double(), from_pretrained(path).double()
    S = 120 if case == "v4_all_types" else 300  # past the window, several CSA entries beyond index_topk, HCA entries
    ids = torch.randint(0, 128, (2, S), generator=torch.Generator().manual_seed(1))
    hf.train()
    hf(input_ids=ids, labels=ids).loss.backward()
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
    lm_loss(ours(ids).logits, labels).backward()
    theirs = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    mine = dict(ours.named_parameters())
    assert len(theirs) > 40
    for n, g in theirs.items():
        assert n in mine, f"HF parameter {n} has no dsalite counterpart"
        gm = mine[n].grad
        assert gm is not None, f"{n}: HF has a gradient, dsalite none"
        rel = (gm - g).abs().max() / g.abs().max().clamp(min=1e-12)
        assert rel <= 1e-5, f"{n}: relative gradient error {rel:.2e}"
    untrained = sorted(n for n, p in mine.items() if p.grad is not None and n not in theirs)
    assert not untrained, f"dsalite trains parameters transformers does not: {untrained[:5]}"


def test_packed_documents_equal_each_document_alone():
    """Windows and compression restart at each document: lengths that are and are not multiples of the CSA (4) and
    HCA (16) ratios, and one shorter than a compression window."""
    cfg = ModelConfig.from_hf(dict(PRESETS["deepseek-v4-tiny"]))
    m = Transformer(cfg)
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (37, 16, 50, 3, 32)]
    b = pack_documents(docs)
    labels = torch.cat([b.tokens[:, 1:], torch.full((1, 1), IGNORE)], 1)
    labels[:, :-1][b.segments[:, 1:] != b.segments[:, :-1]] = IGNORE  # no target across a document boundary
    with torch.no_grad():
        packed = token_losses(m(b.tokens, position_ids=b.positions, segment_ids=b.segments).logits, labels)[0]
        alone = []
        for d in docs:
            ids = torch.tensor([d])
            lab = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE)], 1)
            alone.append(token_losses(m(ids).logits, lab)[0])
        unpacked = token_losses(m(b.tokens).logits, labels)[0]  # the same row without document boundaries
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unpacked, torch.cat(alone), atol=1e-3), "boundaries must matter"


RECIPE = """
[model]
{model}
[data]
files = ["{corpus}"]
vocab_size = 300
seq_len = 64
batch_size = 2
[train]
stage = "{stage}"
max_steps = 4
warmup_steps = 1
save_every = 2
threads = 1
recompute = true
"""


def test_train_v4_end_to_end_resume_and_export_layout(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt")
    assert main(["create", "--preset", "deepseek-v4-tiny", str(tmp_path / "v4")]) == 0
    init = from_pretrained(str(tmp_path / "v4"))
    init.save_pretrained(str(tmp_path / "orig"), layout="original")  # DeepSeek's own names
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(model=f'init_from = "{tmp_path / "orig"}"', corpus=corpus, stage="pretrain"))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out), "--quiet"]) == 0
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["mtp"] > 0 for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
    # sqrtsoftplus layers moved their selection bias, hash layers have none
    trained = from_pretrained(str(out / "hf"))
    biases = {n: b for n, b in trained.named_buffers() if n.endswith("e_score_correction_bias")}
    assert biases and all(not torch.equal(b, dict(init.named_buffers())[n]) for n, b in biases.items())
    names = set()
    for f in glob.glob(str(out / "hf" / "*.safetensors")):
        with safe_open(f, "pt") as fh:
            names.update(fh.keys())
    assert "embed.weight" in names and any(n.startswith("mtp.0.") for n in names), "original layout, MTP kept"
    # resume from the step-2 checkpoint repeats steps 3 and 4 bit for bit
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    assert main(["train", str(recipe), "--out", str(out), "--quiet", "--resume"]) == 0
    again = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == [r["loss"] for r in recs]


def reference_csa_kl(attn, x, ctx, sparse_picks=None):
    """Written from the formulas, dense and unchunked: the teacher is each head's softmax of q·e·c^-0.5 over the
    visible entries, summed over heads and L1-normalised; the student the softmax of the index scores."""
    from dsalite.layers.norm import unweighted_rms_norm
    from dsalite.layers.rope import apply_rope_trailing

    B, S, _ = x.shape
    H, c = attn.n_heads, attn.head_dim
    cos, sin = ctx.rope["compress"]
    rope = ctx.tables["compress"]
    q_resid = attn.q_a_norm(attn.q_a_proj(x))
    q = apply_rope_trailing(unweighted_rms_norm(attn.q_b_proj(q_resid).view(B, S, H, c), attn.eps),
                            cos[:, :, None], sin[:, :, None])
    e = attn.compressor(x, rope)  # [B, W, c]
    ix = attn.compressor.indexer
    k = ix(x, rope)
    qi, w = ix.queries(x, q_resid, cos, sin)
    W = e.shape[1]
    vis = torch.arange(W)[None, None, :] < ((ctx.positions + 1) // ix.ratio)[..., None]  # [B, S, W]
    if sparse_picks is not None:
        sel = torch.zeros(B, S, W + 1, dtype=torch.bool).scatter_(-1, sparse_picks.clamp(min=-1) % (W + 1), True)
        vis = vis & sel[..., :W]
    lg = torch.einsum("bshc,bwc->bshw", q, e) * c**-0.5
    p = torch.softmax(lg.masked_fill(~vis[:, :, None], float("-inf")), -1).nan_to_num(0.0).sum(2)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    sc = torch.einsum("bsh,bshw->bsw", w * ix.width**-0.5, torch.relu(torch.einsum("bshd,bwd->bshw", qi, k)))
    logq = torch.log_softmax(sc.masked_fill(~vis, float("-inf")), -1).masked_fill(~vis, 0.0)
    kl = (p * (torch.where(p > 0, p, torch.ones_like(p)).log() - logq)).sum(-1)
    rows = vis.any(-1)
    return kl[rows].sum() / rows.sum()


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_csa_indexer_kl_matches_dense_reference_and_reaches_only_the_indexer(stage):
    from dsalite.training.losses import DSATraining

    cfg = ModelConfig.from_hf(dict(PRESETS["deepseek-v4-tiny"]))
    m = Transformer(cfg)
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    seen = {}
    for i, blk in m.model.layers.items():
        blk.self_attn.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(int(i), a))
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))  # 16 CSA entries, top 8
    dsa = DSATraining(dense_attention=stage == "dense", sparse_target=stage == "sparse")
    picks = {}
    for i in (2, 4):
        comp = m.model.layers[str(i)].self_attn.compressor
        orig = comp._train_indexer
        comp._train_indexer = lambda *a, orig=orig, i=i: picks.setdefault(i, orig(*a))
    out = m(ids, dsa=dsa)
    losses = dsa.layer_losses()
    assert sorted(losses) == [2, 4]  # the CSA layers; sliding and HCA layers have no indexer
    for i, got in losses.items():
        x, ctx = seen[i][:2]
        if stage == "sparse":
            assert bool((picks[i] >= 0).sum(-1).max() < 16), "the selection must leave entries out"
        with torch.no_grad():
            ref = reference_csa_kl(m.model.layers[str(i)].self_attn, x, ctx,
                                   picks[i] if stage == "sparse" else None)
        assert got.item() > 1e-4
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    dsa.loss().backward(retain_graph=True)
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".indexer." in n for n in grads), sorted(grads - {g for g in grads if ".indexer." in g})
    m.zero_grad(set_to_none=True)
    out.logits.logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if ".indexer." in n), "CE must not reach an indexer"


def test_v4_dsa_stages_train(tmp_path):
    """dsa_warmup changes only the CSA indexers' weights; dsa_sparse then trains everything with the KL term."""
    corpus = write_corpus(tmp_path / "c.txt")
    assert main(["create", "--preset", "deepseek-v4-tiny", str(tmp_path / "v4")]) == 0
    warm = tmp_path / "warm.toml"
    warm.write_text(RECIPE.format(model=f'init_from = "{tmp_path / "v4"}"', corpus=corpus, stage="dsa_warmup"))
    assert main(["train", str(warm), "--out", str(tmp_path / "w"), "--quiet"]) == 0
    before, after = from_pretrained(str(tmp_path / "v4")).state_dict(), from_pretrained(str(tmp_path / "w" / "hf"))
    changed = {n for n, t in after.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and all(".indexer." in n for n in changed), sorted(changed)[:5]
    recs = [json.loads(ln) for ln in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] > 0 for r in recs)
    sparse = tmp_path / "sparse.toml"
    sparse.write_text(RECIPE.format(model=f'init_from = "{tmp_path / "w" / "hf"}"', corpus=corpus,
                                    stage="dsa_sparse"))
    assert main(["train", str(sparse), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    recs = [json.loads(ln) for ln in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] > 0 and r["ce"] > 0 for r in recs)


def test_lora_on_v4_trains_the_adapters_and_merges_exactly(tmp_path):
    from dsalite.training.lora import LoRALinear, merge_lora

    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(model='preset = "deepseek-v4-tiny"', corpus=write_corpus(tmp_path / "c.txt"),
                                    stage="lora").replace("recompute = true", "recompute = false")
                      + '[lora]\nrank = 4\nalpha = 8.0\ntargets = ["attention", "indexer", "mlp", "experts"]\n')
    from dsalite.training.recipe import load_recipe
    from dsalite.training.trainer import Trainer

    m = Trainer(load_recipe(str(recipe)), str(tmp_path / "o")).model
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    attn = m.model.layers["2"].self_attn  # a CSA layer
    for mod in (attn.q_a_proj, attn.q_b_proj, attn.kv_proj, attn.o_b_proj, attn.compressor.indexer.q_b_proj,
                attn.compressor.indexer.scorer.weights_proj):
        assert isinstance(mod, LoRALinear)
    assert any(".experts.parametrizations.gate_up_proj" in n for n in trainable)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
        unmerged = m(ids).logits
        merged = merge_lora(m)(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
