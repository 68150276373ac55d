"""Training losses: causal-LM cross-entropy with a loss mask, multi-token prediction, the DSA indexer KL loss.

Legend: B batch, S queries, T keys, H attention heads, Hi indexer heads, r kv_lora_rank, p rope width, V vocab.
Indexer loss (DeepSeek-V3.2 paper §2.1; Megatron-Core `compute_dsa_indexer_loss`): the teacher is the main attention's
per-head softmax summed over heads and L1-normalised (detached); the student is the log-softmax of the index scores
over the same keys; KL(teacher ‖ student) is averaged over query rows that see at least one key. Dense target = every
visible key; sparse target = only the selected top-k. The indexer sees detached inputs (mla.py) and the teacher is
computed without grad, so the indexer learns only from this loss and the rest of the model only from CE/MTP.
Both sides are evaluated one query block at a time (student under activation checkpointing), so neither the
[B,S,H,T] attention probabilities nor the [B,S,Hi,T] index scores exist whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dsalite.kernels import blas
from dsalite.layers.indexer import SCORE_BUDGET, index_scores
from dsalite.layers.linear import Linear

IGNORE = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B,S] in fp32; 0 where labels == IGNORE."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                           reduction="none").view(labels.shape)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over tokens whose label is not IGNORE (0 when there are none)."""
    n = (labels != IGNORE).sum()
    return token_losses(logits, labels).sum() / n.clamp(min=1)


# Rows per chunk of the fused head + cross-entropy: one chunk's [rows, V] logits stay near this many fp32 elements.
CE_BUDGET = 1 << 20


def head_lm_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`lm_loss(model.head(hidden), labels)` without the [B, S, V] logits: the head and the cross-entropy run fused, a
    chunk of rows at a time (with a real vocabulary the logits and their gradient are the largest tensors of a step).
    A head that is not a plain bias-free fp32 matrix (LoRA-wrapped, autocast, other dtypes) takes the unfused path."""
    w = model.head_weight() if hasattr(model, "head_weight") else None
    lm_head = getattr(model, "lm_head", None)
    plain = (w is not None and (lm_head is None or type(lm_head) in (torch.nn.Linear, Linear))
             and w.dtype == hidden.dtype == torch.float32
             and not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled(hidden.device.type))
    if not plain:
        return lm_loss(model.head(hidden), labels)
    n = (labels != IGNORE).sum()
    total = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), w, labels.reshape(-1))
    return total / n.clamp(min=1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ over rows of cross-entropy(h @ wᵀ, labels), IGNORE rows excluded. Each chunk's logits turn into their gradient
    (softmax − one-hot) in place right away and the two gradient GEMMs run in the forward, so backward only scales."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        N, V = h.shape[0], w.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        total = h.new_zeros((), dtype=torch.float32)
        chunk = max(1, CE_BUDGET // V)
        for c0 in range(0, N, chunk):
            hc, lab = h[c0 : c0 + chunk], labels[c0 : c0 + chunk]
            logits = blas.mm(hc, w.t())  # [c, V]
            valid = lab != IGNORE
            safe = lab.clamp(min=0)
            lse = torch.logsumexp(logits, -1)
            total += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
                g.mul_(valid[:, None])
                if need_h:
                    blas.mm(g, w, out=grad_h[c0 : c0 + chunk])
                if need_w:
                    blas.mm(g.t(), hc, out=grad_w, accumulate=True)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total, None if grad_w is None else grad_w * grad_total, None)


def mtp_loss(depth_logits: list[torch.Tensor], depth_labels: list[torch.Tensor]) -> torch.Tensor:
    """DeepSeek-V3 §2.2: the mean over depths of each depth's cross-entropy (the coefficient is applied by the caller)."""
    if not depth_logits:
        raise ValueError("mtp_loss needs at least one MTP depth (num_nextn_predict_layers = 0)")
    return torch.stack([lm_loss(lg, lb) for lg, lb in zip(depth_logits, depth_labels)]).mean()


@dataclass
class DSATraining:
    """Per-forward DSA training options and the indexer-loss collector, handed through `Transformer.forward(dsa=)`.

    dense_attention: attend to every visible key (the warm-up stage) instead of the indexer's top-k.
    sparse_target: restrict the KL target to the selected top-k (sparse stage); ignored when attention is dense.
    """

    dense_attention: bool = False
    sparse_target: bool = True
    terms: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (kl sum, rows)

    def add(self, mla, proj, q_nope, q_r, latent, vis, topk) -> None:
        """Called by every full-indexer MLA layer with its latents [B,T,r+p]; a recomputed layer (activation
        checkpointing) overwrites its entry."""
        q, k, w = proj
        c, k_r = latent[..., :mla.rank], latent[..., mla.rank:]
        sel = None if (self.dense_attention or not self.sparse_target) else topk
        self.add_term(mla.layer_idx, q, k, w, mla.indexer.head_dim**-0.5, _teacher_fn(mla, q_nope, q_r, c, k_r),
                      vis.block, sel, mla.n_heads)

    def add_term(self, layer: int, q, k, w, scale: float, teacher_logits, allowed_fn, sel, n_heads: int) -> None:
        """One indexer's KL term (see `indexer_kl`); the MLA layers and DeepSeek-V4's CSA indexers both land here."""
        self.terms[layer] = indexer_kl(q, k, w, scale, teacher_logits, allowed_fn, sel, n_heads)

    def layer_losses(self) -> dict[int, torch.Tensor]:
        """Per-layer mean KL over valid query rows."""
        return {i: s / n.clamp(min=1) for i, (s, n) in sorted(self.terms.items())}

    def loss(self) -> torch.Tensor | None:
        """Sum over indexer layers of each layer's mean KL (each layer's indexer has its own loss); None if none ran."""
        ls = list(self.layer_losses().values())
        return torch.stack(ls).sum() if ls else None


