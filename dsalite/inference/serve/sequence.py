"""A request's state as the engine sees it: token ids, sampling options, cache blocks, what has been returned."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from dsalite.inference.sampling import SamplingParams


@dataclass
class RequestParams:
    """Per-request generation options (OpenAI's names where it has one)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: the text is cut before the first one
    stop_token_ids: list[int] = field(default_factory=list)  # finish after one of these (kept in the ids)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per position, when logprobs

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        self.sampling = SamplingParams(self.temperature, self.top_k, self.top_p)  # checks the values


class Status(Enum):
    WAITING = "waiting"  # not admitted (or preempted): no blocks
    RUNNING = "running"  # has blocks; prefilling while more than one token is uncached, else decoding
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: RequestParams
    request_id: str = ""
    eos_ids: frozenset[int] = frozenset()
    status: Status = Status.WAITING
    tokens: list[int] = field(default_factory=list)  # prompt + generated; the last one not yet in the cache
    num_cached: int = 0  # tokens whose latents are in the cache
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    logprobs: list[dict] = field(default_factory=list)  # per generated token: {"logprob", "top": [(id, lp)]}
    text: str = ""  # detokenized output so far (cut at a stop string)
    sent_text: int = 0  # characters of `text` already handed out
    sent_tokens: int = 0  # generated tokens already handed out
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    draft: torch.Tensor | None = None  # MTP speculation: draft logits [V] for the token after the newest one
    drafted: int = 0  # drafts verified
    accepted: int = 0  # drafts accepted
    seq_id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("prompt is empty: a request needs at least one token")
        self.tokens = list(self.prompt)
        self.request_id = self.request_id or f"seq-{self.seq_id}"
        p = self.params
        self.generator = None if p.seed is None else torch.Generator().manual_seed(p.seed)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def uncached(self) -> int:
        """Tokens still to be fed to the model: more than one while prefilling, one while decoding."""
        return len(self.tokens) - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
