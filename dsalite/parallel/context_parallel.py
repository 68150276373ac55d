"""Context parallel for DSA: every sequence split over the `cp` ranks, each rank's queries scored against all keys.

Legend: B batch, T tokens of a sequence (data.seq_len), C = cp ranks, S = T / C queries per rank, F per-token width,
c = T / (2C) tokens per chunk.

The split is zigzag (load-balanced for causal attention): the sequence is cut into 2C chunks and rank i holds chunks
i and 2C-1-i, so every rank has one early and one late chunk and the same number of causal query-key pairs.
Positions and document ids are derived for the whole window first (training/data.py) and split with it, so a rope
position and a document boundary mean the same on every rank.

What crosses ranks is only the compact per-token state every query reads: MLA's latent [c_kv | k_rope] (r + p per
token, one copy for all heads) and, on full-indexer layers, the indexer key (Di per token). Keys and values are never
expanded before the gather: each rank expands or absorbs (mla.py) from the gathered latents itself. The gather is an
autograd function: forward all-gathers the S local rows of every rank into the sequence's T rows, backward
reduce-scatters the gradient of the T rows, so each token's gradient (summed over the queries of every rank that read
it) lands on the rank that computed it. Top-k selection, sparse attention, the indexer KL loss (dense warm-up and
sparse stage) and IndexShare's reuse of a top-k then run on the local queries unchanged, with key indices in the
sequence's own numbering.

How it reaches the model without the model knowing (torchtitan's rule): `apply_context_parallel` wraps the model's
`context` method, which every forward (trunk and MTP) calls to build its per-call `Context`; the wrapped one swaps in
`SplitVisibility` (which keys each local query sees: causal order, padding and documents of the whole sequence) and
sets `Context.gather` (mla.py gathers latents and indexer keys through it; it is None in one process, where nothing
changes). The trainer feeds the model this rank's queries (`ZigzagSplit.take` of token ids, positions, labels) and
the *whole* window's document ids (the keys'). Nothing here holds per-batch state: the split depends only on T and
the rank.

Not supported (refused by name before any work, `check`): DeepSeek-V4 (its sliding window and compressed CSA/HCA
entries would need the window's and the compressors' state across chunk boundaries), pipeline parallel together with
cp, more than one MTP depth (depth d shifts the ids along the whole sequence), a sequence length that does not split
into 2C chunks. The sequence-level balance loss, a per-sequence statistic, sums its parts over the cp ranks
(`ZigzagSplit.sequence_sum`, used by the trainer's router hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dsalite.layers.mask import Visibility
from dsalite.parallel.mesh import LayoutError


def zigzag_index(seq_len: int, rank: int, size: int) -> torch.Tensor:
    """The token indices rank `rank` of `size` holds, ascending: chunks rank and 2·size-1-rank of 2·size."""
    c = seq_len // (2 * size)
    a, b = rank * c, (2 * size - 1 - rank) * c
    return torch.cat([torch.arange(a, a + c), torch.arange(b, b + c)])


def check(r, cfg, layout) -> None:
    """Named LayoutErrors for what context parallel cannot run; called by `parallel.check_recipe` when cp > 1."""
    C = layout.cp
    if cfg.model_type == "deepseek_v4" or cfg.hyper:
        raise LayoutError(f"parallel.cp={C}: context parallelism is not implemented for DeepSeek-V4 (its sliding "
                          "window and compressed CSA/HCA entries would need the window and compressor state across "
                          "the chunk boundaries); set cp = 1")
    if layout.pp > 1:
        raise LayoutError(f"parallel.cp={C} with parallel.pp={layout.pp}: context and pipeline parallelism do not "
                          "combine yet; use one of them")
    T = r.data.seq_len
    if T % (2 * C):
        raise LayoutError(f"data.seq_len={T} does not split into 2 × parallel.cp = {2 * C} equal chunks (context "
                          "parallel's zigzag split); choose a multiple of it")
    if r.train.mtp_coeff > 0 and cfg.num_nextn_predict_layers > 1:
        raise LayoutError(f"parallel.cp={C} with {cfg.num_nextn_predict_layers} MTP depths: depth d > 0 shifts the "
                          "token ids along the whole sequence, which a rank's chunks do not hold; train one MTP depth "
                          "(num_nextn_predict_layers = 1) or set train.mtp_coeff = 0")


def state_widths(cfg, mtp: bool = True) -> tuple[list[int], list[int]]:
    """Per layer (trunk, then MTP): the values per token that context parallel gathers (the latent r + p, plus the
    indexer key Di on full-indexer layers), and what gathering expanded keys and values would take instead (H·(n + p)
    keys and H·v values per token, plus the same indexer key)."""
    L = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    Di = [cfg.index_head_dim if cfg.layer_indexer_type(i) == "full" else 0 for i in range(L)]
    H, n, p, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    return [cfg.kv_lora_rank + p + d for d in Di], [H * (n + p + v) + d for d in Di]


def gather_bytes(cfg, tokens: int, cp: int, dtype_bytes: int, recompute: bool = False) -> int:
    """Bytes one rank receives in the all-gathers and sends in the reduce-scatters of one training step, for
    `tokens` local tokens: every layer's compact state of the other cp - 1 ranks' tokens in forward (once more with
    activation recompute, when backward reruns a block's forward) and their gradients back in backward."""
    compact, _ = state_widths(cfg)
    return int((3 if recompute else 2) * (cp - 1) * tokens * sum(compact) * dtype_bytes)


@dataclass
class SplitVisibility(Visibility):
    """`Visibility` for queries that are some tokens of the sequence (query i is token `query_index[i]`), against all
    T tokens as keys: causal order by token index, padding and documents of the whole sequence ([B, T] tensors)."""

    query_index: torch.Tensor | None = None  # [S] long: the token each query is
    runs: list = field(default_factory=list)  # the same as ascending python ints (key ranges without a sync)

    @property
    def plain_causal(self) -> bool:
        return False

    def key_range(self, s0: int, s1: int) -> tuple[int, int]:
        qs = self.runs[s0:s1]
        k1 = min(self.num_keys, max(qs) + 1)
        plain = not self.hides_keys and self.segments is None
        return (min(k1, min(qs) + 1) if plain else 0), k1

    def _make(self, s0: int, s1: int, k0: int, k1: int) -> torch.Tensor:
        dev = self.key_valid.device if self.key_valid is not None else (
            self.segments.device if self.segments is not None else self.device)
        qi = self.query_index[s0:s1].to(dev)
        ki = torch.arange(k0, k1, device=dev)
        m = (ki[None, :] <= qi[:, None])[None]
        if self.key_valid is not None:
            m = m & self.key_valid[:, None, k0:k1]
        if self.segments is not None:
            m = m & (self.segments[:, qi, None] == self.segments[:, None, k0:k1])
        return m


class ZigzagSplit:
    """This rank's share of every sequence: which tokens it holds (`index`), taking them from whole-window tensors
    (`take`), gathering per-token state of every rank back into sequence order (`gather`, differentiable)."""

    def __init__(self, seq_len: int, rank: int, size: int, group):
        if seq_len % (2 * size):
            raise LayoutError(f"data.seq_len={seq_len} does not split into 2 × parallel.cp = {2 * size} equal chunks")
        self.seq_len, self.rank, self.size, self.group = seq_len, rank, size, group
        self.index = zigzag_index(seq_len, rank, size)  # [S]
        order = torch.cat([zigzag_index(seq_len, i, size) for i in range(size)])  # token of each gathered row
        self.order, self.inverse = order, torch.argsort(order)  # gathered row of each token
        self.runs = self.index.tolist()
        self._on = {}

    def on(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, order, inverse) on `device` (moved once)."""
        key = str(device)
        if key not in self._on:
            self._on[key] = tuple(t.to(device) for t in (self.index, self.order, self.inverse))
        return self._on[key]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a whole-window tensor [B, T, ...] → [B, S, ...]."""
        if t.shape[1] != self.seq_len:
            raise ValueError(f"context parallel: expected a whole window of {self.seq_len} tokens along dim 1, got "
                             f"shape {tuple(t.shape)}")
        return t.index_select(1, self.on(t.device)[0])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token state of this rank's tokens [B, S, ...] → every token's [B, T, ...] in sequence order."""
        return GatherSequence.apply(x, self)

    def sequence_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks sharing the sequences (a per-sequence statistic of the local tokens → the whole
        sequence's), differentiable: the gradient of the sum reaches every rank's part."""
        return SumOverSequence.apply(x, self.group)

    def visibility(self, vis: Visibility) -> SplitVisibility:
        """The model's visibility for this call (built as if the S local tokens were the sequence; its padding mask
        and document ids are the whole window's) as the split's: local queries against all T keys."""
        S, T = len(self.runs), self.seq_len
        for name in ("key_valid", "segments"):
            t = getattr(vis, name)
            if t is not None and t.shape[-1] != T:
                raise ValueError(f"context parallel: {name} must cover the whole window ({T} tokens: the keys), got "
                                 f"shape {tuple(t.shape)}")
        if vis.num_queries != S or vis.offset:
            raise ValueError(f"context parallel: expected this rank's {S} tokens without a cache, got "
                             f"{vis.num_queries} queries at offset {vis.offset}")
        return SplitVisibility(S, T, 0, vis.key_valid, vis.segments, vis.device, self.index, self.runs)


def _collective(name: str, older: str):
    """torch.distributed's function by its current name (torch >= 2.13), else its older one; looked up at each call,
    so a wrapper installed on torch.distributed (bench/parallel.py counts bytes that way) sees it."""
    return getattr(dist, name, None) or getattr(dist, older)


class GatherSequence(torch.autograd.Function):
    """[B, S, ...] on each of the C ranks → [B, T, ...] in sequence order on all of them; backward: the gradient of
    the T rows reduce-scattered (summed over ranks) back to the rows' owners."""

    @staticmethod
    def forward(ctx, x, split: ZigzagSplit):
        ctx.split = split
        C, B = split.size, x.shape[0]
        buf = x.new_empty((C * B, *x.shape[1:]))  # [C·B, S, ...]: rank after rank along dim 0 (gloo's layout)
        _collective("all_gather_single", "all_gather_into_tensor")(buf, x.contiguous(), group=split.group)
        rows = buf.view(C, *x.shape).transpose(0, 1).reshape(B, C * x.shape[1], *x.shape[2:])  # [B, C·S, ...]
        return rows.index_select(1, split.on(x.device)[2])  # rows in `order` → sequence order

    @staticmethod
    def backward(ctx, g):
        split = ctx.split
        C, B = split.size, g.shape[0]
        parts = g.index_select(1, split.on(g.device)[1])  # [B, C·S, ...] rows in `order`
        parts = parts.view(B, C, -1, *g.shape[2:]).transpose(0, 1).reshape(C * B, -1, *g.shape[2:])  # [C·B, S, ...]
        out = g.new_empty((B, *parts.shape[1:]))
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, parts, group=split.group)
        return out, None


class SumOverSequence(torch.autograd.Function):
    """All-reduce (sum) over the cp group; backward: the same for the gradient (every rank's output is the sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def apply_context_parallel(model, split: ZigzagSplit) -> None:
    """Wrap `model.context` (every trunk and MTP forward builds its `Context` through it) so that the call's queries
    are this rank's tokens of the sequence: their visibility against all T keys, and `Context.gather` set."""
    cfg = model.cfg
    if cfg.model_type == "deepseek_v4" or cfg.hyper:
        raise LayoutError("context parallelism is not implemented for DeepSeek-V4 (sliding window + compressed "
                          "entries); set parallel.cp = 1")
    plain = model.context

    def context(input_ids, positions, vis, *args, **kwargs):
        ctx = plain(input_ids, positions, split.visibility(vis), *args, **kwargs)
        if ctx.cache is not None:
            raise ValueError("context parallel splits training sequences; a decode cache is not supported")
        ctx.gather = split.gather
        return ctx

    model.context = context
