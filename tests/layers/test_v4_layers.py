"""DeepSeek-V4 primitives against slow references written here: mHC mixing (combᵀ), Sinkhorn, trailing/inverse rope,
sink attention, compressor windows and causality, clamped SwiGLU, hash routing."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsalite.config import ModelConfig
from dsalite.layers.compressor import Compressor, entry_visible
from dsalite.layers.hyper import expand, sinkhorn
from dsalite.layers.moe import MoE, swiglu
from dsalite.layers.rope import apply_rope_trailing, cos_sin, inv_freq_and_scale
from dsalite.layers.sparse_attention import sparse_attention
from dsalite.layers.window_attention import window_attention

g = torch.Generator().manual_seed(0)


def test_sinkhorn_is_doubly_stochastic():
    comb = torch.rand(3, 4, 4, generator=g) + 0.1
    out = sinkhorn(comb, 20, 1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(3, 4), atol=1e-4)
    assert torch.allclose(out.sum(-2), torch.ones(3, 4), atol=1e-5)


def test_stream_mixing_uses_comb_transposed():
    B, S, N, D = 1, 2, 3, 5
    x = torch.randn(B, S, N, D, generator=g)
    post = torch.rand(B, S, N, generator=g)
    comb = torch.rand(B, S, N, N, generator=g)
    out = torch.randn(B, S, D, generator=g)
    want = torch.empty_like(x)
    for n in range(N):  # x'_n = post_n·out + Σ_j comb[j, n]·x_j
        want[:, :, n] = post[:, :, n, None] * out + sum(comb[:, :, j, n, None] * x[:, :, j] for j in range(N))
    assert torch.allclose(expand(x, post, comb, out), want, atol=1e-6)
    wrong = expand(x, post, comb.transpose(-1, -2), out)
    assert not torch.allclose(wrong, want, atol=1e-3)


def test_trailing_rope_rotates_pairs_and_inverse_undoes_it():
    p, D = 8, 20
    inv, sc = inv_freq_and_scale({"rope_theta": 10000.0}, p, 4096)
    cos, sin = cos_sin(inv, torch.arange(6), sc, torch.float32)  # [6, p/2]
    x = torch.randn(6, D, generator=g)
    y = apply_rope_trailing(x, cos, sin)
    assert torch.equal(y[:, : D - p], x[:, : D - p])
    r = x[:, D - p:].view(6, p // 2, 2)
    ang = torch.arange(6)[:, None].double() * inv.double()
    want = torch.stack([r[..., 0] * ang.cos() - r[..., 1] * ang.sin(), r[..., 1] * ang.cos() + r[..., 0] * ang.sin()], -1)
    assert torch.allclose(y[:, D - p:].view(6, p // 2, 2).double(), want, atol=1e-5)
    assert torch.allclose(apply_rope_trailing(y, cos, -sin), x, atol=1e-5)


def test_sink_attention_matches_a_dense_reference():
    B, S, H, D, K = 2, 7, 3, 8, 4
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, S, 1, D, generator=g)
    idx = torch.rand(B, S, S, generator=g).argsort(-1)[..., :K]  # distinct keys per row
    idx[:, :, -1] = -1
    idx[:, 0, 1:] = -1  # a row with one key
    idx[:, 1] = -1  # a row with none: only the sink
    sinks = torch.randn(H, generator=g)
    got = sparse_attention(q, k, D, idx, 0.3, sinks=sinks)
    want = torch.zeros_like(got)
    for b in range(B):
        for s in range(S):
            keys = sorted(set(idx[b, s][idx[b, s] >= 0].tolist()))
            for h in range(H):
                logits = torch.stack([q[b, s, h] @ k[b, j, 0] * 0.3 for j in keys] + [sinks[h]])
                p = torch.softmax(logits, 0)[:-1]
                want[b, s, h] = sum((p[i] * k[b, j, 0] for i, j in enumerate(keys)), torch.zeros(D))
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("pad", [False, True])
def test_window_attention_matches_the_gathering_reference(pad):
    """In-place window + gathered entries == sparse_attention over explicit (window ∪ picks) indices."""
    B, S, H, c, Wn, E, K = 2, 300, 2, 8, 20, 12, 3  # 300 queries: three blocks, windows crossing block edges
    q = torch.randn(B, S, H, c, generator=g)
    kv = torch.randn(B, S, c, generator=g)
    extra = torch.randn(B, E, c, generator=g)
    picks = torch.rand(B, S, E, generator=g).argsort(-1)[..., :K]
    picks[:, ::7, 1:] = -1
    sinks = torch.randn(H, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    if pad:
        valid[0, :30] = False
    got = window_attention(q, kv, Wn, 0.2, sinks, extra, picks, valid if pad else None)
    win = torch.arange(S)[:, None] - Wn + 1 + torch.arange(Wn)  # [S, Wn]: s−Wn+1 .. s
    win = win.masked_fill(win < 0, -1).expand(B, S, Wn)
    win = win.masked_fill(~valid.gather(1, win.clamp(min=0).reshape(B, -1)).view(B, S, Wn), -1)
    idx = torch.cat([win, torch.where(picks >= 0, picks + S, picks)], -1)
    want = sparse_attention(q, torch.cat([kv, extra], 1)[:, :, None], c, idx, 0.2, sinks=sinks)
    assert torch.allclose(got, want, atol=1e-6)
    own = torch.arange(S)[:, None] - torch.arange(Wn)  # window only, no padding
    own = own.masked_fill(own < 0, -1).expand(B, S, Wn)
    want = sparse_attention(q, kv[:, :, None], c, own, 0.2, sinks=sinks)
    assert torch.allclose(window_attention(q, kv, Wn, 0.2, sinks), want, atol=1e-6)


def test_compressor_windows_overlap_only_for_csa():
    D, c, m, S = 16, 8, 4, 16
    inv, sc = inv_freq_and_scale({"rope_theta": 160000.0}, 4, 4096)
    for overlap in (False, True):
        comp = Compressor(D, c, m, overlap, 1e-6)
        torch.nn.init.normal_(comp.position_bias, generator=g)
        for lin in (comp.kv_proj, comp.gate_proj):
            torch.nn.init.normal_(lin.weight, generator=g)
        x = torch.randn(1, S + 3, D, generator=g)  # 3 tail tokens make no entry
        e = comp(x, (inv, sc))
        assert e.shape == (1, S // m, c)
        x2 = x.clone()
        x2[0, m + 1] += 1.0  # a token of window 1
        e2 = comp(x2, (inv, sc))
        changed = [(e2[0, w] - e[0, w]).abs().max().item() > 0 for w in range(S // m)]
        assert changed == [False, True, overlap, False]  # CSA's entry 2 also pools window 1's Ca series
        x3 = x.clone()
        x3[0, S:] += 1.0
        assert torch.equal(comp(x3, (inv, sc)), e)


def test_entry_visibility_is_causal():
    vis = entry_visible(torch.arange(12)[None], 3, 4)[0]
    assert vis.sum(-1).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_clamped_swiglu():
    gate, up = torch.tensor([20.0, -3.0]), torch.tensor([-20.0, 2.0])
    assert torch.allclose(swiglu(gate, up, 10.0), torch.tensor([F.silu(torch.tensor(10.0)) * -10, F.silu(torch.tensor(-3.0)) * 2]))
    assert torch.equal(swiglu(gate, up), F.silu(gate) * up)


def test_hash_router_uses_the_table_and_needs_ids():
    cfg = ModelConfig.tiny("deepseek_v4")
    moe = MoE(cfg, router="hash")
    torch.nn.init.normal_(moe.gate.weight, generator=g)
    moe.gate.tid2eid.copy_(torch.randint(0, cfg.n_routed_experts, moe.gate.tid2eid.shape, generator=g))
    x = torch.randn(5, cfg.hidden_size, generator=g)
    ids = torch.tensor([3, 3, 7, 1, 0])
    w, e, s = moe.gate(x, ids)
    assert torch.equal(e, moe.gate.tid2eid[ids])
    sp = F.softplus(x @ moe.gate.weight.T).sqrt()
    want = sp.gather(1, e)
    assert torch.allclose(w, want / want.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    with pytest.raises(ValueError, match="input_ids"):
        moe.gate(x)
    assert math.isclose(cfg.routed_scaling_factor, 1.5)


@pytest.mark.parametrize("N", [2, 40])  # few tokens take the gathered-weights path, many the per-expert loop
def test_experts_clamp_swiglu_on_every_path(N):
    from dsalite.layers.moe import Experts

    E, D, inter, k, lim = 4, 8, 6, 2, 1.0
    ex = Experts(E, D, inter, limit=lim)
    torch.nn.init.normal_(ex.gate_up_proj, std=3.0, generator=g)
    torch.nn.init.normal_(ex.down_proj, generator=g)
    x = torch.randn(N, D, generator=g)
    ids = torch.rand(N, E, generator=g).argsort(-1)[:, :k]
    w = torch.rand(N, k, generator=g)
    want = torch.zeros(N, D)
    for n in range(N):
        for j in range(k):
            e = ids[n, j]
            gate, up = (ex.gate_up_proj[e] @ x[n]).chunk(2)
            assert gate.max() > lim or up.abs().max() > lim  # the clamp matters
            h = F.silu(gate.clamp(max=lim)) * up.clamp(-lim, lim)
            want[n] += w[n, j] * (ex.down_proj[e] @ h)
    with torch.no_grad():
        assert torch.allclose(ex(x, ids, w), want, atol=1e-5)


def test_v4_backward_reaches_every_weight_but_the_indexer():
    """LM + MTP losses train everything except CSA's indexer (discrete top-k; it needs its own KL loss, as in HF)."""
    from dsalite.model import build_model

    m = build_model(ModelConfig.tiny("deepseek_v4"))
    m.init_weights(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 40), generator=g)
    out = m(ids, attention_mask=torch.ones(2, 40).index_fill_(1, torch.arange(3), 0))
    loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    (loss + m.mtp_forward(out.streams, ids)[0].logsumexp(-1).mean()).backward()
    missing = {n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()}
    assert missing and all(".compressor.indexer." in n for n in missing), sorted(missing)
