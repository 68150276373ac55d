"""DeepSeek-V4 part of the parity report: the default length, layer labels, and a CSA layer's entry selection
against HF's (with sparsity and tie margin)."""

from __future__ import annotations

import torch

from dsalite.presets import CSA, HCA
from dsalite.verify import selection_agreement

from dsalite.layers.compressor import entry_visible
from dsalite.layers.indexer import index_scores


@torch.no_grad()
def csa_selection(model, i: int, streams: torch.Tensor):
    """Our picks [B,S,K] (−1 = none) and masked index scores [B,S,W] for CSA layer i, from its input streams."""
    block = model.model.layers[str(i)]
    attn = block.self_attn
    x = block.input_layernorm(block.attn_hc(streams)[2])
    B, S, _ = x.shape
    pos = torch.arange(S).expand(B, S)
    inp = model.context(None, pos, None, x.dtype)
    cos, sin = inp.rope["compress"]
    q_resid = attn.q_a_norm(attn.q_a_proj(x))
    ix = attn.compressor.indexer
    picks = ix.select(x, q_resid, cos, sin, pos, inp.tables["compress"])
    q, w = ix.queries(x, q_resid, cos, sin)
    k = ix(x, inp.tables["compress"])
    sc = index_scores(q, k, w, ix.width**-0.5)
    return picks, sc.masked_fill(~entry_visible(pos, k.shape[1], ix.ratio), float("-inf"))


def default_seq_len(cfg) -> int:
    """Beyond the sliding window, two HCA entries, and ~3× index_topk CSA entries."""
    return max(64, 2 * cfg.sliding_window + 1, 2 * cfg.compress_rates[HCA] + 1,
               (3 * cfg.index_topk + 1) * cfg.compress_rates[CSA])


def layer_label(cfg, i: int) -> str:
    return {CSA: "csa", HCA: "hca"}.get(cfg.layer_types[i], "window")


def fill_topk(r, model, i: int, theirs: torch.Tensor, streams: torch.Tensor) -> None:
    """CSA layer i: overlap of the selected entry sets, fraction of visible entries left out, smallest top-k
    boundary gap."""
    r.indexer = "csa"
    ours, sc = csa_selection(model, i, streams)
    selection_agreement(r, ours, theirs, sc)
