"""DSA lightning indexer: which keys each query attends to.

Legend: B batch, S queries, T keys, Hi indexer heads, Di indexer head dim, p rope width, K = min(index_topk, T).
score[b,s,t] = Σ_h w[b,s,h] · ReLU(q[b,s,h]·k[b,t] · Di^-0.5), w = weights_proj(x) · Hi^-0.5, all fp32, masked before
top-k (HF `DeepseekV32Indexer`). Rope sits on the *leading* p dims of q and k (MLA puts it on the trailing dims):
half-split for DeepSeek-V3.2, interleaved for GLM. Scoring is chunked over queries so [B,S,Hi,T] never exists at once;
long rows are narrowed to a few candidates by an exact threshold before the top-k (`topk_set`). On CPU both run fused,
one query row at a time, in the `kernels` C++ kernel (the `dsalite::indexer_topk` operator), which selects the same set.
HF runs the indexer under no_grad; so does inference here. Training reads the scores through `index_scores`.
"""

from __future__ import annotations

import torch
from torch import nn

from dsalite import kernels
from dsalite.layers.linear import Linear
from dsalite.layers.rope import apply_rope

# Queries per chunk are chosen so one chunk's [B, s, Hi, T] score block stays near this many fp32 elements.
SCORE_BUDGET = 1 << 21
# Rows at least this many times longer than K are narrowed by the threshold filter of `topk_set` first.
FILTER_MIN_RATIO = 4
# ... and only in blocks of at least this many rows: the filter's twenty-odd small ops cost more than they save on
# the one row per sequence of a decode step.
FILTER_MIN_ROWS = 16
# Query rows per call of the CPU kernel (`kernels`): bounds the [rows, keys] visibility block it is handed.
KERNEL_ROWS = 256


