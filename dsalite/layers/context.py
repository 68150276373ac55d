"""Context: what every block needs besides the hidden state, built once per forward by the model.

One object for every family (MLA blocks read `rope["main"]`, V4 blocks both tables and `input_ids` for hash
routing), so block, MTP and recompute signatures are the same everywhere. It holds no per-layer state: the
IndexShare top-k travels as an explicit block argument and return value (see `indexshare.py`).
`gather` is the one seam for context parallelism (set from outside by `parallel/context_parallel.py`): when the call
holds only some of the sequence's tokens, it turns per-token state of those tokens into every token's; None (one
process) means the call's tokens are all the keys, and nothing is gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsalite.layers.mask import Visibility


@dataclass
class Context:
    input_ids: torch.Tensor | None  # [B, S] token ids of the call (V4 hash routing)
    positions: torch.Tensor  # [B, S] rope positions
    vis: Visibility  # which keys each query sees
    rope: dict  # label ("main", V4 also "compress") -> (cos, sin) [B, S, p/2] at `positions`
    tables: dict  # label -> (inv_freq [p/2], scale): rope of positions other than the queries' (V4 entries)
    cache: object | None = None  # the decode cache (inference/cache.py or the family's), None when training
    dsa: object | None = None  # training.losses.DSATraining: dense warm-up switch and indexer-loss collector
    gather: Callable | None = None  # context parallel: [B, S, F] state of the call's tokens -> [B, T, F] of all
