"""DeepSeek-V4 decode cache: per layer the sliding window's K=V, and on CSA/HCA layers the compressors' state.

Legend: B sequences, N capacity in tokens, Wn sliding window, c head_dim, Di index_head_dim, m tokens per entry.
Per layer (HF `DynamicSlidingWindowLayer` / `DeepseekV4HCACache` / `DeepseekV4CSACache`, same contents):
- window: the last Wn − 1 tokens' K=V [B, Wn−1, c] — fixed size, so sliding layers cost nothing per token;
- per compressor (CSA: "compressor" at c and "indexer" at Di; HCA: "compressor"): entries [B, N//m, width]
  preallocated (they grow by T/m), the pending tokens of an incomplete window (< m, raw kv and gate), and on CSA
  the Ca half of the last complete window, which entry 0 of the next call pools (the overlap).
Rows must be the same length (no padding): windows are counted from the first cached token, so a left-padded row
would pool padding into its entries and see them at shifted positions. `engine.generate` decodes padded batches
one row at a time instead. The compressor state has no history, so there is no `crop`; MTP speculation takes a
`snapshot()` before verifying a draft and, when the draft is rejected, `restore`s it and replays the kept token —
the cache then holds exactly what plain decoding would.
"""

from __future__ import annotations

import torch

from dsalite.config import ModelConfig
from dsalite.presets import CSA, HCA


class CompressorState:
    """One compressor's running state: entries so far, the pending tail, the last window's Ca (overlap)."""

    def __init__(self, batch: int, ratio: int, width: int, overlap: bool, capacity: int, dtype, device):
        series = 2 if overlap else 1
        self.ratio, self.width, self.overlap = ratio, width, overlap
        self.entries = torch.zeros(batch, capacity // ratio, width, dtype=dtype, device=device)
        self.count = 0
        self.pending_kv = torch.zeros(batch, ratio, series * width, dtype=dtype, device=device)
        self.pending_gate = torch.zeros_like(self.pending_kv)
        self.n_pending = 0
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, m, c] each, Ca of the last window

    def windows(self, kv: torch.Tensor, gate: torch.Tensor):
        """New tokens' raw kv, gate [B, S, series·c] → (kv, gate) of the whole windows now complete [B, W·m, ·],
        index of their first entry, the Ca (kv, gate) of the window before them (None at the start). Keeps the
        remaining tail pending and this call's last window as the next overlap."""
        m, p = self.ratio, self.n_pending
        if p:
            kv = torch.cat([self.pending_kv[:, :p], kv], dim=1)
            gate = torch.cat([self.pending_gate[:, :p], gate], dim=1)
        n = kv.shape[1] // m * m
        tail = kv.shape[1] - n
        self.pending_kv[:, :tail] = kv[:, n:]
        self.pending_gate[:, :tail] = gate[:, n:]
        self.n_pending = tail
        prev = self.prev
        if self.overlap and n:
            c = self.width
            self.prev = (kv[:, n - m : n, :c].clone(), gate[:, n - m : n, :c].clone())
        return kv[:, :n], gate[:, :n], self.count, prev

    def append(self, entries: torch.Tensor) -> torch.Tensor:
        """Store new entries [B, W, width]; return every entry so far [B, count, width] (a view)."""
        W = entries.shape[1]
        if self.count + W > self.entries.shape[1]:
            raise ValueError(f"cache capacity exceeded: {self.count} + {W} compressed entries of ratio {self.ratio} "
                             f"(room for {self.entries.shape[1]})")
        self.entries[:, self.count : self.count + W] = entries
        self.count += W
        return self.entries[:, : self.count]

    def snapshot(self) -> tuple:
        """What `append` and `windows` change: the entry count, the pending tail and the overlap (entries past the
        count are overwritten later, so they need no copy)."""
        return self.count, self.n_pending, self.pending_kv.clone(), self.pending_gate.clone(), self.prev

    def restore(self, snap: tuple) -> None:
        self.count, self.n_pending, kv, gate, self.prev = snap
        self.pending_kv.copy_(kv)
        self.pending_gate.copy_(gate)

    def per_token_bytes(self) -> float:
        return self.width * self.entries.element_size() / self.ratio


