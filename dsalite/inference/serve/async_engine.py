"""The engine on its own thread, for the asyncio server: requests in through a queue, outputs back per request.

One thread owns the `Engine` (no locks inside it): it drains the inbox (new requests, cancellations) between steps,
runs `step()` while there is work and sleeps on an event otherwise. Outputs go to each request's asyncio queue via
`call_soon_threadsafe`. A cancellation (client gone) is applied before the next step, so its slot and blocks are
free within one step. Also the server's counters for /metrics.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque

from dsalite.inference.serve.engine import TTFT_BUCKETS, Engine, Output
from dsalite.inference.serve.sequence import RequestParams



class QueueFull(Exception):
    pass


class Stopping(Exception):
    pass


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine, self.max_queue = engine, max_queue
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.pending = 0  # requests submitted, not yet taken in by the engine thread
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.accepting, self.stopped = True, False
        self.requests = {"submitted": 0, "rejected_queue_full": 0}
        self.rate: deque[tuple[float, int]] = deque(maxlen=64)  # (time, generation tokens) after recent steps
        self.step_errors = 0
        self.thread = threading.Thread(target=self._loop, name="dsalite-engine", daemon=True)
        self.thread.start()

    # ----- called from the event loop -----
    @property
    def queue_depth(self) -> int:
        return self.pending + len(self.engine.scheduler.waiting)

    def submit(self, request_id: str, prompt: list[int], params: RequestParams) -> asyncio.Queue:
        """Queue a request; its Outputs arrive on the returned queue. Raises QueueFull, Stopping, or ValueError
        (the request can never be served: too long for the context or the cache)."""
        if not self.accepting:
            raise Stopping("the server is shutting down")
        if self.queue_depth >= self.max_queue:
            self.requests["rejected_queue_full"] += 1
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
        self.engine.check(len(prompt), params.max_tokens)
        q: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = (asyncio.get_running_loop(), q)
        self.pending += 1
        self.requests["submitted"] += 1
        self.inbox.put(("add", request_id, prompt, params, time.monotonic()))
        self.wake.set()
        return q

    def abort(self, request_id: str) -> None:
        if self.streams.pop(request_id, None) is not None:
            self.inbox.put(("abort", request_id))
            self.wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let running ones finish for up to `timeout` seconds, cancel the rest, stop."""
        self.accepting = False
        end = time.monotonic() + timeout
        while (self.engine.has_work or self.pending) and time.monotonic() < end:
            time.sleep(0.02)
        self.inbox.put(("stop",))
        self.wake.set()
        self.thread.join(timeout=max(1.0, end - time.monotonic() + 1.0))

    # ----- the engine thread -----
    def _loop(self) -> None:
        while not self.stopped:
            self._drain()
            if self.stopped:
                break
            if not self.engine.has_work:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # noqa: BLE001 — a step that fails outside any one request: fail the running
                self.step_errors += 1
                outs = []
                for rid in list(self.engine.seqs):
                    seq = self.engine.seqs[rid]
                    self.engine._fail(seq, e)
                    outs.append(self.engine._output(seq))
            self.rate.append((time.monotonic(), self.engine.stats.generation_tokens))
            for o in outs:
                self._deliver(o)
        for rid in list(self.engine.seqs):  # shutdown: cancel what is left
            o = self.engine.abort(rid)
            if o is not None:
                self._deliver(o)

    def _drain(self) -> None:
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "stop":
                self.stopped = True
                return
            if msg[0] == "abort":
                self.engine.abort(msg[1])
                continue
            _, rid, prompt, params, arrival = msg
            self.pending -= 1
            if rid not in self.streams:  # cancelled before it was taken in
                continue
            try:
                self.engine.add_request(prompt, params, rid, arrival)
            except Exception as e:  # noqa: BLE001
                self._deliver(Output(rid, [], "", [], True, "error", len(prompt), 0, error=str(e)))

    def _deliver(self, out: Output) -> None:
        target = self.streams.get(out.request_id)
        if out.finished:
            self.streams.pop(out.request_id, None)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, out)
            except RuntimeError:  # the event loop is closed (shutdown)
                pass

    # ----- /metrics -----
    def tokens_per_second(self, window: float = 10.0) -> float:
        pts = list(self.rate)
        now = time.monotonic()
        pts = [p for p in pts if now - p[0] <= window]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return 0.0
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def metrics(self) -> str:
        e = self.engine
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP dsalite_{name} {help_}")
            lines.append(f"# TYPE dsalite_{name} {kind}")
            for labels, v in samples:
                lines.append(f"dsalite_{name}{labels} {v}")

        metric("requests_total", "counter", "Requests finished, by finish reason.",
               [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(e.stats.finished.items())] or [("", 0)])
        metric("requests_submitted_total", "counter", "Requests accepted into the queue.",
               [("", self.requests["submitted"])])
        metric("requests_rejected_total", "counter", "Requests refused because the queue was full.",
               [("", self.requests["rejected_queue_full"])])
        metric("queue_depth", "gauge", "Requests waiting for a batch slot.", [("", self.queue_depth)])
        metric("running_batch", "gauge", "Sequences in the running batch.", [("", len(e.scheduler.running))])
        metric("prompt_tokens_total", "counter", "Prompt tokens of requests that produced a token.",
               [("", e.stats.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated.", [("", e.stats.generation_tokens)])
        metric("generation_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
               [("", round(self.tokens_per_second(), 3))])
        cum, samples = 0, []
        for b, c in zip(TTFT_BUCKETS, e.stats.ttft_counts):
            cum += c
            samples.append((f'_bucket{{le="{b}"}}', cum))
        total = cum + e.stats.ttft_counts[-1]
        samples += [('_bucket{le="+Inf"}', total), ("_sum", round(e.stats.ttft_sum, 6)), ("_count", total)]
        metric("time_to_first_token_seconds", "histogram", "Seconds from arrival to the first token.", samples)
        metric("cache_blocks_in_use", "gauge", "Paged cache blocks held by sequences.", [("", e.blocks.in_use)])
        metric("cache_blocks_cached", "gauge", "Unused blocks kept for prefix-cache hits (reused when needed).",
               [("", len(e.blocks.idle))])
        metric("cache_blocks_total", "gauge", "Paged cache blocks.", [("", e.blocks.num_blocks)])
        metric("cache_block_size", "gauge", "Tokens per cache block.", [("", e.blocks.block_size)])
        metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               [("", e.blocks.hit_tokens)])
        metric("spec_draft_tokens_total", "counter", "MTP draft tokens verified (--speculative mtp).",
               [("", e.stats.drafted)])
        metric("spec_accepted_tokens_total", "counter", "MTP draft tokens accepted (--speculative mtp).",
               [("", e.stats.accepted)])
        metric("preemptions_total", "counter", "Sequences preempted (recomputed later) for lack of cache blocks.",
               [("", e.scheduler.preemptions)])
        return "\n".join(lines) + "\n"
