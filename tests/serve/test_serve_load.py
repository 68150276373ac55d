"""Load: 64 concurrent streaming clients (the async openai client) on a model of `make demo`'s size. Every client
that stays gets exactly its token count; half leave mid-stream and their requests and blocks go at once; the
process's memory grows with the cache blocks, not with the requests."""

import asyncio
import os
import threading
import time

import pytest

from serve_fixtures import WORDS, ServerThread, make_checkpoint

CLIENTS = 64


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("load"), "demo-glm", demo=True)
    # 96 blocks of 16 tokens: room for ~40 of the 64 requests at their longest, so the cache, not the number of
    # requests, bounds what is held (the rest wait or are preempted)
    s = ServerThread(path, max_queue=CLIENTS, num_blocks=96, block_size=16, max_batch=CLIENTS, prefill_tokens=256)
    yield s
    s.stop()


async def one_client(client, name: str, i: int, leave_after: int | None, left: list):
    """Stream one completion; count the tokens streamed (one logprobs entry each). leave_after: close the stream
    after that many tokens. → (tokens seen, finish_reason, usage, left)."""
    n = 0
    finish = usage = None
    stream = await client.completions.create(
        model=name, prompt=" ".join(WORDS[i % 4 : i % 4 + 1 + i % 3]), max_tokens=20 + i % 13, temperature=0,
        logprobs=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            n += len(chunk.choices[0].logprobs.tokens)
            finish = chunk.choices[0].finish_reason or finish
        if leave_after is not None and n >= leave_after:
            await stream.close()  # the client goes away mid-stream
            left.append(time.monotonic())
            return n, None, None, True
    return n, finish, usage, False


def test_64_streaming_clients_half_leave(demo_server):
    s = demo_server
    eng = s.engine
    warm = asyncio.run(_run(s, [(0, None)]))  # first-call costs (allocator, tokenizer) out of the measurement
    assert warm[0][1] == "length"
    base, peak, stop = rss(), [rss()], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    plan = [(i, 4 + i % 5 if i % 2 else None) for i in range(CLIENTS)]  # odd clients leave after 4-8 tokens
    watch = {}
    results = asyncio.run(_run(s, plan, watch))
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join()

    for (i, leave), (n, finish, usage, left) in zip(plan, results):
        want = 20 + i % 13
        if leave is None:
            assert not left and n == want and finish == "length" and usage.completion_tokens == want, (i, n, usage)
        else:
            assert left and leave <= n < want
    end = time.monotonic() + 10
    while eng.has_work or s.aengine.pending:
        assert time.monotonic() < end, "the engine did not go idle"
        time.sleep(0.02)
    assert eng.blocks.in_use == 0 and not eng.seqs  # every block back, every request gone
    assert eng.stats.finished.get("abort", 0) == CLIENTS // 2
    # the leavers' requests were cancelled (blocks freed) right after the last one left, while stayers still ran
    assert watch["aborted_after_s"] < 5.0 and watch["running"] > 0, watch
    assert eng.stats.finished.get("length", 0) == CLIENTS // 2 + 1  # the stayers and the warm-up
    # the leavers' requests stopped where they left: far fewer tokens than 64 full runs
    full = sum(20 + i % 13 for i in range(CLIENTS))
    assert eng.stats.generation_tokens - 20 < full - sum(20 + i % 13 - 9 for i in range(1, CLIENTS, 2))
    # memory: the growth under load stays within the cache's bytes plus a fixed allowance (Python objects of 64
    # requests, activations of a 64-row step, allocator slack) — not per-request caches
    growth = peak[0] - base
    assert growth < eng.cache.bytes() + 32 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB under load"
    assert elapsed < 60
    print(f"\n64 clients: {elapsed:.1f}s, RSS +{growth / 2**20:.1f} MiB (cache {eng.cache.bytes() / 2**20:.1f} MiB), "
          f"after the leavers went: {watch}, preemptions {eng.scheduler.preemptions}")


async def _run(s, plan, watch=None):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
    left: list[float] = []
    leavers = sum(leave is not None for _, leave in plan)
    try:
        tasks = [asyncio.create_task(one_client(client, s.name, i, leave, left)) for i, leave in plan]
        if watch is not None:
            await _watch(s.engine, left, leavers, watch)
        return await asyncio.gather(*tasks)
    finally:
        await client.close()


async def _watch(eng, left: list, leavers: int, out: dict) -> None:
    """After the last leaver has gone: how long until the engine has cancelled all of them, and what still runs."""
    while len(left) < leavers:
        await asyncio.sleep(0.005)
    end = time.monotonic() + 30
    while eng.stats.finished.get("abort", 0) < leavers and time.monotonic() < end:
        await asyncio.sleep(0.005)
    out.update(aborted_after_s=round(time.monotonic() - max(left), 3), running=len(eng.scheduler.running),
               blocks_in_use=eng.blocks.in_use)
