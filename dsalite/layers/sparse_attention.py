"""Attention over selected keys: gathers the top-k keys per query, never builds an S×T mask.

Legend: B batch, S queries, T keys, H heads, K selected keys per query, D head dim (Dv for values).
`sparse_attention` costs O(S·K·H·D) time and, chunked over queries, O(chunk·K·H·D) memory. `dense_attention` is
for the case where the selection is provably every visible key (no indexer, or index_topk >= T): it is the same
set, so SDPA computes the identical result faster. The dense masked reference the tests compare against lives in
the tests, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsalite import kernels

# Queries per chunk are chosen so one chunk's gathered keys stay near this many elements (4 MB in fp32: small
# enough that the allocator reuses the memory instead of mapping fresh pages, which would cost more than the copy).
GATHER_BUDGET = 1 << 20


def sparse_attention(
    q: torch.Tensor,  # [B, S, H, D]
    k: torch.Tensor,  # [B, T, Hk, D]   Hk = H, or 1 (shared across heads)
    v: torch.Tensor | int,  # [B, T, Hk, Dv], or Dv: the values are the first Dv channels of k (MLA's latent)
    idx: torch.Tensor,  # [B, S, K] int, -1 = no key
    scale: float,
    sinks: torch.Tensor | None = None,  # [H] per-head logit that joins every row's softmax denominator (V4)
) -> torch.Tensor:  # [B, S, H, Dv]
    B, S, H, D = q.shape
    K = idx.shape[-1]
    Hk = k.shape[2]
    Dv = v if isinstance(v, int) else v.shape[-1]
    if kernel_ready(q, k, v, sinks):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return LatentKernelAttention.apply(q, k, Dv, idx, scale)
        return _kernel_attention(q, k, Dv, idx, scale, sinks)
    out = q.new_empty(B, S, H, Dv)
    per_query = K * Hk * (D + (0 if isinstance(v, int) else Dv))
    compiling = torch.compiler.is_compiling()  # a compiled decode step masks unconditionally: no data-dependent branch
    # a compiled step (a few queries) is one chunk: a chunk size computed from B would make the batch size a constant
    # of the graph, and every new batch size a recompile
    chunk = S if compiling else max(1, GATHER_BUDGET // max(1, B * per_query))
    k_rows, per_b = _row_table(k)
    v_rows = None if isinstance(v, int) else _row_table(v)[0]
    grad = torch.is_grad_enabled() and (k_rows.requires_grad or q.requires_grad)
    # whole-selection work done once, not per chunk: row numbers in the table, which queries have empty slots (a
    # prefill's first K tokens; chunks without any skip the mask) and whether a query sees no key at all
    idx = idx.long()
    hidden = idx < 0
    rows_all = idx.clamp(min=0)
    if B > 1:
        rows_all = rows_all + (torch.arange(B, device=q.device) * per_b)[:, None, None]
    query_masked = hidden.any(-1).any(0)  # [S]
    no_key = sinks is None and (compiling or bool(hidden.all(-1).any()))
    q = q * scale  # folded into the query once instead of scaling every chunk's logits
    # inference: one gather buffer reused by every chunk (fresh pages per chunk would cost more than the copy)
    k_buf = None if grad else k_rows.new_empty(B * min(chunk, S) * K, k_rows.shape[1])
    for s0 in [0] if compiling else range(0, S, chunk):  # compiled: no Python loop over a symbolic S either
        sl = slice(s0, None if compiling else min(S, s0 + chunk))
        rows = rows_all[:, sl].reshape(-1)  # index_select copies whole rows: far faster than fancy indexing
        ks = k_rows.index_select(0, rows) if grad else torch.index_select(k_rows, 0, rows, out=k_buf[: rows.numel()])
        ks = ks.view(B, -1, K, Hk, D)  # [B, s, K, Hk, D]
        vs = ks[..., :Dv] if v_rows is None else v_rows.index_select(0, rows).view(B, -1, K, Hk, Dv)
        if Hk == 1:
            logits = torch.einsum("bshd,bskd->bshk", q[:, sl], ks[:, :, :, 0])
        else:
            logits = torch.einsum("bshd,bskhd->bshk", q[:, sl], ks)
        if compiling or bool(query_masked[sl].any()):
            logits = logits.masked_fill(hidden[:, sl, None, :], float("-inf"))
        if sinks is not None:
            sink = sinks[None, None, :, None].expand(*logits.shape[:3], 1)
            logits = torch.cat([logits, sink], dim=-1)  # promotes: fp32 sinks make fp32 logits, as in HF
        p = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if no_key:
            p = p.nan_to_num(0.0)  # a query with no key at all: all -inf row, NaN; it attends to nothing
        p = p.to(q.dtype)
        if sinks is not None:
            p = p[..., :-1]
        if Hk == 1:
            out[:, sl] = torch.einsum("bshk,bskd->bshd", p, vs[:, :, :, 0])
        else:
            out[:, sl] = torch.einsum("bshk,bskhd->bshd", p, vs)
    return out


def kernel_ready(q, k, v, sinks=None) -> bool:
    """Whether `sparse_attention` runs on the CPU kernel: shared key rows whose first channels are the values (MLA's
    latent), fp32 outside autocast and compiled graphs; under autograd only without sinks."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return (isinstance(v, int) and k.shape[2] == 1 and q.device.type == "cpu" and q.dtype == k.dtype == torch.float32
            and not torch.compiler.is_compiling() and not (grad and (sinks is not None
                                                                      or torch.is_autocast_enabled("cpu")))
            and kernels.load() is not None)


