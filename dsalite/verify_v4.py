"""DeepSeek-V4 part of the parity report: a CSA layer's entry selection against HF's, with sparsity and tie margin."""

from __future__ import annotations

import torch

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
    inp = model.inputs(None, pos, None, x.dtype)
    cos, sin = inp.rope["compress"]
    q_resid = attn.q_a_norm(attn.q_a_proj(x))
    ix = attn.compressor.indexer
    picks = ix.select(x, q_resid, cos, sin, pos, inp.tables["compress"])
    q, w = ix.queries(x, q_resid, cos, sin)
    k = ix(x, inp.tables["compress"])
    sc = index_scores(q, k, w, ix.width**-0.5)
    return picks, sc.masked_fill(~entry_visible(pos, k.shape[1], ix.ratio), float("-inf"))


def fill_csa_topk(r, model, i: int, theirs: torch.Tensor, streams: torch.Tensor) -> None:
    """Overlap of the selected entry sets, fraction of visible entries left out, smallest top-k boundary gap."""
    from dsalite.verify import selection_agreement

    ours, sc = csa_selection(model, i, streams)
    selection_agreement(r, ours, theirs, sc)
