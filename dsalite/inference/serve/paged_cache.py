"""Paged latent cache: fixed-size blocks of MLA latents [r + p] (every layer) and indexer keys [Di] (full DSA layers).

Legend: B rows of this step, S new tokens per row, T keys per row, bs block size, n blocks in the pool.
Storage is one pool per layer of n·bs token slots ([n·bs, r+p] latents, [n·bs, Di] indexer keys); block b is slots
b·bs .. b·bs+bs−1, and a sequence's block table lists its blocks in token order (blocks.py hands them out). Memory is
therefore bounded by the blocks in use, not by batch × longest sequence.
A step is bound (`bind`) to slot indices computed by the runner: where each row's S new tokens are written, and which
slots make up each row's T keys. Rows of different lengths are laid out as `LatentCache` lays them out — the newest
tokens aligned at the end, earlier slots of a shorter row hidden by the key mask — so the model's causal visibility
(queries are keys T−S .. T−1) holds for every row; the view is gathered per step and layer, the pool never moves.
The model calls `store_latent` / `latent_rows` / `picked_slots` (it sees `paged`: sparse layers read only the K
picked latents, straight from the pool through the block tables), `update_index_keys`, `index_key_tiles`, `seq_len`
and `advance`; it never sees blocks.
"""

from __future__ import annotations

import torch

from dsalite.config import ModelConfig


class PagedLatentCache:
    pads, rewinds, paged = True, True, True

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", mtp: bool = False):
        """mtp: also the first MTP layer's entries (layer index L, the same slots: its entry at position i is
        (h_i, t_{i+1}), one per cached token), for per-sequence MTP speculation."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"paged cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        r, p, n = cfg.kv_lora_rank, cfg.qk_rope_head_dim, num_blocks * block_size
        layers = range(cfg.num_hidden_layers + int(mtp))
        self.latent = {i: torch.zeros(n, r + p, dtype=dtype, device=device) for i in layers}  # [n·bs, r+p]
        self.index_keys = {  # [n·bs, Di], full IndexShare / DSA layers only
            i: torch.zeros(n, cfg.index_head_dim, dtype=dtype, device=device)
            for i in layers if cfg.has_indexer and cfg.indexer_types[i] == "full"
        }
        self.seq_len = 0  # T − S of the bound step: the model's key offset
        self._read: torch.Tensor | None = None  # [B, T] slots of each row's keys
        self._write: torch.Tensor | None = None  # [B·S] slots of the new tokens

    def bind(self, read: torch.Tensor, write: torch.Tensor) -> None:
        """Bind the next model call: read [B, T] slot of each key (hidden ones any slot), write [B, S] slots of the new
        tokens (their own entries in read's last S columns)."""
        self._read, self._write = read, write.reshape(-1)
        self.seq_len = read.shape[1] - write.shape[1]

    # ----- what the model calls -----
    def store_latent(self, layer: int, latent: torch.Tensor) -> int:
        """Store the new tokens' latents [B, S, r+p] in their slots; return T, the keys per row. Sparse layers then
        read only the picked rows (`picked_slots`), dense ones all T (`latent_rows`): no per-step copy of T latents
        where attention reads K of them."""
        self._put(self.latent[layer], latent)
        return self._read.shape[1]

    def latent_rows(self, layer: int) -> torch.Tensor:
        """The rows' keys [B, T, r+p], gathered from the pool (dense attention, or T <= index_topk)."""
        return self._rows(self.latent[layer])

    def picked_slots(self, layer: int, topk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's pool [n·bs, r+p] and, for key columns topk [B, S, K] (−1 = none), their slots [B, S, K]
        through the bound block tables (−1 kept)."""
        B, S, K = topk.shape
        slots = self._read.gather(1, topk.clamp(min=0).reshape(B, S * K)).view(B, S, K)
        return self.latent[layer], torch.where(topk < 0, topk, slots)

    def update_index_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' indexer keys [B, S, Di]; return the rows' keys [B, T, Di]."""
        pool = self.index_keys[layer]
        self._put(pool, k)
        return self._rows(pool)

    def index_key_tiles(self, layer: int) -> None:
        return None  # the indexer tiles the gathered keys itself

    def advance(self, n: int) -> None:
        self.seq_len += n

    def _put(self, pool: torch.Tensor, x: torch.Tensor) -> None:
        """The bound step's new tokens [B, S, ·] into their slots."""
        if self._read is None:
            raise RuntimeError("PagedLatentCache used before bind(): the serving runner binds each step's slots")
        pool.index_copy_(0, self._write, x.reshape(-1, x.shape[-1]).to(pool.dtype))

    def _rows(self, pool: torch.Tensor) -> torch.Tensor:
        """Every bound row's T keys [B, T, ·], gathered from `pool`."""
        B, T = self._read.shape
        return pool.index_select(0, self._read.reshape(-1)).view(B, T, -1)

    # ----- sizes -----
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs across all layers (latents everywhere, indexer keys on full layers)."""
        return sum(t.shape[-1] * t.element_size() for t in (*self.latent.values(), *self.index_keys.values()))

    def bytes(self) -> int:
        return self.bytes_per_token() * self.num_blocks * self.block_size