def _kernel_forward(q, k, Dv: int, idx, scale: float, sinks=None, keep_probs: bool = False):
    """The CPU kernel's forward over shared key rows (values = their first Dv channels), each query reading its
    selected rows in place, no gathered copy: (out [B,S,H,Dv], the softmax over each selection [B,S,H,K] or None,
    and the scaled queries, key row table, its row distance between sequences and selection it ran on)."""
    B, S, H, D = q.shape
    table, per_b = _row_table(k)
    if table.stride(1) != 1:
        table = table.contiguous()
    q, idx = (q * scale).contiguous(), idx.long().contiguous()
    K = idx.shape[-1]
    sinks = None if sinks is None else sinks.detach().float().contiguous()
    out = q.new_empty(B, S, H, Dv)
    probs = q.new_empty(B, S, H, K) if keep_probs else None
    lib = kernels.load()
    args = (q.data_ptr(), table.data_ptr(), table.stride(0), per_b, idx.data_ptr(), S, K, H, D, Dv,
            None if sinks is None else sinks.data_ptr(), out.data_ptr(), None if probs is None else probs.data_ptr())
    kernels.split_rows(lambda r0, r1: lib.dsa_sparse_attention(*args, r0, r1), B * S, torch.get_num_threads())
    return out, probs, (q, table, per_b, idx)


def _kernel_attention(q, k, Dv: int, idx, scale: float, sinks) -> torch.Tensor:
    """`sparse_attention` by the CPU kernel for inference (sinks allowed)."""
    return _kernel_forward(q, k, Dv, idx, scale, sinks)[0]


class LatentKernelAttention(torch.autograd.Function):
    """`sparse_attention` over shared latent rows under autograd, by the CPU kernels: the forward keeps the softmax
    over each query's selection ([B, S, H, K]); the backward reads the same rows again and adds every selected row's
    gradient (from all heads at once) into a buffer per thread, summed in thread order at the end (so, as with the
    GEMMs, the rounding depends on the thread count)."""

    @staticmethod
    def forward(ctx, q, k, Dv: int, idx, scale: float):
        """q [B,S,H,D], k [B,T,1,D] (values = first Dv channels), idx [B,S,K] → [B,S,H,Dv]."""
        out, probs, (qs, table, per_b, idx) = _kernel_forward(q, k, Dv, idx, scale, keep_probs=True)
        ctx.save_for_backward(qs, table, idx, probs)
        ctx.meta = (k.shape, per_b, Dv, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        qs, table, idx, probs = ctx.saved_tensors
        k_shape, per_b, Dv, scale = ctx.meta
        B, S, H, D = qs.shape
        K = idx.shape[-1]
        dout = dout.contiguous()
        dq = torch.empty_like(qs)
        threads = max(1, min(B * S, torch.get_num_threads()))
        bounds = kernels.even_bounds(B * S, threads)  # one part per thread, each with its own key-gradient buffer
        grads = table.new_zeros(threads, *table.shape)
        lib = kernels.load()
        args = (qs.data_ptr(), table.data_ptr(), table.stride(0), per_b, idx.data_ptr(), S, K, H, D, Dv,
                probs.data_ptr(), dout.data_ptr(), dq.data_ptr())
        kernels.run_parts(lambda i, r0, r1: lib.dsa_sparse_attention_bwd(*args, grads[i].data_ptr(), D, r0, r1),
                          bounds, threads)
        dk = grads[0]
        for g in grads[1:]:
            dk += g
        return dq.mul_(scale), _unrow_table(dk, k_shape, per_b), None, None, None


def _row_table(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [B, T, Hk, D] as a 2-D table of token rows and the row distance between sequences. A view into a larger
    buffer (the cache's first T of N slots) is used in place, so a decode step never copies the cache."""
    B, T, Hk, D = x.shape
    w = Hk * D
    if x.stride(3) == 1 and x.stride(2) == D and x.stride(1) == w and x.stride(0) % w == 0:
        per_b = x.stride(0) // w if B > 1 else T
        return x.as_strided(((B - 1) * per_b + T, w), (w, 1)), per_b
    return x.reshape(B * T, w), T


def _unrow_table(rows: torch.Tensor, shape, per_b: int) -> torch.Tensor:
    """A gradient laid out as `_row_table`'s table back in the shape [B, T, Hk, D] of the tensor it came from."""
    B, T = shape[0], shape[1]
    return rows.as_strided((B, T, rows.shape[1]), (per_b * rows.shape[1], rows.shape[1], 1)).reshape(shape)


def dense_attention(
    q: torch.Tensor,  # [B, S, H, D]
    k: torch.Tensor,  # [B, T, H or 1, D]
    v: torch.Tensor,  # [B, T, H or 1, Dv]
    mask: torch.Tensor | None,  # [B, S, T] bool, True = may attend; None = plain causal with S == T
    scale: float,
) -> torch.Tensor:  # [B, S, H, Dv]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.shape[2] != q.shape[2]  # one shared KV head (absorbed MLA) serving every query head
    if mask is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
        # a query with no visible key (padding) gets NaN from SDPA; it contributes nothing.
        o = o.nan_to_num(0.0)  # out of place: SDPA saves its output for backward
    return o.transpose(1, 2)
