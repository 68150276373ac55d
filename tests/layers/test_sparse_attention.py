"""The gathered sparse attention and the chunked indexer against slow, obviously-correct dense references."""

import pytest
import torch

from dsalite.layers import indexer as indexer_mod
from dsalite.layers import sparse_attention as sa
from dsalite.layers.mask import Visibility


def dense_masked_reference(q, k, v, idx, scale):
    """Full S×T logits, everything outside the selection set to -inf (what HF computes)."""
    B, S, H, _ = q.shape
    T = k.shape[1]
    keep = torch.zeros(B, S, T + 1, dtype=torch.bool)
    keep.scatter_(-1, torch.where(idx < 0, T, idx).long(), True)
    keep = keep[..., :T]
    k = k.expand(B, T, H, k.shape[-1])
    v = v.expand(B, T, H, v.shape[-1])
    logits = torch.einsum("bshd,bthd->bhst", q, k) * scale
    logits = logits.masked_fill(~keep[:, None], float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return torch.einsum("bhst,bthd->bshd", p, v)


def random_selection(B, S, T, K, g):
    """Causal top-K-like selections with -1 where fewer than K keys are visible (queries are the last S keys)."""
    idx = torch.full((B, S, K), -1, dtype=torch.long)
    for b in range(B):
        for s in range(S):
            visible = T - S + s + 1
            pick = torch.randperm(visible, generator=g)[: min(K, visible)]
            idx[b, s, : len(pick)] = pick
    return idx


@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("budget", [sa.GATHER_BUDGET, 500])
def test_sparse_attention_matches_dense_masked_reference(monkeypatch, shared_kv, budget):
    monkeypatch.setattr(sa, "GATHER_BUDGET", budget)  # small budget → many query chunks
    g = torch.Generator().manual_seed(0)
    B, S, T, H, D, Dv, K = 2, 24, 40, 3, 12, 10, 7
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, T, 1 if shared_kv else H, D, generator=g)
    v = torch.randn(B, T, 1 if shared_kv else H, Dv, generator=g)
    idx = random_selection(B, S, T, K, g)
    out = sa.sparse_attention(q, k, v, idx, 0.3)
    ref = dense_masked_reference(q, k, v, idx, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_dense_attention_matches_reference_with_padding_and_segments():
    g = torch.Generator().manual_seed(1)
    B, S, H, D = 2, 10, 2, 8
    q, k, v = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[1, :3] = False
    seg = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    vis = Visibility(S, S, 0, key_valid, seg)
    out = sa.dense_attention(q, k, v, vis.full(), 0.5)
    mask = vis.full()
    logits = torch.einsum("bshd,bthd->bhst", q, k) * 0.5
    p = torch.softmax(logits.masked_fill(~mask[:, None], float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(out, torch.einsum("bhst,bthd->bshd", p, v), rtol=1e-5, atol=1e-6)
    assert out[1, :3].abs().max() == 0  # padded queries see nothing and contribute nothing
    # with is_causal (no mask object) it is plain causal attention
    causal = Visibility(S, S)
    assert causal.plain_causal
    torch.testing.assert_close(sa.dense_attention(q, k, v, None, 0.5), sa.dense_attention(q, k, v, causal.full(), 0.5))


def test_chunked_indexer_equals_unchunked(monkeypatch):
    g = torch.Generator().manual_seed(2)
    B, S, Hi, Di, K = 2, 33, 4, 16, 5
    # positive q, k, w: no ReLU zeros, so no score ties and the top-k sets are unique whatever the scoring width
    q, k, w = (torch.rand(B, S, Hi, Di, generator=g), torch.rand(B, S, Di, generator=g),
               torch.rand(B, S, Hi, generator=g))
    vis = Visibility(S, S)
    full = indexer_mod.index_scores(q, k, w, 0.25).masked_fill(~vis.full(), float("-inf"))
    want_val, want = full.topk(K, -1)
    want = want.masked_fill(want_val == float("-inf"), -1)
    monkeypatch.setattr(indexer_mod, "SCORE_BUDGET", 300)  # forces one query per chunk
    got = indexer_mod.topk_indices(q, k, w, vis.block, K, 0.25)
    # the selection is a set (its order is not used): compare sorted rows
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    causal = indexer_mod.topk_indices(q, k, w, vis.block, K, 0.25, vis.key_range)  # causal prefix, masked tail only
    assert torch.equal(causal.sort(-1).values, want.sort(-1).values)
    # rows with fewer visible keys than K are padded with -1, never with future keys
    first = got[:, 0].sort(-1).values
    assert (first[:, :-1] == -1).all() and (first[:, -1] == 0).all()
    assert ((got <= torch.arange(S)[None, :, None]) | (got == -1)).all()


def test_key_range_and_key_blocks_agree_with_the_full_mask():
    """Keys before k0 are visible to the whole query block, none from k1 on, and a key block is a slice of the mask;
    with padding or documents nothing is assumed visible (k0 = 0)."""
    S, T = 7, 12
    key_valid = torch.ones(2, T, dtype=torch.bool)
    key_valid[1, :4] = False
    seg = torch.tensor([[0] * 6 + [1] * 6, [0] * 12])
    all_valid = torch.ones(2, T, dtype=torch.bool)
    for vis in (Visibility(S, T, T - S), Visibility(S, T, T - S, key_valid), Visibility(S, T, T - S, None, seg),
                Visibility(S, T, T - S, all_valid)):
        full = vis.full()
        for s0, s1 in ((0, 3), (2, 7), (6, 7)):
            k0, k1 = vis.key_range(s0, s1)
            blk = full[:, s0:s1]
            assert blk[..., :k0].all() and not blk[..., k1:].any()
            assert torch.equal(vis.block(s0, s1, k0, k1).expand(blk.shape[0], -1, -1), blk[..., k0:k1])
        hides = (vis.key_valid is not None and not vis.key_valid.all()) or vis.segments is not None
        assert (vis.key_range(2, 7)[0] == 0) == hides


def _is_top_k_set(sc, idx, K):
    """idx [R, K] is a top-K set of sc [R, T]: distinct keys, and none left out scores above one taken."""
    taken = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, idx, True)
    assert (taken.sum(-1) == K).all()
    low = sc.masked_fill(~taken, float("inf")).amin(-1)
    high = sc.masked_fill(taken, float("-inf")).amax(-1)
    return bool((high <= low).all())


@pytest.mark.parametrize("T", [100, 1000, 4099])
def test_topk_set_matches_topk(T):
    """The threshold filter picks exactly torch.topk's set on tie-free rows (hidden tails included) and a valid
    top-K set where ReLU zeros tie at the boundary."""
    g = torch.Generator().manual_seed(4)
    R, K = 37, 64
    sc = torch.randn(R, T, generator=g)
    sc[:, -R:] = sc[:, -R:].masked_fill(torch.ones(R, R, dtype=torch.bool).triu(1), float("-inf"))  # causal tail
    val, idx = indexer_mod.topk_set(sc, K)
    want_val, want = sc.topk(K, -1)
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
    assert torch.equal(val.sort(-1).values, want_val.sort(-1).values)
    assert torch.equal(sc.gather(1, idx), val)
    tied = torch.relu(torch.randn(R, T, generator=g) - 1.5)  # most entries exactly 0, fewer than K positive in many rows
    _, idx = indexer_mod.topk_set(tied, K)
    assert _is_top_k_set(tied, idx, K)


def test_topk_set_rows_with_few_visible_keys():
    """Rows with fewer than K visible keys (-inf elsewhere) keep every visible key (enough rows for the filter)."""
    g = torch.Generator().manual_seed(5)
    sc = torch.randn(indexer_mod.FILTER_MIN_ROWS, 2000, generator=g)
    sc[0, 10:] = float("-inf")
    val, idx = indexer_mod.topk_set(sc, 64)
    assert set(idx[0][val[0] > float("-inf")].tolist()) == set(range(10))
    assert torch.equal(idx[1:].sort(-1).values, sc[1:].topk(64, -1).indices.sort(-1).values)


def test_index_scores_formula():
    """score = Σ_h w_h · ReLU(q_h·k · scale), checked against a scalar loop."""
    g = torch.Generator().manual_seed(3)
    q, k, w = torch.randn(1, 3, 2, 4, generator=g), torch.randn(1, 5, 4, generator=g), torch.randn(1, 3, 2, generator=g)
    sc = indexer_mod.index_scores(q, k, w, 0.5)
    for s in range(3):
        for t in range(5):
            want = sum(w[0, s, h] * max(0.0, float(q[0, s, h] @ k[0, t]) * 0.5) for h in range(2))
            assert abs(sc[0, s, t].item() - float(want)) < 1e-5