class Indexer(nn.Module):
    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int, topk: int,
                 rope_interleaved: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.topk = n_heads, head_dim, rope_dim, topk
        self.rope_interleaved = rope_interleaved
        self.wq_b = Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = Linear(dim, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)  # with bias, eps fixed (HF)
        self.weights_proj = Linear(dim, n_heads, bias=False)

    def project(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B,S,Hi,Di], k [B,S,Di], w [B,S,Hi] (fp32, with Hi^-0.5) for the new tokens."""
        B, S, _ = x.shape
        p = self.rope_dim
        q = self.wq_b(q_resid).view(B, S, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        q = torch.cat([apply_rope(q[..., :p], cos[:, :, None], sin[:, :, None], self.rope_interleaved), q[..., p:]], -1)
        k = torch.cat([apply_rope(k[..., :p], cos, sin, self.rope_interleaved), k[..., p:]], -1)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
        return q, k, w

    def select(self, q, k, w, allowed, key_range=None, key_tiles=None) -> torch.Tensor:
        """Top-k key indices [B,S,K] (int64, -1 where fewer than K keys are visible)."""
        return topk_indices(q, k, w, allowed, self.topk, self.head_dim**-0.5, key_range, key_tiles)


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """Unmasked scores for one query block: q [B,s,Hi,Di], k [B,T,Di], w [B,s,Hi] → [B,s,T] fp32."""
    B, s, Hi, Di = q.shape
    # one GEMM over all (query, head) rows instead of a batch of tiny ones
    sc = torch.bmm(q.float().reshape(B, s * Hi, Di), k.float().transpose(-1, -2)).view(B, s, Hi, -1)  # [B, s, Hi, T]
    sc = torch.relu_(sc)
    return torch.einsum("bsh,bsht->bst", w * scale, sc)  # ReLU(x·scale) = scale·ReLU(x) for scale > 0


def topk_indices(q, k, w, allowed, topk: int, scale: float, key_range=None, key_tiles=None) -> torch.Tensor:
    """allowed: callable (s0, s1, k0, k1) -> [B or 1, s1-s0, k1-k0] bool mask of keys k0..k1-1 for that query block.
    key_range: optional callable (s0, s1) -> (k0, k1): the block's queries all see the keys before k0 and none from k1
    on (causal order, `Visibility.key_range`); later keys are neither scored nor ranked, which halves the work of a
    causal prefill, and only keys k0..k1-1 are masked.
    On CPU the fused kernel (`kernels`, through the `dsalite::indexer_topk` op) scores and selects; key_tiles are the
    keys already in its layout (`tile_keys`, kept by the latent cache), which a compiled decode step needs to use it.
    Without them a compiled step, other devices, or a machine without the kernel take the PyTorch path, and so does a
    compiled step with less scoring work than `kernels.COMPILED_MIN_WORK` (there the fused in-graph ops cost less than
    the call out of the graph)."""
    B, S = q.shape[:2]
    T = k.shape[1]
    K = min(topk, T)
    compiling = torch.compiler.is_compiling()
    work = B * S * q.shape[2] * q.shape[3] * T
    if q.device.type == "cpu" and K > 0 and (kernels.available() if compiling else kernels.load() is not None) and (
            not compiling or (key_tiles is not None and work >= kernels.COMPILED_MIN_WORK)):
        tiles = tile_keys(k) if key_tiles is None else key_tiles
        qf, wf = q.detach().float(), (w.detach().float() * scale)
        picks = [torch.ops.dsalite.indexer_topk(qf[:, s0:s1], wf[:, s0:s1], tiles, k0, k1, mask, K)
                 for s0, s1, k0, k1, mask in _query_blocks(S, S if S <= KERNEL_ROWS else KERNEL_ROWS, T, allowed,
                                                           key_range)]
        return picks[0] if len(picks) == 1 else torch.cat(picks, 1)
    out = torch.full((B, S, K), -1, dtype=torch.long, device=q.device)
    per_query = B * q.shape[2] * T
    # one block when it fits; always in a compiled step (a few queries), where a size test would put the rows and the
    # keys into the graph's guards and recompile it as a server's batch grows
    chunk = S if torch.compiler.is_compiling() or S * per_query <= SCORE_BUDGET else max(1, SCORE_BUDGET // per_query)
    for s0, s1, k0, k1, mask in _query_blocks(S, chunk, T, allowed, key_range):
        ids = _rank(q[:, s0:s1], k[:, :k1], w[:, s0:s1], scale, k0, mask, min(K, k1))
        out[:, s0:s1, : ids.shape[-1]] = ids
    return out


def _query_blocks(S: int, chunk: int, T: int, allowed, key_range):
    """(s0, s1, k0, k1, mask) for each block of `chunk` queries: the keys k1.. are invisible to the whole block, the
    keys ..k0 visible to all of it, and mask ([B or 1, s1-s0, k1-k0] bool, None when k0 = k1) covers the rest."""
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        k0, k1 = (0, T) if key_range is None else key_range(s0, s1)
        k1 = min(T, max(1, k1))
        k0 = max(0, min(k0, k1))
        yield s0, s1, k0, k1, (allowed(s0, s1, k0, k1) if k0 < k1 else None)


def _rank(q, k, w, scale: float, k0: int, mask, K: int) -> torch.Tensor:
    """Top-K key indices [B, s, K] of one query block (-1 for hidden keys) by PyTorch ops."""
    B, s = q.shape[:2]
    sc = index_scores(q, k, w, scale)  # [B, s, k1]
    if mask is not None:
        sc[..., k0:].masked_fill_(~mask, float("-inf"))
    flat = sc.view(B * s, -1)
    val, ids = topk_set(flat, K)
    return ids.masked_fill_(val == float("-inf"), -1).view(B, s, -1)


TILE = 64  # keys per tile of the kernel's key layout


def tile_keys(k: torch.Tensor) -> torch.Tensor:
    """Keys [B, T, Di] in the kernel's layout [B, ceil(T/64), Di, 64] (fp32, zero-padded): one tile of 64 keys is one
    contiguous block, read as 16-wide vectors along the keys."""
    B, T, Di = k.shape
    tiles = -(-T // TILE)
    kt = torch.zeros(B, tiles * TILE, Di, dtype=torch.float32, device=k.device)
    kt[:, :T] = k.detach()
    return kt.view(B, tiles, TILE, Di).transpose(2, 3).contiguous()


# The kernel as an operator, so a compiled graph can call it (opaque, shape from the fake); defined through
# torch.library.Library: its dispatch costs ≈ 4 µs a call against ≈ 10 µs for a custom_op wrapper, once per layer and
# decode step.
_LIB = torch.library.Library("dsalite", "DEF")
_LIB.define("indexer_topk(Tensor q, Tensor w, Tensor tiles, SymInt k0, SymInt k1, Tensor? mask, int K) -> Tensor")


def indexer_topk(q: torch.Tensor, w: torch.Tensor, tiles: torch.Tensor, k0: int, k1: int,
                 mask: torch.Tensor | None, K: int) -> torch.Tensor:
    """The fused CPU kernel on one query block: q [B,s,Hi,Di] and w [B,s,Hi] (score scale folded in) fp32, keys
    0..k1-1 in `tile_keys` layout, mask [B or 1, s, k1-k0] for keys k0..k1-1 (None: all visible). Returns [B, s, K]
    key indices, ascending per row, -1 after the min(K, k1) picks. A row whose K-th score ties with a key left out is
    ranked the way torch.topk's CPU kernel ranks its whole row, so the choice among equal scores is HF's."""
    lib = kernels.load()
    B, s, Hi, Di = q.shape
    q, w = q.contiguous(), w.contiguous()
    mask = None if mask is None else mask.contiguous()
    out = torch.empty(B, s, K, dtype=torch.long)
    mask_b = 0 if mask is None or mask.shape[0] == 1 else s * (k1 - k0)
    args = (q.data_ptr(), w.data_ptr(), tiles.data_ptr(), tiles.stride(0), B, s, Hi, Di, k0, k1,
            None if mask is None else mask.data_ptr(), mask_b, k1 - k0, min(K, k1), out.data_ptr(), K)
    kernels.split_rows(lambda r0, r1: lib.dsa_select(*args, r0, r1), s, torch.get_num_threads())
    return out


_LIB.impl("indexer_topk", indexer_topk, "CPU")


@torch.library.register_fake("dsalite::indexer_topk")
def _(q, w, tiles, k0, k1, mask, K):
    return q.new_empty((q.shape[0], q.shape[1], K), dtype=torch.long)


def topk_set(sc: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K largest entries of each row of sc [R, T] (fp32, -inf = hidden) as (values, indices) [R, K], unordered:
    the set torch.topk picks (up to which of equal values at the boundary).

    Ranking a row costs torch.topk about 8 ns per entry, a compare well under 1 ns, so long rows are filtered first.
    Split the row into G = 2K strided groups (entries j, j+G, j+2G, ...) and let τ be the K-th largest group maximum:
    K groups each hold an entry ≥ τ, so the row's K-th largest entry is ≥ τ and every entry of the top K is ≥ τ. Only
    the entries ≥ τ (about 1.4·K for unstructured scores, whatever T) are gathered and ranked. Exact by construction;
    rows with fewer than K visible entries (τ = -inf) take the plain path."""
    R, T = sc.shape
    G = 2 * K
    if torch.compiler.is_compiling() or K == 0 or T < FILTER_MIN_RATIO * K or R < FILTER_MIN_ROWS:
        return sc.topk(K, dim=-1, sorted=False)
    sc = sc.contiguous()
    m = T // G
    group_max = sc.as_strided((R, m, G), (T, G, 1)).amax(1)  # [R, G]
    tau = group_max.topk(K, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [R, 1]
    if bool(torch.isneginf(tau).any()):
        return sc.topk(K, dim=-1, sorted=False)
    hit = (sc >= tau).view(-1).nonzero().squeeze(1)  # flat positions of the candidates, row by row
    row = torch.div(hit, T, rounding_mode="floor")
    count = torch.bincount(row, minlength=R)  # >= K in every row
    C = int(count.max())
    slot = row * C + torch.arange(hit.numel(), device=sc.device) - (count.cumsum(0) - count).repeat_interleave(count)
    cand = sc.new_full((R * C,), float("-inf")).index_copy_(0, slot, sc.view(-1).index_select(0, hit))
    cand_idx = torch.zeros(R * C, dtype=torch.long, device=sc.device).index_copy_(0, slot, hit - row * T)
    val, j = cand.view(R, C).topk(K, dim=-1, sorted=False)
    return val, cand_idx.view(R, C).gather(1, j)
