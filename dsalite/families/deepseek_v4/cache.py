"""DeepSeek-V4 decode cache: per layer the sliding window's K=V, and on CSA/HCA layers the compressors' state.

Legend: B sequences, N capacity in tokens, Wn sliding window, c head_dim, Di index_head_dim, m tokens per entry,
S new tokens of a call, L = m − 1 + S the longest a row's run of pending + new tokens can be.
Per layer (HF `DynamicSlidingWindowLayer` / `DeepseekV4HCACache` / `DeepseekV4CSACache`, same contents):
- window: the last Wn − 1 tokens' K=V [B, Wn−1, c] — fixed size, so sliding layers cost nothing per token;
- per compressor (CSA: "compressor" at c and "indexer" at Di; HCA: "compressor"): entries [B, N//m (+1 scratch), width]
  preallocated (they grow by T/m), the pending tokens of an incomplete window (< m, raw kv and gate), and on CSA
  the Ca half of the last complete window, which entry 0 of the next call pools (the overlap).
Rows may be left-padded to different lengths (`key_valid`, like the latent cache): every compressor count is per row
— entries, pending tokens and the overlap of row b are counted from its own first real token, so a row's entries are
the ones it would have alone, roped at its own positions. A call gathers each row's pending tokens and its real new
tokens into one run (padding skipped), pools the whole windows of every row at once (a row with fewer complete
windows pools junk there, which is written to the scratch slot), and keeps each row's tail pending. Queries see
entry w iff w < (position + 1) // m at their in-row position, so entries a row has not made yet stay hidden; the
window keys of padding are hidden by `key_valid`. All per-row state is tensors (no Python counts), so a compiled
decode step is one graph at every length. The compressor state has no history, so there is no `crop`; MTP
speculation takes a `snapshot()` before verifying a draft and, when the draft is rejected, `restore`s it and replays
the kept token — the cache then holds exactly what plain decoding would.
"""

from __future__ import annotations

import torch

from dsalite.config import ModelConfig
from dsalite.presets import CSA, HCA


