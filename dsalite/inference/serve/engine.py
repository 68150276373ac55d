"""The serving engine: `step()` = schedule -> run the prefill chunks and one batched decode -> sample each sequence
with its own options -> detokenize and check stops -> outputs. `generate()` loops `step()`; the server calls
`add_request`, `abort` and `step` from its engine thread (server.py), never the runner or the cache.

Prefill chunks of the same length after the same number of cached tokens (new prompts, typically) run as one batched
call. A sequence whose model call or sampling raises fails alone: a batched prefill or decode that raises is
retried row by row so that only the row that raises again is failed.

speculative="mtp": every decoding sequence carries the MTP layer's draft for its next-but-one token; a decode step
feeds each row [newest token, draft] (S = 2, one batched call), accepts or rejects per row with its own sampling
options (speculative.py's rule: greedy output equals plain greedy; sampled output keeps the target distribution),
then one batched MTP call over the same slots refreshes every row's draft. The MTP layer's entries live in the paged
cache beside the trunk's (same slots, same block table), so preemption, prefix sharing and freeing cover them; a
rejected draft's slot is simply overwritten by the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dsalite.families import family
from dsalite.inference.sampling import probs, probs_and_sample, sample
from dsalite.inference.serve.blocks import BlockManager
from dsalite.inference.serve.paged_cache import PagedLatentCache
from dsalite.inference.serve.runner import ModelRunner, RowRunner
from dsalite.inference.serve.scheduler import Scheduler
from dsalite.inference.serve.sequence import RequestParams, Sequence, Status
from dsalite.inference.speculative import _accept, _resample


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds (/metrics histogram)


@dataclass
class Output:
    """What a step produced for one request since its last Output."""
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[dict]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    finished: dict = field(default_factory=dict)  # finish_reason -> count
    ttft_counts: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS) + 1))  # histogram
    ttft_sum: float = 0.0
    drafted: int = 0  # MTP drafts verified
    accepted: int = 0  # MTP drafts accepted

    def observe_ttft(self, s: float) -> None:
        self.ttft_sum += s
        i = next((i for i, b in enumerate(TTFT_BUCKETS) if s <= b), len(TTFT_BUCKETS))
        self.ttft_counts[i] += 1


class Engine:
    def __init__(self, model, num_blocks: int | None = None, block_size: int = 16, max_batch: int = 32,
                 prefill_tokens: int = 512, prefix_caching: bool = True, tokenizer=None, eos_ids=(),
                 max_model_len: int | None = None, compile: bool = False, cache_tokens: int = 65536,
                 speculative: str | None = None):
        """model: a dsalite Transformer; tokenizer: an `inference.text.TextModel` (None: ids only);
        num_blocks: cache blocks of block_size tokens (default: enough for cache_tokens tokens); for a family with
        its own cache (DeepSeek-V4) cache rows of max_model_len tokens each (default: max_batch; max_model_len then
        defaults to at most cache_tokens);
        speculative: None or "mtp" (per-sequence MTP speculation; the model needs MTP weights)."""
        cfg = model.cfg
        rows = family(cfg.model_type).cache  # a family with its own (unpaged) cache: one cache row per sequence
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
        if speculative and not len(model.mtp):
            raise ValueError("speculative='mtp' needs a model with MTP layers (num_nextn_predict_layers >= 1 and MTP "
                             "weights in the checkpoint)")
        if speculative and rows is not None:
            raise ValueError(f"speculative='mtp' is not served for {cfg.model_type} yet: its cache "
                             f"({rows.__name__}) cannot rewind a rejected draft per row; serve without it")
        if compile and rows is not None:  # measured: 5 recompiles of ~50 s each in 16 requests (row views' shapes)
            raise ValueError(f"compile is not served for {cfg.model_type} yet: its per-row cache views recompile as "
                             f"rows come and go; serve without --compile (dsalite generate --compile works)")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, frozenset(eos_ids)
        self.speculative = speculative
        spec = speculative == "mtp"
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        w = model.head_weight()
        if rows is None:
            num_blocks = num_blocks or -(-cache_tokens // block_size)
            self.cache = PagedLatentCache(cfg, num_blocks, block_size, dtype=w.dtype, device=w.device, mtp=spec)
            self.blocks = BlockManager(num_blocks, block_size, prefix_caching, lookahead=int(spec))
            self.runner = ModelRunner(model, self.cache, compile)
        else:
            # a row holds one sequence of up to max_model_len tokens: the block manager hands out rows as blocks
            # of that size (no prefix sharing: a row's window and compressor state belong to one sequence)
            if max_model_len is None:
                self.max_model_len = min(self.max_model_len, cache_tokens)
            num_blocks = num_blocks or max_batch
            self.cache = rows(cfg, num_blocks, self.max_model_len, dtype=w.dtype, device=w.device)
            self.blocks = BlockManager(num_blocks, self.max_model_len, prefix_caching=False)
            self.runner = RowRunner(model, self.cache)
        self.scheduler = Scheduler(self.blocks, max_batch, prefill_tokens, step_tokens=1 + int(spec))
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()

    # ----- requests -----
    def check(self, n_prompt: int, max_tokens: int) -> None:
        """Raise ValueError when a prompt of n_prompt tokens with max_tokens more can never be served."""
        need = n_prompt + max_tokens
        if need > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the request needs "
                             f"{need} ({n_prompt} in the prompt + {max_tokens} max_tokens)")
        if self.blocks.blocks_for(need) > self.blocks.num_blocks:
            raise ValueError(f"the request needs {self.blocks.blocks_for(need)} cache blocks of "
                             f"{self.blocks.block_size} tokens; the cache has {self.blocks.num_blocks} (--kv-blocks)")

    def add_request(self, prompt: list[int], params: RequestParams, request_id: str | None = None,
                    arrival: float | None = None) -> Sequence:
        V = self.model.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
        self.check(len(prompt), params.max_tokens)
        seq = Sequence(list(prompt), params, request_id or "", self.eos_ids)
        if arrival is not None:
            seq.arrival = arrival  # time.monotonic() when the request arrived (time to first token counts from it)
        if seq.request_id in self.seqs:
            raise ValueError(f"request id {seq.request_id!r} is already running")
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Output | None:
        """Cancel a request: its blocks are freed now."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return self._output(seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ----- the step -----
    def step(self) -> list[Output]:
        plan = self.scheduler.schedule()
        touched: list[Sequence] = []
        if self.speculative:
            for seq in plan.preempted:
                seq.draft = None
            # a prompt's last token reached by chunks is "decoding" for the scheduler, but it has no draft yet:
            # it goes through the prefill path, which makes the first draft
            plan.prefill += [(s, 1) for s in plan.decode if s.draft is None]
            plan.decode = [s for s in plan.decode if s.draft is not None]
        # chunks of one length after as many cached tokens run as one batched call: new prompts together, with no
        # key hidden (a continuing chunk of a long prompt beside a new one would make the new rows gather and mask
        # every key of the long one)
        groups: dict[tuple[int, int], list[Sequence]] = {}
        for seq, n in plan.prefill:
            groups.setdefault((n, seq.num_cached), []).append(seq)
        for (n, _), seqs in groups.items():
            prefill = self._prefill_mtp if self.speculative else self._prefill
            before = [s.num_cached for s in seqs]
            try:
                prefill(seqs, n)
            except Exception:  # noqa: BLE001 — find the sequence that raises: run the ones not fed one by one
                for seq, c in zip(seqs, before):
                    if seq.num_cached == c and not seq.finished:
                        try:
                            prefill([seq], n)
                        except Exception as e:  # noqa: BLE001 — this request fails, the others go on
                            self._fail(seq, e)
            touched += seqs
        if plan.decode:
            touched += self._decode(plan.decode)
        self.stats.steps += 1
        return [self._output(s) for s in dict.fromkeys(touched) if s.sent_tokens < len(s.output) or s.finished
                or s.sent_text < len(s.text)]

    def _decode(self, seqs: list[Sequence]) -> list[Sequence]:
        if self.speculative:
            try:
                self._speculate(seqs)
            except Exception:  # noqa: BLE001 — find the row that raises: run them one by one
                for s in seqs:
                    if not s.finished:
                        try:
                            self._speculate([s])
                        except Exception as e:  # noqa: BLE001
                            self._fail(s, e)
            return list(seqs)
        rows = lambda ss: [(s.block_table, s.num_cached, s.tokens[-1:]) for s in ss]  # noqa: E731
        try:
            logits = self.runner.run(rows(seqs))
            pairs = list(zip(seqs, logits))
        except Exception:  # noqa: BLE001 — find the row that raises: run them one by one
            pairs = []
            for s in seqs:
                try:
                    pairs.append((s, self.runner.run(rows([s]))[0]))
                except Exception as e:  # noqa: BLE001
                    self._fail(s, e)
        for s, lg in pairs:
            s.num_cached += 1
            self.blocks.commit(s)
            self._emit(s, lg)
        return list(seqs)

    # ----- MTP speculation -----
    def _prefill(self, seqs: list[Sequence], n: int) -> None:
        """The next n prompt tokens of each of seqs, in one call; a sequence whose prompt is now all cached samples
        its first token."""
        logits = self.runner.run([(s.block_table, s.num_cached, s.tokens[s.num_cached : s.num_cached + n])
                                  for s in seqs])
        for s, lg in zip(seqs, logits):
            s.num_cached += n
            self.blocks.commit(s)
            if s.uncached == 0:
                self._emit(s, lg)

    def _prefill_mtp(self, seqs: list[Sequence], n: int) -> None:
        """Prefill chunks (one call), then the MTP layer's entries for the same positions (one call): entry i is
        (h_i, t_{i+1}), t_{i+1} the prompt's next token or, after a prompt's last chunk, the token sampled now; the
        last entry's logits are then the first draft."""
        logits, h, topk, x = self.runner.run_all([(s.block_table, s.num_cached,
                                                   s.tokens[s.num_cached : s.num_cached + n]) for s in seqs],
                                                 last_only=True)
        last = [s.num_cached + n == len(s.tokens) for s in seqs]
        toks = [self._sample(s, lg[-1]) if done else s.tokens[s.num_cached + n]
                for s, lg, done in zip(seqs, logits, last)]
        nxt = torch.tensor([s.tokens[s.num_cached + 1 : s.num_cached + n] + [t] for s, t in zip(seqs, toks)],
                           device=x.ids.device)
        draft = self.runner.draft(x, h, nxt, topk)
        for b, (s, done, t) in enumerate(zip(seqs, last, toks)):
            s.num_cached += n
            self.blocks.commit(s)
            if done:
                s.draft = draft[b, -1]
                self._emit(s, logits[b, -1], t)

    def _speculate(self, seqs: list[Sequence]) -> None:
        """One speculative step for seqs: verify each row's draft with the trunk (S = 2), keep what the rule keeps
        (speculative.py's `_accept` / `_resample`), then refresh every row's draft in one MTP call."""
        drafts = [probs_and_sample(s.draft[None], s.params.sampling, s.generator) for s in seqs]  # (q [1, V], d [1])
        rows = [(s.block_table, s.num_cached, [s.tokens[-1], int(d)]) for s, (_, d) in zip(seqs, drafts)]
        logits, h, topk, x = self.runner.run_all(rows)  # [B, 2, V]
        kept = []  # per row: the tokens it keeps (draft + bonus, or the correction)
        for b, (s, (q, d)) in enumerate(zip(seqs, drafts)):
            p = s.params.sampling
            p0 = probs(logits[b : b + 1, 0], p)
            if _accept(p0, q, d, p, s.generator):
                kept.append([int(d), int(sample(logits[b : b + 1, 1], p, s.generator)[0])])
            else:
                kept.append([int(_resample(p0, q, p, s.generator))])
        # the MTP entries at both slots: (h_m, d), (h_m+1, bonus); a rejected row's second entry is a placeholder
        # that the next step overwrites (its first entry never sees it: causal)
        nxt = torch.tensor([[k[0], k[-1]] for k in kept], device=x.ids.device)
        draft = self.runner.draft(x, h, nxt, topk)
        for b, (s, k) in enumerate(zip(seqs, kept)):
            s.draft = draft[b, len(k) - 1]
            s.drafted += 1
            s.accepted += len(k) - 1
            self.stats.drafted += 1
            self.stats.accepted += len(k) - 1
            s.num_cached += len(k)
            for i, t in enumerate(k):
                self._emit(s, logits[b, i], t)
                if s.finished:
                    break
            self.blocks.commit(s)

    # ----- tokens -----
    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        return int(sample(logits[None], seq.params.sampling, seq.generator)[0])

    def _emit(self, seq: Sequence, logits: torch.Tensor, tok: int | None = None) -> None:
        """Sample seq's next token from logits [V] (or take `tok`, chosen by speculation from these logits), record
        it and its logprobs, check stops."""
        try:
            p = seq.params
            tok = self._sample(seq, logits) if tok is None else tok
            if p.logprobs:
                lp = torch.log_softmax(logits.float(), -1)
                top = lp.topk(p.top_logprobs) if p.top_logprobs else None
                seq.logprobs.append({"id": tok, "logprob": float(lp[tok]),
                                     "top": [] if top is None else list(zip(top.indices.tolist(),
                                                                            top.values.tolist()))})
        except Exception as e:  # noqa: BLE001
            self._fail(seq, e)
            return
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats.observe_ttft(now - seq.arrival)
            self.stats.prompt_tokens += len(seq.prompt)
        seq.tokens.append(tok)
        self.stats.generation_tokens += 1
        stop_id = (tok in seq.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        if self.tokenizer is not None:
            ids = seq.output[:-1] if stop_id else seq.output
            text = self.tokenizer.tokenizer.decode(ids, skip_special_tokens=False)
            hit = _find_stop(text, p.stop)
            seq.text = text if hit is None else text[:hit]
            if hit is not None:
                return self._finish(seq, "stop")
        if stop_id:
            self._finish(seq, "stop")
        elif len(seq.output) >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            self._finish(seq, "length")

    def _fail(self, seq: Sequence, e: Exception) -> None:
        seq.error = f"{type(e).__name__}: {e}"
        self._finish(seq, "error")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finished:
            return
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _output(self, seq: Sequence) -> Output:
        """The new tokens and text since the last output. While running, text that may still turn out to be the
        start of a stop string, or an incomplete UTF-8 character, is held back."""
        end = len(seq.text) if seq.finished else _safe_end(seq.text, seq.params.stop)
        end = max(end, seq.sent_text)
        n = len(seq.output)
        out = Output(seq.request_id, seq.output[seq.sent_tokens : n], seq.text[seq.sent_text : end],
                     seq.logprobs[seq.sent_tokens : n], seq.finished, seq.finish_reason, len(seq.prompt), n,
                     0, seq.error)
        seq.sent_tokens, seq.sent_text = n, end
        if seq.finished:
            self.seqs.pop(seq.request_id, None)
        return out

    # ----- offline use -----
    def generate(self, prompts: list[list[int]], params: RequestParams | list[RequestParams]) -> list[Sequence]:
        """Run prompts to completion together (continuous batching); the finished sequences in prompt order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, q) for p, q in zip(prompts, params)]
        while self.has_work:
            self.step()
        for s in seqs:  # drop anything not yet handed out
            self.seqs.pop(s.request_id, None)
        return seqs


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _safe_end(text: str, stops: list[str]) -> int:
    """Length of text that can be handed out: no trailing replacement character (a split UTF-8 sequence), no suffix
    that is the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    base = end
    for s in stops:
        for k in range(min(len(s) - 1, base), 0, -1):
            if text[:base].endswith(s[:k]):
                end = min(end, base - k)
                break
    return end
