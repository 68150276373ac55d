"""The serving model runner: block tables -> slot indices -> one model call; the only serving code with tensors.

Legend: B rows, S new tokens per row, T keys per row, bs block size, c_b tokens row b has cached, V vocabulary.
A call feeds S tokens to each of B sequences (a prefill chunk: B = 1; a decode step: S = 1, every decoding
sequence; a speculative step: S = 2, the newest token and its draft). Row b's keys are its c_b + S tokens, aligned at
the end of T = max(c_b) + S; its first T − c_b − S keys are hidden by the mask (see paged_cache.py), so each row
sees exactly its own tokens, as if it ran alone. The MTP drafter's call over the same rows uses the same layout, so
the top-k its IndexShare source layer chose (key columns of that layout) applies to it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsalite.indexshare import NOT_GIVEN
from dsalite.inference.runner import compiled
from dsalite.inference.serve.paged_cache import PagedLatentCache
from dsalite.inference.speculative import draft_logits
from dsalite.layers.mask import Visibility

Rows = list[tuple[list[int], int, list[int]]]  # (block table, cached tokens, S new token ids) per sequence


@dataclass
class Layout:
    """One call's tensors: ids [B, S], positions [B, S], read [B, T] slots, mask [B, T] (None: no row is short)."""
    ids: torch.Tensor
    positions: torch.Tensor
    read: torch.Tensor
    mask: torch.Tensor | None


class ModelRunner:
    def __init__(self, model, cache: PagedLatentCache, compile: bool = False):
        self.model, self.cache = model, cache
        self.device = model.head_weight().device
        self._decode = compiled(self._forward) if compile else self._forward
        # the trunk layer whose top-k the first MTP layer reuses (IndexShare); None when it selects its own
        src = model.mtp_topk(0, list(range(model.cfg.num_hidden_layers))) if len(model.mtp) else NOT_GIVEN
        self.mtp_source = None if src is NOT_GIVEN else src

    def layout(self, rows: Rows) -> Layout:
        B, S, bs, dev = len(rows), len(rows[0][2]), self.cache.block_size, self.device
        cached = torch.tensor([c for _, c, _ in rows], device=dev)  # [B]
        T = int(cached.max()) + S
        width = max(len(t) for t, _, _ in rows)
        table = torch.tensor([t + [t[0]] * (width - len(t)) for t, _, _ in rows], device=dev)  # [B, blocks]
        start = T - (cached + S)  # [B] first column of each row's keys
        tok = (torch.arange(T, device=dev)[None] - start[:, None]).clamp(min=0)  # [B, T] token index of each key
        read = table.gather(1, tok // bs) * bs + tok % bs  # [B, T] slots (hidden keys: the row's first token's)
        ids = torch.tensor([r[2] for r in rows], device=dev)  # [B, S]
        positions = cached[:, None] + torch.arange(S, device=dev)  # [B, S]
        mask = None if bool((start == 0).all()) else torch.arange(T, device=dev)[None] >= start[:, None]  # [B, T]
        return Layout(ids, positions, read, mask)

    @torch.no_grad()
    def run(self, rows: Rows) -> torch.Tensor:
        """Writes the new tokens' latents into their slots and returns the logits after each row's last new token
        [B, V] (fp32)."""
        x = self.layout(rows)
        fn = self._decode if x.ids.shape[1] == 1 and x.mask is not None else self._forward
        return fn(x.ids, x.positions, x.read, x.mask).float()

    @torch.no_grad()
    def run_all(self, rows: Rows, last_only: bool = False):
        """As `run`, for speculation and the drafter's inputs: (logits after every new token [B, S, V] fp32 (the
        last one only [B, 1, V] when last_only),
        the MTP layer's input `Output.mtp_input` [B, S, D], the top-k its source layer chose (None: every key,
        NOT_GIVEN: it selects its own), the layout)."""
        x = self.layout(rows)
        self.cache.bind(x.read, x.read[:, -x.ids.shape[1]:])
        out = self.model(x.ids, position_ids=x.positions, attention_mask=x.mask, cache=self.cache,
                         compute_logits=False)
        topk = NOT_GIVEN if self.mtp_source is None else out.topk[self.mtp_source]
        h = out.last_hidden[:, -1:] if last_only else out.last_hidden
        return self.model.head(h).float(), out.mtp_input, topk, x

    @torch.no_grad()
    def draft(self, x: Layout, h: torch.Tensor, next_ids: torch.Tensor, topk) -> torch.Tensor:
        """The first MTP layer over entries (h_i, t_{i+1}) at the slots and positions of a `run_all` layout (its
        entries go to the MTP layer's pool at the same slots) → draft logits [B, S, V] fp32."""
        S, T = next_ids.shape[1], x.read.shape[1]
        self.cache.bind(x.read, x.read[:, -S:])
        vis = Visibility(S, T, T - S, x.mask, device=self.device)
        return draft_logits(self.model, h, next_ids, x.positions, vis, self.cache, topk).float()

    def _forward(self, ids, positions, read, mask):
        self.cache.bind(read, read[:, -ids.shape[1]:])
        out = self.model(ids, position_ids=positions, attention_mask=mask, cache=self.cache, compute_logits=False)
        return self.model.head(out.last_hidden[:, -1])


class RowRunner:
    """The runner for a family whose cache is not paged (DeepSeek-V4: sliding windows and compressor state): each
    running sequence owns one row of the family's cache, its "block" in the block manager (block table [row]), and
    a call runs rows of different lengths through the cache's `rows` view (families/deepseek_v4/cache.py V4Rows)."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.device = model.head_weight().device

    @torch.no_grad()
    def run(self, rows: Rows) -> torch.Tensor:
        """Feed each row's S new tokens; the logits after its last one [B, V] (fp32). Rows run in the order of their
        cache rows, so the usual set (every running sequence) is a slice of the pool, not a gather."""
        order = sorted(range(len(rows)), key=lambda b: rows[b][0][0])
        index = [rows[b][0][0] for b in order]
        cached = [rows[b][1] for b in order]
        S = len(rows[0][2])
        ids = torch.tensor([rows[b][2] for b in order], device=self.device)
        positions = torch.tensor(cached, device=self.device)[:, None] + torch.arange(S, device=self.device)
        view = self.cache.rows(index, cached, S)
        logits = self._forward(ids, positions, view)
        view.commit()
        out = torch.empty_like(logits)
        out[torch.tensor(order, device=self.device)] = logits
        return out.float()

    def _forward(self, ids, positions, view):
        out = self.model(ids, position_ids=positions, attention_mask=view.mask, cache=view, compute_logits=False)
        return self.model.head(out.last_hidden[:, -1])
