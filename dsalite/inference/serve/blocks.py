"""Block manager: which cache blocks each sequence owns, a free list, and the prefix cache.

A block holds `block_size` consecutive tokens of one sequence (every layer's latents and indexer keys at those slots,
paged_cache.py). A full block's content is named by a hash chained over every token up to its end, so two sequences
with the same prompt prefix name the same blocks: a new sequence takes those blocks (reference count + 1) instead
of computing them again. A block whose last user finished keeps its content and name in an LRU list and is reused
for new content only when the free list is empty (oldest first; a sequence's deeper blocks go before its first
ones, which are worth more to later prompts). Policy only: no tensors here.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


def block_key(parent: bytes, tokens) -> bytes:
    """The name of a full block: a digest of its parent's name and its token ids."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, lookahead: int = 0):
        """lookahead: tokens after a block that its content depends on, so they are part of its name (1 under MTP
        speculation: the MTP layer's entry at a block's last slot is computed from the next token)."""
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.lookahead = lookahead
        self.free: deque[int] = deque(range(num_blocks))  # blocks holding nothing worth keeping
        self.idle: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks kept for prefix hits, oldest first
        self.ref = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.hit_tokens = 0  # prompt tokens served from the prefix cache (metrics)
        self.query_tokens = 0

    # ----- counts -----
    @property
    def available(self) -> int:
        return len(self.free) + len(self.idle)

    @property
    def in_use(self) -> int:
        return self.num_blocks - self.available

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ----- prefix hits -----
    def _prefix(self, tokens: list[int]) -> list[int]:
        """Cached blocks that hold a prefix of `tokens`, in order; at least the last token is left to compute (its
        logits are the point of the forward)."""
        if not self.prefix_caching:
            return []
        bs, la, out, parent = self.block_size, self.lookahead, [], b""
        for i in range((len(tokens) - max(1, la)) // bs):
            parent = block_key(parent, tokens[i * bs : (i + 1) * bs + la])
            b = self.block_of.get(parent)
            if b is None:
                break
            out.append(b)
        return out

    def can_allocate(self, tokens: list[int]) -> bool:
        hits = self._prefix(tokens)
        taken = sum(1 for b in hits if self.ref[b] == 0)  # idle hits leave the idle list
        return self.blocks_for(len(tokens)) - len(hits) + taken <= self.available

    def allocate(self, seq) -> None:
        """Blocks for every token of seq.tokens: the cached prefix shared, the rest new. Sets seq.block_table,
        seq.num_cached (tokens whose latents are already there) and seq.block_keys (names of the shared blocks)."""
        hits = self._prefix(seq.tokens)
        table = []
        for b in hits:
            if self.ref[b] == 0:
                del self.idle[b]
            self.ref[b] += 1
            table.append(b)
        table += [self._take() for _ in range(self.blocks_for(len(seq.tokens)) - len(hits))]
        seq.block_table = table
        seq.num_cached = len(hits) * self.block_size
        seq.block_keys = [self.key_of[b] for b in hits]
        self.hit_tokens += seq.num_cached
        self.query_tokens += len(seq.tokens)

    def can_append(self, seq, n: int = 1) -> bool:
        """Room for n more tokens after seq.tokens' last one?"""
        return self.blocks_for(len(seq.tokens) + n - 1) - len(seq.block_table) <= self.available

    def append(self, seq, n: int = 1) -> None:
        """Blocks so that seq.tokens (the last one not yet in the cache) plus n − 1 more have slots."""
        while len(seq.block_table) * self.block_size < len(seq.tokens) + n - 1:
            seq.block_table.append(self._take())

    def commit(self, seq) -> None:
        """Name the blocks that seq's cached tokens now fill completely (and whose lookahead tokens are known), so
        later prompts can share them."""
        if not self.prefix_caching:
            return
        bs, la = self.block_size, self.lookahead
        while len(seq.block_keys) < seq.num_cached // bs and (len(seq.block_keys) + 1) * bs + la <= len(seq.tokens):
            i = len(seq.block_keys)
            key = block_key(seq.block_keys[-1] if i else b"", seq.tokens[i * bs : (i + 1) * bs + la])
            seq.block_keys.append(key)
            b = seq.block_table[i]
            if key not in self.block_of and b not in self.key_of:
                self.block_of[key], self.key_of[b] = b, key

    def free_seq(self, seq) -> None:
        """Drop seq's references; blocks no one uses go to the idle list (named) or the free list."""
        for b in reversed(seq.block_table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.key_of:
                    self.idle[b] = None
                else:
                    self.free.append(b)
        seq.block_table, seq.block_keys, seq.num_cached = [], [], 0

    def _take(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.idle:
            b, _ = self.idle.popitem(last=False)  # least recently released
            del self.block_of[self.key_of.pop(b)]
        else:
            raise RuntimeError("no free cache block (the scheduler checks before allocating)")
        self.ref[b] = 1
        return b
