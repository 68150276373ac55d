"""DeepSeek-V4 KV compressors: HCA (one entry per m' tokens), CSA (overlapping windows) and CSA's own indexer.

Legend: B batch, S tokens, D hidden, c entry width (head_dim, or index_head_dim for the indexer), m tokens per entry,
W = S // m complete windows (an incomplete tail makes no entry), p rope width, Hi/Di indexer heads/width.
Entry w pools its window with a per-channel softmax over the slots of gate + position_bias (fp32 softmax), then
kv_norm, then rope on the trailing p dims at position w·m (HF `DeepseekV4{HCA,CSA}Compressor`).
CSA projects 2c channels, two series: Ca = [:c], Cb = [c:]; entry w pools window w−1's Ca and window w's Cb over 2m
slots (stride m); window 0 has no predecessor, its Ca slots get gate −inf (weight 0).
Query at position t may see entry w iff w < (t+1) // m — the entry's last token is at or before t.
Without a cache every call compresses the complete windows of the tokens it is given, from position 0 (the
incomplete tail is dropped). With one (`state`, a `families.deepseek_v4.cache.Step`), each row's pending tokens of
earlier calls are completed first (its padding skipped), window 0 of this call pools the row's previous last
window's Ca, entries are roped at the row's own positions and appended: chunked calls give the entries of one call
over all the tokens, and a left-padded row the entries it has alone.
Packed documents (`segments`, training): windows restart at each document's first token, each document is
compressed as if it ran alone (window 0 without a predecessor, entries roped at in-document positions, an incomplete
tail at the document's end makes no entry, exactly as at the end of a sequence), and a query sees only its own
document's entries. Entries then carry where they end: `ends` [B, W] (in-document position of the last pooled token)
and `docs` [B, W] (the document id, −1 for row padding).
"""

from __future__ import annotations

import torch
from torch import nn

from dsalite.layers.indexer import topk_indices
from dsalite.layers.linear import Linear
from dsalite.layers.norm import RMSNormF32
from dsalite.layers.rope import apply_rope_trailing, cos_sin


class Compressor(nn.Module):
    def __init__(self, dim: int, width: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.width, self.ratio, self.overlap = width, ratio, overlap
        series = 2 if overlap else 1
        self.kv_proj = Linear(dim, series * width, bias=False)
        self.gate_proj = Linear(dim, series * width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(ratio, series * width))
        self.kv_norm = RMSNormF32(width, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, float], state=None) -> torch.Tensor:
        """x [B,S,D] → entries [B,W,c] (with a state: every entry so far); rope = (inv_freq, scale) of the
        compress rope."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)  # [B, S, series·c]
        if state is None:
            n = kv.shape[1] // self.ratio * self.ratio
            return self.pool(kv[:, :n], gate[:, :n], 0, None, rope)
        kv, gate, first, prev, n = state.windows(kv, gate, self.ratio)
        return state.append(self.pool(kv, gate, first, prev, rope), n, self.ratio)

    def documents(self, x: torch.Tensor, rope, segments: torch.Tensor):
        """Packed rows x [B,S,D], segments [B,S] → (entries [B,W,c], ends [B,W], docs [B,W]), W the most entries
        of a row; each document pooled alone."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        B, m = x.shape[0], self.ratio
        rows = []
        for b in range(B):
            cut = (segments[b, 1:] != segments[b, :-1]).nonzero().flatten().add(1).tolist()
            parts = []
            for a, e in zip([0] + cut, cut + [x.shape[1]]):
                n = (e - a) // m * m
                if n:
                    ent = self.pool(kv[b : b + 1, a : a + n], gate[b : b + 1, a : a + n], 0, None, rope)[0]
                    parts.append((ent, segments[b, a]))
            rows.append(parts)
        W = max([sum(p[0].shape[0] for p in parts) for parts in rows] + [0])
        entries = kv.new_zeros(B, W, self.width)
        ends = torch.full((B, W), torch.iinfo(torch.long).max, dtype=torch.long, device=x.device)
        docs = torch.full((B, W), -1, dtype=torch.long, device=x.device)
        for b, parts in enumerate(rows):
            w = 0
            for ent, doc in parts:
                n = ent.shape[0]
                entries[b, w : w + n] = ent
                ends[b, w : w + n] = torch.arange(1, n + 1, device=x.device) * m - 1
                docs[b, w : w + n] = doc
                w += n
        return entries, ends, docs

    def pool(self, kv, gate, first, prev, rope) -> torch.Tensor:
        """Whole windows kv, gate [B, W·m, series·c] (gate without bias) → entries [B, W, c] for entries first..
        (an int, or [B] per row); prev = (kv, gate) [B, m, c] of the Ca half of the window before them (CSA; gate
        −inf where a row has none), or None."""
        B = kv.shape[0]
        m, c = self.ratio, self.width
        W = kv.shape[1] // m
        if W == 0:
            return kv.new_zeros(B, 0, c)
        kv = kv.view(B, W, m, -1)
        gate = gate.view(B, W, m, -1) + self.position_bias
        if self.overlap:
            prev_kv = kv.new_zeros(B, W, m, c)
            prev_gate = gate.new_full((B, W, m, c), float("-inf"))
            prev_kv[:, 1:] = kv[:, :-1, :, :c]
            prev_gate[:, 1:] = gate[:, :-1, :, :c]
            if prev is not None:
                prev_kv[:, 0] = prev[0]
                prev_gate[:, 0] = prev[1] + self.position_bias[:, :c]
            kv = torch.cat([prev_kv, kv[..., c:]], dim=2)  # [B, W, 2m, c]
            gate = torch.cat([prev_gate, gate[..., c:]], dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)  # [B, W, c]
        entries = self.kv_norm(pooled)
        w = torch.arange(W, device=kv.device)
        w = first[:, None] + w if isinstance(first, torch.Tensor) else first + w
        cos, sin = cos_sin(rope[0], w * m, rope[1], entries.dtype)
        return apply_rope_trailing(entries, cos, sin)  # cos, sin [W or B×W, p/2]


