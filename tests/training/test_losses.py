"""DSA indexer KL loss against an independent dense reference; gradient isolation; recompute gives identical grads."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dsalite.config import ModelConfig
from dsalite.layers.rope import apply_rope
from dsalite.model import Transformer
from dsalite.training.losses import DSATraining, IGNORE, lm_loss, mtp_loss, shifted_labels
from dsalite.training.trainer import enable_recompute


def tiny_model(seed=0, **kw):
    cfg = ModelConfig.tiny("glm_moe_dsa", index_topk=8, index_topk_pattern="FFSF", **kw)
    m = Transformer(cfg)
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    return m


def reference_kl(mla, x, cos, sin, sparse_topk=None):
    """Dense, unchunked, written from the formulas: expanded per-head keys, full S×T probabilities and scores."""
    B, S, _ = x.shape
    H, n, p, r = mla.n_heads, mla.nope, mla.rope, mla.rank
    qr = mla.q_a_layernorm(mla.q_a_proj(x))
    q = mla.q_b_proj(qr).view(B, S, H, n + p)
    c, kr = mla.kv_a_proj_with_mqa(x).split([r, p], -1)
    kv = mla.kv_b_proj(mla.kv_a_layernorm(c)).view(B, S, H, n + mla.v_dim)
    qf = torch.cat([q[..., :n], apply_rope(q[..., n:], cos[:, :, None], sin[:, :, None], True)], -1)
    kf = torch.cat([kv[..., :n], apply_rope(kr, cos, sin, True)[:, :, None].expand(B, S, H, p)], -1)
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None].expand(B, S, S).clone()
    if sparse_topk is not None:
        sel = torch.zeros(B, S, S, dtype=torch.bool)
        for b in range(B):
            for s in range(S):
                for t in sparse_topk[b, s].tolist():
                    if t >= 0:
                        sel[b, s, t] = True
        allowed &= sel
    logits = torch.einsum("bshd,bthd->bhst", qf, kf) * mla.scale
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), -1).sum(1)
    target = probs / probs.sum(-1, keepdim=True)
    ix = mla.indexer
    iq = ix.wq_b(qr).view(B, S, ix.n_heads, ix.head_dim)
    ik = ix.k_norm(ix.wk(x))
    rp = ix.rope_dim
    iq = torch.cat([apply_rope(iq[..., :rp], cos[:, :, None], sin[:, :, None], True), iq[..., rp:]], -1)
    ik = torch.cat([apply_rope(ik[..., :rp], cos, sin, True), ik[..., rp:]], -1)
    w = ix.weights_proj(x) * ix.n_heads**-0.5
    score = torch.einsum("bsh,bsht->bst", w, torch.relu(torch.einsum("bshd,btd->bsht", iq, ik)) * ix.head_dim**-0.5)
    logq = torch.log_softmax(score.masked_fill(~allowed, float("-inf")), -1)
    kl = torch.where(allowed, target * (torch.log(target.clamp(min=1e-30)) - logq.masked_fill(~allowed, 0)), 0.0)
    return kl.sum(-1).mean()


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_kl_matches_dense_reference(sparse):
    m = tiny_model()
    inputs = {}
    for i, blk in m.model.layers.items():
        blk.self_attn.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(int(i), a))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    dsa = DSATraining(dense_attention=False, sparse_target=sparse)
    out = m(ids, dsa=dsa)
    losses = dsa.layer_losses()
    assert sorted(losses) == [0, 1, 3]  # layer 2 is shared: no indexer, no KL term
    with torch.no_grad():
        for i, got in losses.items():
            x, ctx = inputs[i][:2]
            cos, sin = ctx.rope["main"]
            ref = reference_kl(m.model.layers[str(i)].self_attn, x, cos, sin, out.topk[i] if sparse else None)
            assert got.item() > 1e-4
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_gradient_isolation():
    """The KL loss trains only indexers; CE and MTP never reach an indexer parameter."""
    m = tiny_model()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    dsa = DSATraining()
    out = m(ids, dsa=dsa)
    dsa.loss().backward(retain_graph=True)
    for n, p in m.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (".indexer." in n and "model.layers.2." not in n
                                                                     and "mtp" not in n), n
    m.zero_grad()
    seg = torch.zeros_like(ids)
    lab = shifted_labels(ids, seg, torch.ones_like(ids), 24, 1)
    loss = lm_loss(out.logits, lab) + mtp_loss(m.mtp_forward(out.last_hidden, ids), [lab])
    loss.backward()
    assert all(p.grad is None for n, p in m.named_parameters() if ".indexer." in n)


def test_recompute_gives_identical_gradients():
    """Per-block recompute (IndexShare layer 2 reusing layer 1's top-k) reproduces every gradient exactly."""
    a = tiny_model()
    b = copy.deepcopy(a)
    enable_recompute(b)
    calls = []
    b.model.layers["2"].self_attn.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    lab = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
    for m in (a, b):
        dsa = DSATraining()
        out = m(ids, dsa=dsa)
        assert out.topk[1] is not None and out.topk[2] is out.topk[1]
        (lm_loss(out.logits, lab) + 0.1 * dsa.loss()).backward()
    assert len(calls) == 2, "the shared layer was not recomputed during backward"
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), n
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), n


def test_mtp_loss_needs_a_depth():
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        mtp_loss([], [])


class _Head(torch.nn.Module):
    """The head interface head_lm_loss reads: `head`, `head_weight`, and `lm_head` unless tied to the embeddings."""

    def __init__(self, D: int, V: int, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        if not tied:
            self.lm_head = torch.nn.Linear(D, V, bias=False)

    def head_weight(self):
        return self.lm_head.weight if hasattr(self, "lm_head") else self.embed.weight

    def head(self, h):
        return torch.nn.functional.linear(h, self.head_weight())


@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_loss_equals_head_then_loss(monkeypatch, tied):
    """head_lm_loss = lm_loss(head(h)) in value and in the gradients of h and of the head weight, with ignored labels,
    chunks that do not divide the rows, separate or tied head weights; LoRA-like heads take the unfused path."""
    from dsalite.training import losses
    from dsalite.training.losses import head_lm_loss

    g = torch.Generator().manual_seed(21)
    B, S, D, V = 2, 37, 16, 50
    model = _Head(D, V, tied)
    torch.nn.init.normal_(model.head_weight(), generator=g)
    h = torch.randn(B, S, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[:, -3:] = IGNORE
    labels[1, :5] = IGNORE
    monkeypatch.setattr(losses, "CE_BUDGET", V * 9)
    want = lm_loss(model.head(h), labels)
    gh_want, gw_want = torch.autograd.grad(want, [h, model.head_weight()])
    calls = []
    fused_apply = losses._LinearCrossEntropy.apply
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or fused_apply(*a))
    got = head_lm_loss(model, h, labels)
    assert calls, "the fused path did not run"
    gh, gw = torch.autograd.grad(got, [h, model.head_weight()])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh_want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw_want, rtol=1e-5, atol=1e-7)
    assert head_lm_loss(model, h, torch.full_like(labels, IGNORE)).item() == 0.0
