"""Token sampling: greedy, temperature, top-k, top-p — and the probabilities speculative decoding verifies against."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: [..., V] fp32 (one-hot at the argmax when greedy)."""
    logits = logits.float()
    if p.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] → [B] token ids."""
    if p.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probs(logits, p), 1, generator=generator).squeeze(-1)


def probs_and_sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None):
    """The distribution [B, V] and a token [B] drawn from it (speculation needs both for drafts and verification)."""
    q = probs(logits, p)
    t = q.argmax(-1) if p.greedy else torch.multinomial(q, 1, generator=generator).squeeze(-1)
    return q, t