def entry_visible(positions: torch.Tensor, n_entries: int, ratio: int, packed=None) -> torch.Tensor:
    """[B,S] positions → [B,S,W] bool: entry w is complete by the query's position. packed = (segments [B,S],
    ends [B,W], docs [B,W]) of packed documents: an entry of the query's own document ending at or before it."""
    if packed is None:
        w = torch.arange(n_entries, device=positions.device)
        return w < ((positions + 1) // ratio)[..., None]
    segments, ends, docs = packed
    return (ends[:, None, :] <= positions[..., None]) & (docs[:, None, :] == segments[..., None])


class Scorer(nn.Module):
    """Holds the indexer's head weights w = weights_proj(x) (HF keeps them under `indexer.scorer`)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.weights_proj = Linear(dim, n_heads, bias=False)


class CSAIndexer(Compressor):
    """Same as the CSA compressor at width Di, plus queries from the attention's q residual and head weights:
    score[t,w] = Σ_h w_h·ReLU(q_h·k_w)·Di^-0.5, w_h = weights_proj(x)_h·Hi^-0.5 (fp32); future entries masked;
    top `index_topk` entries, −1 where fewer are visible (HF `DeepseekV4Indexer`). Same math as the MLA-family
    indexer's scoring, so it reuses `topk_indices`."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, ratio: int, topk: int, eps: float):
        super().__init__(dim, head_dim, ratio, overlap=True, eps=eps)
        self.n_heads, self.topk = n_heads, topk
        self.q_b_proj = Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.scorer = Scorer(dim, n_heads)

    def queries(self, x, q_resid, cos, sin):
        """q [B,S,Hi,Di] roped at the query positions, w [B,S,Hi] fp32 with Hi^-0.5."""
        B, S, _ = x.shape
        q = self.q_b_proj(q_resid).view(B, S, self.n_heads, self.width)
        q = apply_rope_trailing(q, cos[:, :, None], sin[:, :, None])
        w = self.scorer.weights_proj(x).float() * self.n_heads**-0.5
        return q, w

    @torch.no_grad()
    def select(self, x, q_resid, cos, sin, positions, rope, state=None, segments=None) -> torch.Tensor:
        """Entry indices [B,S,K] (int64, −1 = none), K = min(index_topk, W); segments: packed documents."""
        k, packed = self.keys(x, rope, state, segments)
        q, w = self.queries(x, q_resid, cos, sin)
        return self.pick(q, k, w, positions, packed)

    def keys(self, x, rope, state=None, segments=None):
        """The indexer's own entries k [B,W,Di] and, for packed documents, (segments, ends, docs) (else None)."""
        if segments is None:
            return self(x, rope, state), None
        k, ends, docs = self.documents(x, rope, segments)
        return k, (segments, ends, docs)

    def visible(self, positions, n_entries: int, packed):
        """allowed(s0, s1, k0=0, k1=W) → [B, s1−s0, k1−k0]: which entries queries s0..s1−1 may see."""
        def allowed(s0, s1, k0=0, k1=n_entries):
            if packed is not None:
                seg, ends, docs = packed
                return entry_visible(positions[:, s0:s1], n_entries, self.ratio,
                                     (seg[:, s0:s1], ends[:, k0:k1], docs[:, k0:k1]))
            return entry_visible(positions[:, s0:s1], n_entries, self.ratio)[..., k0:k1]

        return allowed

    @torch.no_grad()
    def pick(self, q, k, w, positions, packed) -> torch.Tensor:
        return topk_indices(q, k, w, self.visible(positions, k.shape[1], packed), self.topk, self.width**-0.5)


class CSACompressor(Compressor):
    """Overlapping-window compressor with its indexer: each query sees only the entries the indexer picks."""

    def __init__(self, dim: int, head_dim: int, ratio: int, eps: float, q_lora_rank: int, index_n_heads: int,
                 index_head_dim: int, index_topk: int):
        super().__init__(dim, head_dim, ratio, overlap=True, eps=eps)
        self.indexer = CSAIndexer(dim, q_lora_rank, index_n_heads, index_head_dim, ratio, index_topk, eps)

    def entries(self, x, q_resid, cos, sin, positions, rope, states=None, segments=None, dsa=None, q_main=None,
                layer_idx: int = -1):
        """(entries [B,W,c], per-query entry indices [B,S,K] with −1 = none); states: the layer's
        {"compressor", "indexer"} cache states or None; segments: packed documents (no cache). dsa (training's
        DSATraining) with q_main [B,S,H,c], the attention's roped queries: the indexer's KL term is recorded."""
        own, idx = (None, None) if states is None else (states["compressor"], states["indexer"])
        e = self(x, rope, own) if segments is None else self.documents(x, rope, segments)[0]
        if dsa is None:
            return e, self.indexer.select(x, q_resid, cos, sin, positions, rope, idx, segments)
        return e, self._train_indexer(e, x, q_resid, cos, sin, positions, rope, segments, dsa, q_main, layer_idx)

    def _train_indexer(self, e, x, q_resid, cos, sin, positions, rope, segments, dsa, q_main, layer_idx):
        """Picks for a training forward, and the indexer's KL term against the attention's distribution over the
        compressed entries. The teacher: per head, the attention logits q·e·c^-0.5 of the visible entries under a
        softmax of their own (the entry part of the joint window + entries + sink softmax, renormalised — the
        window keys and the sink are not the indexer's to choose), summed over heads and L1-normalised; detached.
        The indexer sees detached inputs, so nothing else learns from its loss (Megatron-Core's isolation).
        Dense warm-up (`dsa.dense_attention`): attention over every visible entry, KL over all of them."""
        ix = self.indexer
        k, packed = ix.keys(x.detach(), rope, None, segments)
        q, w = ix.queries(x.detach(), q_resid.detach(), cos, sin)
        W = k.shape[1]
        allowed = ix.visible(positions, W, packed)
        if dsa.dense_attention:
            picks = torch.arange(W, device=x.device).expand(*positions.shape, W)
            picks = picks.masked_fill(~allowed(0, positions.shape[1]), -1)
        else:
            picks = ix.pick(q, k, w, positions, packed)
        q_t, e_t, scale = q_main.detach(), e.detach(), q_main.shape[-1] ** -0.5

        def teacher(s0: int, s1: int) -> torch.Tensor:  # [B, s, H, W]
            return torch.einsum("bshc,bwc->bshw", q_t[:, s0:s1], e_t).float() * scale

        sel = None if dsa.dense_attention or not dsa.sparse_target else picks
        dsa.add_term(layer_idx, q, k, w, ix.width**-0.5, teacher, allowed, sel, q_main.shape[2])
        return picks


class HCACompressor(Compressor):
    """Non-overlapping compressor; each query sees every complete entry (dense over S/m')."""

    def __init__(self, dim: int, head_dim: int, ratio: int, eps: float):
        super().__init__(dim, head_dim, ratio, overlap=False, eps=eps)

    def entries(self, x, q_resid, cos, sin, positions, rope, states=None, segments=None):
        packed = None
        if segments is None:
            e = self(x, rope, None if states is None else states["compressor"])
        else:
            e, ends, docs = self.documents(x, rope, segments)
            packed = (segments, ends, docs)
        W = e.shape[1]
        idx = torch.arange(W, device=x.device).expand(*positions.shape, W)
        return e, idx.masked_fill(~entry_visible(positions, W, self.ratio, packed), -1)
