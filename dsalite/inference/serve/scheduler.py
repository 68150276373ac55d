"""The scheduler: pure policy over the waiting and running queues (no tensors, no model).

Each step: every running sequence that is decoding gets its next token's slot (when the cache is full the newest
running sequence is preempted — its blocks freed, itself put back at the head of the waiting queue to be recomputed
later, vLLM's recompute preemption — so the oldest always progress); then prefill chunks are handed out, up to
`prefill_tokens` prompt tokens per step, first to sequences already admitted and part-way through their prompt,
then to newly admitted ones (FIFO, while the batch has room and the cache has blocks for the whole prompt). The
engine runs the prefill chunks and one batched decode step for all decoding sequences, so new requests join between
decode steps without stalling the running ones for more than a chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsalite.inference.serve.blocks import BlockManager
from dsalite.inference.serve.sequence import Sequence, Status


@dataclass
class Plan:
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to feed this step)
    decode: list[Sequence] = field(default_factory=list)  # one token each, in one batched call
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int = 32, prefill_tokens: int = 512, step_tokens: int = 1):
        """step_tokens: cache slots a decoding sequence takes per step (2 under MTP speculation: its newest token
        and the draft)."""
        if max_batch < 1 or prefill_tokens < 1:
            raise ValueError(f"max_batch and prefill_tokens must be >= 1, got {max_batch}, {prefill_tokens}")
        self.blocks, self.max_batch, self.prefill_tokens = blocks, max_batch, prefill_tokens
        self.step_tokens = step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or cancelled sequence out at once; its blocks return to the manager."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free_seq(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        plan = Plan()
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.uncached != 1:
                continue
            while not self.blocks.can_append(seq, self.step_tokens):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq, self.step_tokens)
                plan.decode.append(seq)
        budget = self.prefill_tokens
        for seq in self.running:
            if budget and seq.uncached > 1:
                n = min(seq.uncached, budget)
                plan.prefill.append((seq, n))
                budget -= n
        while budget and self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq.tokens):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.uncached, budget)
            plan.prefill.append((seq, n))
            budget -= n
        return plan

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        if seq in plan.decode:
            plan.decode.remove(seq)
        self.preemptions += 1
