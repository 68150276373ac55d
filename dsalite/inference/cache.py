"""Latent KV cache: per layer the MLA latent (r + p numbers per token) and, on full DSA layers, the indexer keys.

Legend: B sequences, N capacity in tokens, r kv_lora_rank, p qk_rope_head_dim, Di index_head_dim.
Storage is preallocated for B sequences of up to N tokens; sequences of different lengths are left-padded and
`key_valid` marks the real tokens, so every sequence appends at the same index and a decode step is one batched call.
Shared IndexShare layers store no indexer keys (they reuse a full layer's selection). On CPU, when the fused indexer
kernel is available, the indexer keys are also kept in its tiled layout (`indexer.tile_keys`), so neither a prefill
chunk nor a decode step re-lays the whole key history out; a compiled decode step can only use the kernel this way.
`crop` rewinds after rejected speculative drafts: the storage past `seq_len` is simply overwritten later.
The model only calls `update_latent`, `update_index_keys`, `seq_len` and `advance`; it never sees the storage.
"""

from __future__ import annotations

import torch

from dsalite import kernels
from dsalite.config import ModelConfig
from dsalite.layers.indexer import TILE


class LatentCache:
    pads, rewinds = True, True  # left-padded rows of different lengths; `crop` after rejected drafts
    paged = False  # update_latent hands the model all T rows as a view (serve's PagedLatentCache: pooled slots)

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, layers: list[int] | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.cfg, self.batch, self.capacity = cfg, batch, capacity
        layers = list(range(cfg.num_hidden_layers)) if layers is None else layers
        r, p = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.latent = {i: torch.zeros(batch, capacity, r + p, dtype=dtype, device=device) for i in layers}
        self.index_keys = {
            i: torch.zeros(batch, capacity, cfg.index_head_dim, dtype=dtype, device=device)
            for i in layers if cfg.has_indexer and cfg.indexer_types[i] == "full"
        }
        tiled = torch.device(device).type == "cpu" and kernels.load() is not None
        self.index_tiles = {  # [B, N/64, Di, 64]: the kernel's layout of the same keys
            i: torch.zeros(batch, -(-capacity // TILE), cfg.index_head_dim, TILE, dtype=torch.float32, device=device)
            for i in (self.index_keys if tiled else ())
        }
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.seq_len = 0

    # ----- what the model calls -----
    def update_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' latents [B, S, r+p]; return a view of all T tokens' [B, T, r+p] (no copy)."""
        S = latent.shape[1]
        self._check(layer, S)
        buf = self.latent[layer]
        buf[:, self.seq_len : self.seq_len + S] = latent
        return buf[:, : self.seq_len + S]

    def update_index_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' indexer keys [B, S, Di]; return all T tokens' [B, T, Di] (a view)."""
        buf = self.index_keys[layer]
        S = k.shape[1]
        buf[:, self.seq_len : self.seq_len + S] = k
        if layer in self.index_tiles:
            pos = torch.arange(self.seq_len, self.seq_len + S, device=k.device)
            self.index_tiles[layer].transpose(2, 3)[:, pos // TILE, pos % TILE] = k.detach().float()
        return buf[:, : self.seq_len + S]

    def index_key_tiles(self, layer: int) -> torch.Tensor | None:
        """The layer's indexer keys in the kernel's tiled layout (None where not kept); tiles past the cached length
        hold stale keys, which the kernel never reads."""
        return self.index_tiles.get(layer)

    def drop_key_tiles(self) -> None:
        """Stop keeping the tiled indexer keys (for a compiled runner whose steps would pay more to keep them than
        the kernel gains, `kernels.COMPILED_TILES_MIN_WORK`); eager calls then tile the keys they score."""
        self.index_tiles.clear()

    def advance(self, n: int) -> None:
        self.seq_len += n

    # ----- what the engine calls -----
    def append_tokens(self, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Record validity [B, S] and positions [B, S] of the tokens about to be written at seq_len."""
        S = mask.shape[1]
        self._check(None, S)
        self.key_valid[:, self.seq_len : self.seq_len + S] = mask.bool()
        self.positions[:, self.seq_len : self.seq_len + S] = positions

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.seq_len:
            raise ValueError(f"crop({n}) outside the cached length {self.seq_len}")
        self.key_valid[:, n : self.seq_len] = False
        self.seq_len = n

    def valid(self, extra: int = 0) -> torch.Tensor:
        """[B, seq_len + extra] key validity including tokens recorded but not yet advanced."""
        return self.key_valid[:, : self.seq_len + extra]

    def bytes_per_token(self) -> int:
        """Cache bytes one token costs across all layers (latents everywhere, indexer keys on full layers)."""
        n = sum(t.shape[-1] * t.element_size() for t in self.latent.values())
        n += sum(t.shape[-1] * t.element_size() for t in self.index_keys.values())
        return n + sum(t.shape[2] * t.element_size() for t in self.index_tiles.values())

    def _check(self, layer, S: int) -> None:
        if self.seq_len + S > self.capacity:
            raise ValueError(
                f"cache capacity {self.capacity} tokens exceeded: {self.seq_len} cached + {S} new"
                + (f" (layer {layer})" if layer is not None else "")
            )
