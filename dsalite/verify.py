"""Logits parity against HF transformers — the only module of the library that imports transformers.

`compare(path)` loads one checkpoint in both, runs one batch long enough that the DSA selection is sparse, and
reports max|Δlogit|, cosine, top-1 agreement, per-layer hidden-state max|Δ|, and per full layer the indexer top-k
overlap, how sparse the selection was and the smallest score gap at the top-k boundary (exact-zero ReLU ties make the
selection implementation-defined; a gap of 0 means the comparison cannot be trusted there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


from dsalite.families import family
from dsalite.indexshare import source_layer
from dsalite.layers.indexer import index_scores


@dataclass
class LayerReport:
    layer: int
    hidden_max_abs: float
    indexer: str = "-"  # "full", "shared←j" (reuses layer j's top-k) or "-" (no DSA)
    topk_overlap: float | None = None  # mean over queries of |ours ∩ HF| / K
    excluded_fraction: float | None = None  # visible keys left out of the selection
    boundary_gap: float | None = None  # min over rows of (k-th score − (k+1)-th score)


@dataclass
class Report:
    path: str
    model_type: str
    seq_len: int
    batch: int
    max_abs: float
    cosine: float
    top1: float
    layers: list[LayerReport] = field(default_factory=list)
    atol: float = 1e-4

    @property
    def ok(self) -> bool:
        topk_ok = all(r.topk_overlap is None or r.topk_overlap == 1.0 for r in self.layers)
        return self.max_abs <= self.atol and topk_ok

    def format(self) -> str:
        lines = [
            f"dsalite verify: {self.path} ({self.model_type}), batch {self.batch} × {self.seq_len} tokens",
            f"  logits   max|Δ| {self.max_abs:.3e} (tolerance {self.atol:.0e})   cosine {self.cosine:.8f}   "
            f"top-1 agreement {self.top1 * 100:.2f}%",
            "  layer  indexer    hidden max|Δ|  top-k overlap  keys excluded  boundary gap",
        ]
        for r in self.layers:
            ov = "-" if r.topk_overlap is None else f"{r.topk_overlap * 100:.2f}%"
            ex = "-" if r.excluded_fraction is None else f"{r.excluded_fraction * 100:.1f}%"
            gap = "-" if r.boundary_gap is None else f"{r.boundary_gap:.2e}"
            lines.append(f"  {r.layer:>5}  {r.indexer:<9}  {r.hidden_max_abs:>13.3e}  {ov:>13}  {ex:>13}  {gap:>12}")
        lines.append("  PASS" if self.ok else "  FAIL")
        return "\n".join(lines)


def load_hf(path: str, dtype=torch.float32, experts_impl: str = "grouped_mm"):
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts_impl)  # pin: the default backend differs by ~1 ulp in bf16
    return model.eval()


def default_seq_len(cfg) -> int:
    """Long enough that every full layer's selection drops keys: about 3× index_topk, at least 32.
    DeepSeek-V4: beyond the sliding window, two HCA entries, and ~3× index_topk CSA entries."""
    own = family(cfg.model_type).verify
    if own is not None:
        return own.default_seq_len(cfg)
    return max(32, 3 * cfg.index_topk) if cfg.has_indexer else 64


@torch.no_grad()
def compare(path: str, seq_len: int | None = None, batch: int = 2, seed: int = 0, atol: float = 1e-4,
            input_ids: torch.Tensor | None = None) -> Report:
    from dsalite.checkpoint.pretrained import from_pretrained

    ours = from_pretrained(path, dtype=torch.float32)
    theirs = load_hf(path)
    cfg = ours.cfg
    if input_ids is None:
        seq_len = seq_len or default_seq_len(cfg)
        g = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    batch, seq_len = input_ids.shape

    hf_topk: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(theirs.model.layers):
        idx = getattr(layer.self_attn, "indexer", None) or getattr(getattr(layer.self_attn, "compressor", None),
                                                                   "indexer", None)  # V4: CSA layers
        if idx is not None:
            hooks.append(idx.register_forward_hook(lambda m, a, out, i=i: hf_topk.__setitem__(i, out)))
    try:
        ref = theirs(input_ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    out = ours(input_ids, output_hidden_states=True)

    a, b = out.logits.double(), ref.logits.double()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    rep = Report(path, cfg.model_type, seq_len, batch, (a - b).abs().max().item(), cos,
                 (a.argmax(-1) == b.argmax(-1)).float().mean().item(), atol=atol)
    # HF's hidden_states: embeddings, then each decoder layer's output (the last one after the final norm).
    n = cfg.num_hidden_layers
    ours_h = out.hidden_states[1:]
    ours_h[-1] = out.last_hidden
    for i in range(n):
        r = LayerReport(i, (ours_h[i] - ref.hidden_states[i + 1]).abs().max().item(), _indexer_label(cfg, i))
        own = family(cfg.model_type).verify
        if i in hf_topk and own is not None:
            own.fill_topk(r, ours, i, hf_topk[i], out.hidden_states[i])
        elif i in hf_topk:
            _fill_topk(r, ours, i, out.topk[i], hf_topk[i], out.hidden_states[i], seq_len)
        rep.layers.append(r)
    return rep


def _indexer_label(cfg, i: int) -> str:
    own = family(cfg.model_type).verify
    if own is not None:
        return own.layer_label(cfg, i)
    if not cfg.has_indexer:
        return "-"
    if cfg.indexer_types[i] == "full":
        return "full"
    return f"shared←{source_layer(cfg.indexer_types, i)}"


def _fill_topk(r: LayerReport, model, i: int, ours: torch.Tensor | None, theirs: torch.Tensor, x_in, T: int):
    sc = index_scores_of(model, i, x_in)
    if ours is None:  # index_topk >= T: every visible key
        B, S, _ = sc.shape
        ours = torch.arange(T).expand(B, S, T).masked_fill(torch.isinf(sc), -1)
    selection_agreement(r, ours, theirs, sc)


def selection_agreement(r: LayerReport, ours: torch.Tensor, theirs: torch.Tensor, sc: torch.Tensor) -> None:
    """Fill r's top-k overlap, excluded fraction and boundary gap. ours/theirs [B,S,K] key ids (−1 = none; HF pads
    short rows with invisible keys, which are dropped), sc [B,S,T] index scores with −inf on invisible keys."""
    B, S, _ = sc.shape
    theirs = theirs.long()
    visible = torch.isfinite(sc)
    hit, excluded, rows = 0.0, 0.0, 0
    for b in range(B):
        for s in range(S):
            a = set(ours[b, s][ours[b, s] >= 0].tolist())
            c = {t for t in theirs[b, s].tolist() if t >= 0 and bool(visible[b, s, t])}
            if not a and not c:
                continue
            rows += 1
            hit += len(a & c) / max(1, len(c), len(a))
            n = int(visible[b, s].sum())
            excluded += max(0, n - len(c)) / max(1, n)
    r.topk_overlap = hit / max(1, rows)
    r.excluded_fraction = excluded / max(1, rows)
    r.boundary_gap = _gap(sc, theirs.shape[-1])


def _gap(sc: torch.Tensor, K: int) -> float:
    """Smallest (k-th − (k+1)-th) score over rows with more than K visible keys (inf when there are none)."""
    if sc.shape[-1] <= K:
        return math.inf
    top = sc.topk(K + 1, dim=-1).values
    rows = torch.isfinite(sc).sum(-1) > K
    return (top[..., K - 1] - top[..., K])[rows].min().item() if bool(rows.any()) else math.inf


@torch.no_grad()
def index_scores_of(model, i: int, x_in: torch.Tensor) -> torch.Tensor:
    """Layer i's index scores [B,S,T] for the block input x_in, −inf on keys a query cannot see (causal)."""
    block = model.model.layers[str(i)]
    attn = block.self_attn
    x = block.input_layernorm(x_in)
    B, S, _ = x.shape
    cos, sin = model.rope(torch.arange(S).expand(B, S), x.dtype)
    q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
    q, k, w = attn.indexer.project(x, q_resid, cos, sin)
    sc = index_scores(q, k, w, attn.indexer.head_dim**-0.5)
    return sc.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))


def boundary_gap(model, i: int, x_in: torch.Tensor) -> float:
    """Smallest gap between the k-th and (k+1)-th visible index score over rows with more than k visible keys."""
    return _gap(index_scores_of(model, i, x_in), model.model.layers[str(i)].self_attn.index_topk)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="dsalite verify", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p) -> None:
    p.add_argument("path", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: 3 × index_topk, at least 32, so the DSA selection is sparse)")
    p.add_argument("--batch", type=int, default=2, help="sequences in the batch (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random token ids (default 0)")
    p.add_argument("--atol", type=float, default=1e-4, help="max |Δlogit| allowed in fp32 (default 1e-4)")


def run(args) -> int:
    rep = compare(args.path, seq_len=args.seq_len, batch=args.batch, seed=args.seed, atol=args.atol)
    print(rep.format())
    return 0 if rep.ok else 1