def _teacher_fn(mla, q_nope, q_r, c, k_r):
    """Per-head attention logits for one query block, in MLA's absorbed form: [B,s,H,T] = q_lat·c + q_r·k_r."""
    H, n, r = mla.n_heads, mla.nope, mla.rank
    with torch.no_grad():
        w_k = mla.kv_b_proj.weight.view(H, n + mla.v_dim, r)[:, :n]
        q_lat = torch.einsum("bshn,hnr->bshr", q_nope.detach(), w_k)  # [B, S, H, r]
    c, k_r, q_r = c.detach(), k_r.detach(), q_r.detach()

    @torch.no_grad()
    def logits(s0: int, s1: int) -> torch.Tensor:
        lg = torch.einsum("bshr,btr->bsht", q_lat[:, s0:s1], c) + torch.einsum("bshp,btp->bsht", q_r[:, s0:s1], k_r)
        return lg.float() * mla.scale

    return logits


def teacher_probs(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits [B,s,H,T], allowed [B,s,T] → per-head softmax over allowed keys, summed over heads, L1-normalised."""
    p = torch.softmax(logits.masked_fill(~allowed[:, :, None], float("-inf")), dim=-1).nan_to_num_(0.0).sum(2)
    return p / p.sum(-1, keepdim=True).clamp(min=1e-30)


def _student_kl(q, k, w, scale, p, allowed):
    """Σ over rows of KL(p ‖ softmax(index scores)) for one query block; q [B,s,Hi,Di], p/allowed [B,s,T]."""
    logq = torch.log_softmax(index_scores(q, k, w, scale).masked_fill(~allowed, float("-inf")), dim=-1)
    logq = logq.masked_fill(~allowed, 0.0)
    pos = p > 0
    logp = torch.where(pos, p, torch.ones_like(p)).log()
    return (p * (logp - logq)).sum()


def indexer_kl(q, k, w, scale: float, teacher_logits, allowed_fn, topk: torch.Tensor | None, n_heads: int):
    """(Σ KL over valid rows, number of valid rows). teacher_logits(s0, s1) → [B,s,H,T] for H = n_heads;
    allowed_fn(s0, s1) → visible keys [B or 1, s, T]; topk [B,S,K] (-1 = none) restricts both sides to the selection."""
    B, S, Hi, _ = q.shape
    T = k.shape[1]
    H = n_heads
    chunk = max(1, SCORE_BUDGET // max(1, B * max(H, Hi) * T))
    total = q.new_zeros((), dtype=torch.float32)
    rows = torch.zeros((), dtype=torch.long, device=q.device)
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        allowed = allowed_fn(s0, s1).expand(B, s1 - s0, T)
        if topk is not None:
            ids = topk[:, s0:s1]
            sel = torch.zeros(B, s1 - s0, T + 1, dtype=torch.bool, device=q.device)
            sel.scatter_(-1, torch.where(ids < 0, T, ids), True)  # -1 lands in a spill column
            allowed = allowed & sel[..., :T]
        p = teacher_probs(teacher_logits(s0, s1), allowed)
        rows = rows + allowed.any(-1).sum()
        args = (q[:, s0:s1], k, w[:, s0:s1], scale, p, allowed)
        if torch.is_grad_enabled():
            total = total + checkpoint(_student_kl, *args, use_reentrant=False)
        else:
            total = total + _student_kl(*args)
    return total, rows


def shifted_labels(tokens, segments, loss_mask, S: int, shift: int) -> torch.Tensor:
    """Labels [B,S] for predicting tokens[t+shift] at t: IGNORE across a document boundary, on masked tokens and
    past the window. tokens/segments/loss_mask are [B, L] windows with L >= S."""
    B, L = tokens.shape
    lab = torch.full((B, S), IGNORE, dtype=torch.long, device=tokens.device)
    n = max(0, min(S, L - shift))
    if n:
        ok = (segments[:, shift:shift + n] == segments[:, :n]) & loss_mask[:, shift:shift + n].bool()
        lab[:, :n] = torch.where(ok, tokens[:, shift:shift + n].long(), IGNORE)
    return lab
