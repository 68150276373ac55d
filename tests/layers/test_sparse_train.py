"""The masked-GEMM trainable sparse attention (the path without the CPU kernel) equals the gather path in values and
gradients; the kernel's own gradients are tested in test_kernels.py."""

import torch

import pytest

from dsalite.layers import sparse_train
from dsalite.layers.sparse_attention import sparse_attention
from dsalite.layers.sparse_train import masked_attention


@pytest.mark.parametrize("block_budget", [None, 400])  # 400: blocks of 1-3 queries, some seeing no key at all
@pytest.mark.parametrize("shared_latent", [True, False])
def test_masked_attention_matches_gather_path_with_grads(shared_latent, block_budget, monkeypatch):
    if block_budget is not None:
        monkeypatch.setattr(sparse_train, "BLOCK_BUDGET", block_budget)
    g = torch.Generator().manual_seed(0)
    B, S, H, D, dv, K = 2, 37, 3, 12, 8, 6
    q = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    kv = torch.randn(B, S, D, generator=g, requires_grad=True)
    scores = torch.randn(B, S, S, generator=g).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    val, idx = scores.topk(K, dim=-1)
    idx = idx.masked_fill(val == float("-inf"), -1)  # the first K-1 queries see fewer than K keys
    idx[1, 5] = -1  # a query with no key at all contributes zeros
    dout = torch.randn(B, S, H, dv, generator=g)

    if not shared_latent:  # per-head keys and separate values, as MLA's expanded training path passes them
        _test_per_head(g, idx)
        return
    got = masked_attention(q, kv[:, :, None], dv, idx, 0.3)
    dq, dkv = torch.autograd.grad(got, (q, kv), dout)
    with torch.no_grad():
        want = sparse_attention(q, kv[:, :, None], dv, idx, 0.3)  # the gather path (no grad → no dispatch)
    qq, kk = q.detach().clone().requires_grad_(), kv.detach().clone().requires_grad_()
    ref = torch.einsum("bsht,btv->bshv", torch.softmax(
        (torch.einsum("bshd,btd->bsht", qq, kk) * 0.3).masked_fill(
            ~torch.zeros(B, S, S + 1, dtype=torch.bool).scatter_(-1, torch.where(idx < 0, S, idx), True)[
                :, :, None, :S], float("-inf")), -1).nan_to_num(0.0), kk[..., :dv])
    rq, rkv = torch.autograd.grad(ref, (qq, kk), dout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got[1, 5].abs().max() == 0
    torch.testing.assert_close(dq, rq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dkv, rkv, rtol=1e-5, atol=1e-6)


def _test_per_head(g, idx):
    B, S, K = idx.shape
    H, D, dv = 3, 10, 7
    q = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    k = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    v = torch.randn(B, S, H, dv, generator=g, requires_grad=True)
    dout = torch.randn(B, S, H, dv, generator=g)
    got = masked_attention(q, k, v, idx, 0.25)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    with torch.no_grad():
        want = sparse_attention(q, k, v, idx, 0.25)
    sel = torch.zeros(B, S, S + 1, dtype=torch.bool).scatter_(-1, torch.where(idx < 0, S, idx), True)[..., :S]
    lg = (torch.einsum("bshd,bthd->bhst", q, k) * 0.25).masked_fill(~sel[:, None], float("-inf"))
    ref = torch.einsum("bhst,bthv->bshv", torch.softmax(lg, -1).nan_to_num(0.0), v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_masked_attention_counts_a_repeated_key_like_the_gather_path():
    """A key listed twice in a row weighs twice in both paths (values and gradients agree)."""
    g = torch.Generator().manual_seed(1)
    B, S, H, D, dv = 1, 9, 2, 6, 4
    q = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    k = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    v = torch.randn(B, S, H, dv, generator=g, requires_grad=True)
    idx = torch.stack([torch.tensor([s, s, max(s - 1, 0), -1]) for s in range(S)])[None]
    dout = torch.randn(B, S, H, dv, generator=g)
    got = masked_attention(q, k, v, idx, 0.4)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    want = sparse_attention(q, k, v, idx, 0.4)  # with grad: autograd through the gather path
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