class V4Cache:
    pads, rewinds = False, False  # see the file header

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, layers: list[int] | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.cfg, self.batch, self.capacity = cfg, batch, capacity
        layers = list(range(cfg.num_hidden_layers)) if layers is None else layers
        c, Wn = cfg.head_dim, cfg.sliding_window
        self.window = {i: torch.zeros(batch, Wn - 1, c, dtype=dtype, device=device) for i in layers}
        self.compressors: dict[int, dict[str, CompressorState]] = {}
        for i in layers:
            kind = cfg.layer_attention_type(i)
            if kind not in (CSA, HCA):
                continue
            m = cfg.compress_rates[kind]
            st = {"compressor": CompressorState(batch, m, c, kind == CSA, capacity, dtype, device)}
            if kind == CSA:
                st["indexer"] = CompressorState(batch, m, cfg.index_head_dim, True, capacity, dtype, device)
            self.compressors[i] = st
        self.seq_len = 0

    # ----- what the model calls -----
    def update_window(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        """Append the new tokens' K=V [B, S, c]; return the last min(T0, Wn−1) cached tokens followed by them
        [B, n + S, c] (what their window attention reads); keep the last Wn − 1."""
        buf = self.window[layer]
        n = min(self.seq_len, buf.shape[1])
        keys = torch.cat([buf[:, buf.shape[1] - n :], kv], dim=1)
        k = min(keys.shape[1], buf.shape[1])
        buf[:, buf.shape[1] - k :] = keys[:, keys.shape[1] - k :]
        return keys

    def compressor_states(self, layer: int) -> dict[str, CompressorState] | None:
        return self.compressors.get(layer)

    def advance(self, n: int) -> None:
        self.seq_len += n

    # ----- what the engine calls -----
    def append_tokens(self, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Check the tokens about to be written: no padding, capacity left."""
        if not bool(mask.all()):
            raise ValueError("deepseek_v4 cache: rows must have the same length (no padding in attention_mask); "
                             "compression windows count from the first cached token")
        if self.seq_len + mask.shape[1] > self.capacity:
            raise ValueError(f"cache capacity {self.capacity} tokens exceeded: {self.seq_len} cached + "
                             f"{mask.shape[1]} new")

    def valid(self, extra: int = 0) -> torch.Tensor:
        """[B, seq_len + extra] key validity: all True (no padding), made on demand, not stored."""
        return torch.ones(self.batch, self.seq_len + extra, dtype=torch.bool, device=self.device)

    def crop(self, n: int) -> None:
        raise ValueError("deepseek_v4 cache cannot be rewound: its compressor state (pending tokens, overlap, "
                         "entries) has no history; take a snapshot() before and restore() it")

    def snapshot(self) -> dict:
        """Everything a later call changes (windows, compressor states, length), for `restore`."""
        return {"seq_len": self.seq_len, "window": {i: w.clone() for i, w in self.window.items()},
                "compressors": {i: {k: s.snapshot() for k, s in st.items()} for i, st in self.compressors.items()}}

    def restore(self, snap: dict) -> None:
        self.seq_len = snap["seq_len"]
        for i, w in snap["window"].items():
            self.window[i].copy_(w)
        for i, st in snap["compressors"].items():
            for k, s in st.items():
                self.compressors[i][k].restore(s)

    @property
    def device(self) -> torch.device:
        return next(iter(self.window.values())).device

    def bytes_per_token(self) -> int:
        """Cache bytes one more token costs across all layers: its share of the compressed entries (sliding
        windows are fixed-size, see `fixed_bytes`)."""
        return round(sum(s.per_token_bytes() for st in self.compressors.values() for s in st.values()))

    def fixed_bytes(self) -> int:
        """Bytes that do not grow with the sequence: the windows, pending tails and overlap state."""
        n = sum(t.numel() * t.element_size() for t in self.window.values())
        for st in self.compressors.values():
            for s in st.values():
                n += 2 * s.pending_kv.numel() * s.pending_kv.element_size()
                n += s.overlap * 2 * s.ratio * s.width * s.entries.element_size()
        return n
