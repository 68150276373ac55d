"""The serving model runner: block tables -> slot indices -> one model call; the only serving code with tensors.

Legend: B rows, S new tokens per row, T keys per row, bs block size, c_b tokens row b has cached.
A call feeds S tokens to each of B sequences (a prefill chunk: B = 1; a decode step: S = 1, every decoding
sequence). Row b's keys are its c_b + S tokens, aligned at the end of T = max(c_b) + S; its first T − c_b − S keys
are hidden by the mask (see paged_cache.py), so each row sees exactly its own tokens, as if it ran alone.
"""

from __future__ import annotations

import torch

from dsalite.inference.runner import compiled
from dsalite.inference.serve.paged_cache import PagedLatentCache


class ModelRunner:
    def __init__(self, model, cache: PagedLatentCache, compile: bool = False):
        self.model, self.cache = model, cache
        self.device = model.head_weight().device
        self._decode = compiled(self._forward) if compile else self._forward

    @torch.no_grad()
    def run(self, rows: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """rows: (block table, cached tokens, S new token ids) per sequence, S the same for all. Writes the new tokens'
        latents into their slots and returns the logits after each row's last new token [B, V] (fp32)."""
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
        fn = self._decode if S == 1 and mask is not None else self._forward
        return fn(ids, positions, read, mask).float()

    def _forward(self, ids, positions, read, mask):
        self.cache.bind(read, read[:, -ids.shape[1]:])
        out = self.model(ids, position_ids=positions, attention_mask=mask, cache=self.cache, compute_logits=False)
        return self.model.head(out.last_hidden[:, -1])