class CompressorState:
    """One compressor's running state, per row: entries so far, the pending tail, the last window's Ca (overlap)."""

    def __init__(self, batch: int, ratio: int, width: int, overlap: bool, capacity: int, dtype, device):
        series = 2 if overlap else 1
        self.ratio, self.width, self.overlap = ratio, width, overlap
        self.entries = torch.zeros(batch, capacity // ratio + 1, width, dtype=dtype, device=device)  # last: scratch
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # [B] entries made
        self.pending_kv = torch.zeros(batch, ratio, series * width, dtype=dtype, device=device)
        self.pending_gate = torch.zeros_like(self.pending_kv)
        self.n_pending = torch.zeros(batch, dtype=torch.long, device=device)  # [B] tokens pending
        if overlap:  # Ca (kv, gate without position bias) of each row's last complete window; gate −inf: none yet
            self.prev_kv = torch.zeros(batch, ratio, width, dtype=dtype, device=device)
            self.prev_gate = torch.full((batch, ratio, width), float("-inf"), dtype=dtype, device=device)

    def windows(self, kv: torch.Tensor, gate: torch.Tensor, valid: torch.Tensor | None, m: int):
        """New tokens' raw kv, gate [B, S, series·c] and which are real ([B, S], a suffix of each row; None: all) →
        (kv, gate [B, W·m, ·] of each row's run of pending + real tokens, W ≤ L // m windows of which the first `n`
        [B] are complete, index of their first entry [B], the Ca (kv, gate) [B, m, c] of the window before them or
        None). Keeps each row's tail pending and its last complete window as the next overlap. m = the ratio, from
        the compressor module (a constant to torch.compile, where this object's ints would become symbols)."""
        B, S, X = kv.shape
        if valid is None and not torch.compiler.is_compiling():
            lo, hi = self.n_pending.aminmax()
            if int(lo) == int(hi):  # every row has as many pending tokens: plain slices (most eager calls)
                return self._windows_alike(kv, gate, int(hi), m)
        L = m - 1 + S
        v = valid.sum(1) if valid is not None else torch.full((B,), S, device=kv.device)
        p = self.n_pending
        j = torch.arange(L, device=kv.device)[None]  # run position → pending slot, or new token m + S − v + (j − p)
        src = torch.where(j < p[:, None], j, m + S - v[:, None] + j - p[:, None]).clamp(max=m + S - 1)
        run_kv = self._take(torch.cat([self.pending_kv, kv], 1), src)  # [B, L, X]
        run_gate = self._take(torch.cat([self.pending_gate, gate], 1), src)
        t = p + v
        n = t // m  # complete windows per row
        # a compiled step pools every window a row could complete (a shape from S alone); eagerly, only those some
        # row does complete — none on most decode steps, so those skip pooling altogether
        W = L // m if torch.compiler.is_compiling() else int(n.max())
        first = self.count.clone()
        prev = (self.prev_kv.clone(), self.prev_gate.clone()) if self.overlap and W else None
        tail = ((n * m)[:, None] + torch.arange(m, device=kv.device)).clamp(max=L - 1)
        self.pending_kv.copy_(self._take(run_kv, tail))
        self.pending_gate.copy_(self._take(run_gate, tail))
        self.n_pending.copy_(t - n * m)
        if self.overlap and W:
            c, has = self.prev_kv.shape[-1], (n > 0)[:, None, None]
            last = ((n - 1).clamp(min=0) * m)[:, None] + torch.arange(m, device=kv.device)
            self.prev_kv.copy_(torch.where(has, self._take(run_kv[..., :c], last), self.prev_kv))
            self.prev_gate.copy_(torch.where(has, self._take(run_gate[..., :c], last), self.prev_gate))
        return run_kv[:, : W * m], run_gate[:, : W * m], first, prev, n

    def _windows_alike(self, kv, gate, p: int, m: int):
        """`windows` when no token is padding and every row has p pending tokens: the rows' runs line up."""
        if p:
            kv, gate = torch.cat([self.pending_kv[:, :p], kv], 1), torch.cat([self.pending_gate[:, :p], gate], 1)
        W = kv.shape[1] // m
        tail = kv.shape[1] - W * m
        self.pending_kv[:, :tail] = kv[:, W * m :]
        self.pending_gate[:, :tail] = gate[:, W * m :]
        self.n_pending.fill_(tail)
        prev = None
        if self.overlap and W:
            c = self.prev_kv.shape[-1]
            prev = (self.prev_kv.clone(), self.prev_gate.clone())
            self.prev_kv.copy_(kv[:, W * m - m : W * m, :c])
            self.prev_gate.copy_(gate[:, W * m - m : W * m, :c])
        n = torch.full_like(self.count, W)
        return kv[:, : W * m], gate[:, : W * m], self.count.clone(), prev, n

    @staticmethod
    def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [B, T, X], idx [B, n] → x[b, idx[b]] [B, n, X]."""
        return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))

    def append(self, entries: torch.Tensor, n: torch.Tensor, limit) -> torch.Tensor:
        """Store the first n[b] of new entries [B, W, width] after each row's count; return the first `limit`
        entry slots [B, limit, width] (a view; a row's slots past its count are hidden by position)."""
        W = entries.shape[1]
        if W:
            w = torch.arange(W, device=entries.device)[None]
            scratch = self.entries.shape[1] - 1
            slot = torch.where(w < n[:, None], self.count[:, None] + w, scratch)  # [B, W]
            self.entries.scatter_(1, slot[..., None].expand(*slot.shape, entries.shape[-1]),
                                  entries.to(self.entries.dtype))
            self.count.add_(n)
        return self.entries[:, :limit]

    def snapshot(self) -> tuple:
        """What `append` and `windows` change: counts, pending tails and the overlap (entries past a row's count are
        overwritten later, so they need no copy)."""
        keep = [self.count, self.n_pending, self.pending_kv, self.pending_gate]
        keep += [self.prev_kv, self.prev_gate] if self.overlap else []
        return tuple(t.clone() for t in keep)

    def restore(self, snap: tuple) -> None:
        keep = [self.count, self.n_pending, self.pending_kv, self.pending_gate]
        keep += [self.prev_kv, self.prev_gate] if self.overlap else []
        for t, s in zip(keep, snap):
            t.copy_(s)

    def per_token_bytes(self) -> float:
        return self.width * self.entries.element_size() / self.ratio

    # ----- rows of a serving pool -----
    def _fields(self) -> list[str]:
        return ["count", "n_pending", "pending_kv", "pending_gate"] + (["prev_kv", "prev_gate"] if self.overlap else [])

    def reset(self, rows) -> None:
        """Rows `rows` (a slice or an index tensor) start a new sequence: no entries, nothing pending, no overlap."""
        self.count[rows] = 0
        self.n_pending[rows] = 0
        if self.overlap:
            self.prev_kv[rows] = 0
            self.prev_gate[rows] = float("-inf")

    def rows(self, rows, limit: int) -> "CompressorState":
        """The state of rows `rows` (a slice or an index tensor) as a CompressorState of their own, with entry
        slots 0 .. limit − 1 plus a scratch slot; limit bounds the entries any row of the call can make. Counts,
        pending tails and overlaps are copies (`put_rows` writes them back once the call has succeeded, so a call
        that raises leaves the pool as it was); entries are a view for a slice (new ones land in the pool at once, past
        the committed count, so a failed call leaves only junk there that later entries overwrite) and a copy
        otherwise."""
        view = CompressorState.__new__(CompressorState)
        view.ratio, view.width, view.overlap = self.ratio, self.width, self.overlap
        for name in self._fields():
            t = getattr(self, name)[rows]
            setattr(view, name, t.clone() if isinstance(rows, slice) else t)
        view.entries = self.entries[rows, : limit + 1]
        return view

    def put_rows(self, rows, view: "CompressorState") -> None:
        """Write the state of a call on `rows(rows, limit)` back: counts, tails, overlaps and, for a copy, the
        entries the call made."""
        if not isinstance(rows, slice) and view.entries.shape[1] > 1:
            lo, hi = int(self.count[rows].min()), int(view.count.max())
            if hi > lo:  # a row's slots in lo..hi it did not write hold the pool's own values (copied in)
                self.entries[rows, lo:hi] = view.entries[:, lo:hi]
        for name in self._fields():
            getattr(self, name)[rows] = getattr(view, name)


class Step:
    """One call's view of a `CompressorState`: which of the new tokens are real, and the cache's length after the
    call (cached + S), from which the entry slots any query of the call may see follow: (cached + S) // m, a bound
    from the lengths alone, so a compiled graph keeps it symbolic."""

    def __init__(self, state: CompressorState, valid: torch.Tensor | None, total: int):
        self.state, self.valid, self.total = state, valid, total

    def windows(self, kv, gate, m: int):
        return self.state.windows(kv, gate, self.valid, m)

    def append(self, entries, n, m: int):
        return self.state.append(entries, n, self.total // m)


class V4Cache:
    pads, rewinds = True, False  # left-padded rows (see the file header); snapshot/restore instead of crop

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
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
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

    def compressor_states(self, layer: int, valid: torch.Tensor | None, S: int) -> dict[str, Step] | None:
        """The layer's compressor states for a call of S new tokens, valid [B, S] marking the real ones (None: all)."""
        if layer not in self.compressors:
            return None
        if self.seq_len + S > self.capacity:
            raise ValueError(f"cache capacity {self.capacity} tokens exceeded: {self.seq_len} cached + {S} new "
                             f"(layer {layer})")
        return {k: Step(s, valid, self.seq_len + S) for k, s in self.compressors[layer].items()}

    def advance(self, n: int) -> None:
        self.seq_len += n

    # ----- what the engine calls -----
    def append_tokens(self, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Record validity [B, S] of the tokens about to be written at seq_len (padding only before a row's first
        real token: left padding); positions are the rows' own (the model is given them)."""
        S = mask.shape[1]
        if self.seq_len + S > self.capacity:
            raise ValueError(f"cache capacity {self.capacity} tokens exceeded: {self.seq_len} cached + {S} new")
        mask = mask.bool()
        seen = self.key_valid[:, self.seq_len - 1 : self.seq_len] if self.seq_len else mask[:, :1]
        if bool((torch.cat([seen, mask], 1).int().diff(dim=1) < 0).any()):
            raise ValueError("deepseek_v4 cache: padding must come before a row's first real token (left padding); "
                             "compression windows count from it")
        self.key_valid[:, self.seq_len : self.seq_len + S] = mask

    def valid(self, extra: int = 0) -> torch.Tensor:
        """[B, seq_len + extra] key validity including tokens recorded but not yet advanced."""
        return self.key_valid[:, : self.seq_len + extra]

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

    def bytes(self) -> int:
        """Every byte the cache holds (windows, entries, pending and overlap state)."""
        n = sum(t.numel() * t.element_size() for t in self.window.values()) + self.key_valid.numel()
        for st in self.compressors.values():
            for s in st.values():
                n += sum(getattr(s, f).numel() * getattr(s, f).element_size() for f in s._fields() + ["entries"])
        return n

    # ----- serving: one row per running sequence -----
    def rows(self, index: list[int], cached: list[int], S: int) -> "V4Rows":
        """Rows `index` of this cache as the cache of one model call of S new tokens per row, row b having cached[b]
        tokens already (each row its own length: continuous batching). A row with nothing cached is reset first."""
        return V4Rows(self, index, cached, S)

    def fixed_bytes(self) -> int:
        """Bytes that do not grow with the sequence: the windows, pending tails and overlap state."""
        n = sum(t.numel() * t.element_size() for t in self.window.values())
        for st in self.compressors.values():
            for s in st.values():
                n += 2 * s.pending_kv.numel() * s.pending_kv.element_size()
                n += s.overlap * 2 * s.ratio * s.width * s.entries.element_size()
        return n


class V4Rows:
    """Some rows of a `V4Cache` pool, each with its own cached length, as the cache of one model call (serving).

    Every row's window buffer is its last Wn − 1 tokens right-aligned (`update_window` shifts them all by S), so the
    model sees Wn − 1 cached keys per row: `seq_len` is Wn − 1 and `mask` [B, Wn − 1 + S] hides the buffer slots a
    short row has not filled — the left padding `V4Cache` already handles, so the compressors, whose counts are per
    row anyway, see each row exactly as if it ran alone. Rows index..index+B−1 in order are sliced (their entries are
    views), any other set gathered. Nothing the call changes reaches the pool before `commit()` (new entries past the
    committed counts aside), so after a call that raises each row can be run again as if it never was."""

    pads, rewinds = True, False

    def __init__(self, pool: V4Cache, index: list[int], cached: list[int], S: int):
        B, dev = len(index), pool.device
        self.total = max(cached) + S  # the longest row after the call: bounds the entry slots any query sees
        if self.total > pool.capacity:
            raise ValueError(f"cache capacity {pool.capacity} tokens per sequence exceeded: {max(cached)} cached + "
                             f"{S} new")
        self.pool = pool
        a = index[0]
        self.sel = slice(a, a + B) if index == list(range(a, a + B)) else torch.tensor(index, device=dev)
        fresh = [r for r, c in zip(index, cached) if c == 0]
        if fresh:
            for st in pool.compressors.values():
                for s in st.values():
                    s.reset(torch.tensor(fresh, device=dev))
        self.window = {i: w[self.sel] for i, w in pool.window.items()}  # read only; new contents go to `shifted`
        self.shifted: dict[int, torch.Tensor] = {}
        self.compressors = {i: {k: s.rows(self.sel, self.total // s.ratio)
                                for k, s in st.items()} for i, st in pool.compressors.items()}
        W = pool.cfg.sliding_window - 1
        self.seq_len = W  # the model's key offset: the window buffer
        have = torch.tensor(cached, device=dev).clamp(max=W)
        self.mask = None if min(cached) >= W else torch.arange(W + S, device=dev)[None] >= (W - have)[:, None]

    def update_window(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        keys = torch.cat([self.window[layer], kv], dim=1)  # [B, Wn − 1 + S, c]
        self.shifted[layer] = keys[:, keys.shape[1] - self.window[layer].shape[1] :]
        return keys

    def compressor_states(self, layer: int, valid: torch.Tensor | None, S: int) -> dict[str, Step] | None:
        if layer not in self.compressors:
            return None
        return {k: Step(s, valid, self.total) for k, s in self.compressors[layer].items()}

    def advance(self, n: int) -> None:
        """Lengths are the caller's (each sequence's own count); nothing to advance here."""

    def commit(self) -> None:
        """The call succeeded: write the rows' new windows and compressor state to the pool."""
        for i, w in self.shifted.items():
            self.pool.window[i][self.sel] = w
        for i, st in self.compressors.items():
            for k, s in st.items():
                self.pool.compressors[i][k].put_rows(self.sel, s)
