"""Which keys a query may see: causal order, padding and packed-document boundaries, evaluated one query block at a time.

Never materialised as a whole S×T matrix on the sparse path: the indexer asks for one block of queries at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Visibility:
    num_queries: int  # S
    num_keys: int  # T; the queries are keys offset .. offset+S-1
    offset: int = 0
    key_valid: torch.Tensor | None = None  # [B, T] bool, False = padding
    segments: torch.Tensor | None = None  # [B, T] int, keys of another document are invisible
    device: torch.device | str | None = None  # where masks are built when neither tensor above is given

    def __post_init__(self):
        self._blocks: dict[tuple[int, int, int, int], torch.Tensor] = {}  # small blocks, shared by the layers
        # an all-True key_valid (later chunks of an unpadded prefill) hides nothing: found once per forward (a
        # compiled decode step assumes it may hide keys instead of branching on the data)
        self.hides_keys = self.key_valid is not None and (
            torch.compiler.is_compiling() or not bool(self.key_valid.all()))

    @property
    def plain_causal(self) -> bool:
        """True when SDPA's is_causal expresses the mask exactly."""
        return self.key_valid is None and self.segments is None and self.offset == 0 and self.num_queries == self.num_keys

    def block(self, s0: int, s1: int, k0: int = 0, k1: int | None = None) -> torch.Tensor:
        """[B or 1, s1-s0, k1-k0] bool, True = visible: queries s0..s1-1 against keys k0..k1-1 (default all keys)."""
        k1 = self.num_keys if k1 is None else k1
        # large blocks are rebuilt: keeping them would hold S×T at once; a compiled step rebuilds too (a dict keyed
        # by the symbolic lengths would pin them to constants)
        if (s1 - s0) * (k1 - k0) > 1 << 20 or torch.compiler.is_compiling():
            return self._make(s0, s1, k0, k1)
        if (s0, s1, k0, k1) not in self._blocks:
            self._blocks[(s0, s1, k0, k1)] = self._make(s0, s1, k0, k1)
        return self._blocks[(s0, s1, k0, k1)]

    def key_range(self, s0: int, s1: int) -> tuple[int, int]:
        """(k0, k1): every query of s0..s1-1 sees all keys before k0 and none from k1 on (causal order), so only keys
        k0..k1-1 need the mask. Padding or documents can hide any key: then k0 = 0."""
        k1 = min(self.num_keys, self.offset + s1)
        plain = not self.hides_keys and self.segments is None
        return (min(k1, self.offset + s0 + 1) if plain else 0), k1

    def _make(self, s0: int, s1: int, k0: int, k1: int) -> torch.Tensor:
        dev = self.key_valid.device if self.key_valid is not None else (
            self.segments.device if self.segments is not None else self.device)
        qi = torch.arange(self.offset + s0, self.offset + s1, device=dev)
        ki = torch.arange(k0, k1, device=dev)
        m = (ki[None, :] <= qi[:, None])[None]
        if self.key_valid is not None:
            m = m & self.key_valid[:, None, k0:k1]
        if self.segments is not None:
            qs = self.segments[:, self.offset + s0 : self.offset + s1]
            m = m & (qs[:, :, None] == self.segments[:, None, k0:k1])
        return m

    def full(self) -> torch.Tensor:
        return self.block(0, self.num_queries)
