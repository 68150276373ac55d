"""Continuous batching over the paged cache against the contiguous cache and against `dsalite.generate` alone."""

import pytest
import torch

import dsalite
from dsalite.inference.cache import LatentCache
from dsalite.inference.runner import Runner
from dsalite.inference.serve.blocks import BlockManager
from dsalite.inference.serve.engine import Engine
from dsalite.inference.serve.paged_cache import PagedLatentCache
from dsalite.inference.serve.runner import ModelRunner
from dsalite.inference.serve.sequence import RequestParams, Sequence
from serve_fixtures import tiny_model, tiny_v4


def contiguous_logits(model, prompt, fed):
    """Logits after the prompt and after each fed token, one sequence alone in a LatentCache."""
    cache = LatentCache(model.cfg, 1, len(prompt) + len(fed))
    r = Runner(model, cache, prefill_chunk=8)
    ids = torch.tensor([prompt])
    lg, _ = r.feed(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(len(prompt))[None])
    out = [lg[0, -1]]
    for i, t in enumerate(fed):
        lg, _ = r.feed(torch.tensor([[t]]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([[len(prompt) + i]]))
        out.append(lg[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "deepseek_v32", "deepseek_v3"])
def test_paged_decode_logits_equal_contiguous_cache(model_type):
    model = tiny_model(model_type)
    g = torch.Generator().manual_seed(1)
    lens = [3, 29, 17, 9, 40]  # shorter and longer than index_topk (dense and sparse rows in one step)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
    fed = [torch.randint(0, 256, (4,), generator=g).tolist() for _ in lens]
    cache, blocks = PagedLatentCache(model.cfg, 40, 4), BlockManager(40, 4)
    runner = ModelRunner(model, cache)
    seqs = [Sequence(p, RequestParams()) for p in prompts]
    got = [[] for _ in seqs]
    for i, s in enumerate(seqs):
        blocks.allocate(s)
        for c in range(0, len(s.tokens), 8):  # prefill in chunks of 8
            lg = runner.run([(s.block_table, c, s.tokens[c : c + 8])])
        s.num_cached = len(s.tokens)
        got[i].append(lg[0])
    for step in range(4):  # one batched decode step for all five lengths
        for s, f in zip(seqs, fed):
            s.tokens.append(f[step])
            blocks.append(s)
        lg = runner.run([(s.block_table, s.num_cached, s.tokens[-1:]) for s in seqs])
        for i, s in enumerate(seqs):
            s.num_cached += 1
            got[i].append(lg[i])
    for i, (p, f) in enumerate(zip(prompts, fed)):
        ref = contiguous_logits(model, p, f)
        torch.testing.assert_close(torch.stack(got[i]), ref, rtol=0, atol=1e-4)
    assert blocks.in_use == sum(-(-(n + 4) // 4) for n in lens)  # memory: the tokens cached, no more


def solo_logprobs(model, prompt, out):
    """Log-probabilities of one sequence decoding alone through the contiguous cache (`dsalite.generate`'s path):
    the chosen tokens' [n] and every position's [n, V]."""
    lp = torch.log_softmax(contiguous_logits(model, prompt, out[:-1]).float(), -1)
    return lp.gather(1, torch.tensor(out)[:, None])[:, 0], lp


def test_sixteen_concurrent_requests_equal_each_alone(glm):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in range(2, 50, 3)]  # 16 lengths
    assert len(prompts) == 16
    eng = Engine(glm, num_blocks=160, block_size=8, max_batch=16, prefill_tokens=24)
    params = RequestParams(max_tokens=10, temperature=0.0, logprobs=True, top_logprobs=3)
    seqs = eng.generate(prompts, params)
    assert eng.stats.steps < 16 * 12  # batched: far fewer steps than one request at a time
    for p, s in zip(prompts, seqs):
        alone = dsalite.generate(glm, torch.tensor([p]), max_new_tokens=10)[0, len(p):].tolist()
        assert s.output == alone and s.finish_reason == "length"
        ref, full = solo_logprobs(glm, p, s.output)
        got = torch.tensor([e["logprob"] for e in s.logprobs])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        top = full.topk(3)
        for e, ids, vals in zip(s.logprobs, top.indices, top.values):
            assert [i for i, _ in e["top"]] == ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in e["top"]]), vals, rtol=0, atol=1e-5)
    assert eng.blocks.in_use == 0 and not eng.has_work


def test_prefix_cache_hit_gives_the_cold_logits(glm):
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 256, (21,), generator=g).tolist()  # 2 full blocks of 8 and a partial one
    a, b = shared + [5, 6, 7], shared + [9]
    params = RequestParams(max_tokens=6, temperature=0.0, logprobs=True)
    cold = Engine(glm, num_blocks=64, block_size=8, prefix_caching=False).generate([b], params)[0]
    eng = Engine(glm, num_blocks=64, block_size=8)
    eng.generate([a], params)
    assert eng.blocks.hit_tokens == 0 and len(eng.blocks.idle) >= 2  # a's full blocks stay named after it ends
    warm = eng.generate([b], params)[0]
    assert eng.blocks.hit_tokens == 16  # b's first two blocks came from a
    assert warm.output == cold.output
    torch.testing.assert_close(torch.tensor([e["logprob"] for e in warm.logprobs]),
                               torch.tensor([e["logprob"] for e in cold.logprobs]), rtol=0, atol=1e-5)


def test_lru_eviction_and_block_accounting():
    blocks = BlockManager(4, 2)
    s1 = Sequence([1, 2, 3, 4, 5], RequestParams())
    blocks.allocate(s1)
    s1.num_cached = 5
    blocks.commit(s1)
    assert len(s1.block_table) == 3 and blocks.in_use == 3
    blocks.free_seq(s1)
    assert blocks.in_use == 0 and len(blocks.idle) == 2 and len(blocks.free) == 2
    s2 = Sequence([1, 2, 3, 4, 9], RequestParams())
    assert blocks.can_allocate(s2.tokens)
    blocks.allocate(s2)
    assert s2.num_cached == 4 and blocks.in_use == 3  # two shared, one new
    s3 = Sequence([7, 7, 7], RequestParams())
    assert not blocks.can_allocate(s3.tokens)  # one block left, s3 needs two
    blocks.free_seq(s2)
    named = dict(blocks.key_of)
    blocks.allocate(s3)  # the two free blocks first: both named blocks survive
    assert blocks.in_use == 2 and len(blocks.idle) == 2 and not blocks.free
    assert not set(s3.block_table) & set(named) and blocks.key_of == named
    s4 = Sequence([8], RequestParams())
    blocks.allocate(s4)  # nothing free: evicts the least recently released named block, the deeper one ([3, 4])
    assert named == {0: named[0], 1: named[1]}  # s1's two full blocks: 0 = [1, 2], 1 = [3, 4]
    assert s4.block_table == [1] and list(blocks.idle) == [0] and list(blocks.key_of) == [0]
    s5 = Sequence([1, 2, 3, 4, 5], RequestParams())
    assert blocks.can_allocate(s5.tokens) is False  # needs 3 blocks, 1 available (the shared first block)
    blocks.free_seq(s3)
    blocks.allocate(s5)
    assert s5.num_cached == 2 and s5.block_table[0] == 0  # [1, 2] still hits; [3, 4] was evicted


def test_small_cache_preempts_and_still_equals_each_alone(glm):
    """A cache too small for every sequence at once: the newest are preempted and recomputed, outputs unchanged."""
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (12, 7, 15, 9)]
    params = RequestParams(max_tokens=12, temperature=0.0)
    eng = Engine(glm, num_blocks=12, block_size=4, max_batch=4, prefill_tokens=16)
    seqs = eng.generate(prompts, params)
    assert eng.scheduler.preemptions > 0
    for p, s in zip(prompts, seqs):
        assert s.output == dsalite.generate(glm, torch.tensor([p]), max_new_tokens=12)[0, len(p):].tolist()
    assert eng.blocks.in_use == 0


def test_abort_frees_at_once_and_stops(glm):
    eng = Engine(glm, num_blocks=64, block_size=4)
    a = eng.add_request(list(range(1, 20)), RequestParams(max_tokens=50, temperature=0.0))
    b = eng.add_request(list(range(3, 9)), RequestParams(max_tokens=3, temperature=0.0, stop_token_ids=[]))
    eng.step()
    eng.step()
    held = eng.blocks.in_use
    out = eng.abort(a.request_id)
    assert out.finished and out.finish_reason == "abort" and eng.blocks.in_use < held
    while eng.has_work:
        eng.step()
    assert b.finish_reason == "length" and len(b.output) == 3 and eng.blocks.in_use == 0


def test_stop_token_ids_and_eos(glm):
    p = list(range(10, 30))
    free = Engine(glm, num_blocks=32, block_size=8).generate([p], RequestParams(max_tokens=8, temperature=0))[0]
    stop = free.output[3]
    first = free.output.index(stop)
    s = Engine(glm, num_blocks=32, block_size=8).generate(
        [p], RequestParams(max_tokens=8, temperature=0, stop_token_ids=[stop]))[0]
    assert s.output == free.output[: first + 1] and s.finish_reason == "stop"
    e = Engine(glm, num_blocks=32, block_size=8, eos_ids=[stop]).generate([p], RequestParams(max_tokens=8,
                                                                                              temperature=0))[0]
    assert e.output == s.output
    ign = Engine(glm, num_blocks=32, block_size=8, eos_ids=[stop]).generate(
        [p], RequestParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert ign.output == free.output


def test_requests_that_cannot_fit_are_refused(glm):
    eng = Engine(glm, num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length is 64"):
        eng.add_request(list(range(60)), RequestParams(max_tokens=10))
    with pytest.raises(ValueError, match="cache blocks"):
        eng.add_request(list(range(10)), RequestParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request([1, 100000], RequestParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        RequestParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        RequestParams(top_p=0)


def v4_solo_logprobs(model, prompt, out):
    """Log-probabilities [n, V] of one DeepSeek-V4 sequence decoding `out` alone through its own V4Cache."""
    from dsalite.inference.runner import new_cache

    r = Runner(model, new_cache(model, 1, len(prompt) + len(out)), prefill_chunk=8)
    ids = torch.tensor([prompt + out[:-1]])
    lg, _ = r.feed(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(ids.shape[1])[None], all_logits=True)
    return torch.log_softmax(lg[0, len(prompt) - 1 :].float(), -1)


def test_deepseek_v4_concurrent_requests_equal_each_alone():
    """DeepSeek-V4 serves one cache row per sequence: 16 requests of 16 lengths through 6 rows (so rows are reused,
    decode batches are sometimes a slice of the pool and sometimes gathered around a row still prefilling), each
    equal to `dsalite.generate` alone and to its solo log-probabilities; rows all returned at the end."""
    from dsalite.families.deepseek_v4.cache import V4Rows

    model = tiny_v4()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in range(2, 50, 3)]
    eng = Engine(model, max_batch=6, prefill_tokens=24, max_model_len=128)
    assert eng.blocks.num_blocks == 6 and eng.cache.capacity == 128
    views = []
    init = V4Rows.__init__
    V4Rows.__init__ = lambda self, *a: views.append(self) or init(self, *a)
    try:
        seqs = eng.generate(prompts, RequestParams(max_tokens=12, temperature=0.0, logprobs=True))
    finally:
        V4Rows.__init__ = init
    kinds = {isinstance(v.sel, slice) for v in views}
    assert kinds == {True, False}  # both the sliced and the gathered path ran
    for p, s in zip(prompts, seqs):
        alone = dsalite.generate(model, torch.tensor([p]), max_new_tokens=12)[0, len(p):].tolist()
        assert s.output == alone and s.finish_reason == "length"
        ref = v4_solo_logprobs(model, p, s.output)
        got = torch.tensor([e["logprob"] for e in s.logprobs])
        torch.testing.assert_close(got, ref.gather(1, torch.tensor(s.output)[:, None])[:, 0], rtol=0, atol=1e-5)
    assert eng.blocks.in_use == 0 and not eng.has_work


def test_deepseek_v4_call_that_raises_leaves_the_rows_as_they_were(monkeypatch):
    """A batched V4 decode that raises half-way through the model (after some layers ran) is retried row by row by
    the engine; the rows' windows and compressor state were not touched by the failed call, so every request still
    equals `dsalite.generate` alone."""
    model = tiny_v4()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 17, 9)]
    eng = Engine(model, max_batch=4, prefill_tokens=64, max_model_len=64)
    block = model.model.layers["3"]
    real, calls = block.forward, []

    def flaky(x, ctx, topk):
        calls.append(x.shape[0])
        if x.shape[0] == 4 and x.shape[1] == 1 and calls.count(4) == 5:  # the fifth batched decode, once
            raise RuntimeError("injected failure")
        return real(x, ctx, topk)

    monkeypatch.setattr(block, "forward", flaky)
    seqs = eng.generate(prompts, RequestParams(max_tokens=10, temperature=0.0))
    assert calls.count(4) > 5 and calls.count(1) >= 4  # the failed step was retried one row at a time
    for p, s in zip(prompts, seqs):
        assert s.finish_reason == "length"
        assert s.output == dsalite.generate(model, torch.tensor([p]), max_new_tokens=10)[0, len(p):].tolist()


def test_deepseek_v4_refusals_name_the_reason():
    model = tiny_v4(num_nextn_predict_layers=1)
    with pytest.raises(ValueError, match=r"speculative='mtp' is not served for deepseek_v4 yet.*V4Cache"):
        Engine(model, speculative="mtp")
    with pytest.raises(ValueError, match=r"compile is not served for deepseek_v4 yet"):
        Engine(model, compile=True)
    eng = Engine(model, max_batch=2, max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length is 64 tokens; the request needs 70"):
        eng.add_request(list(range(60)), RequestParams(max_tokens=10))


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_prompts_prefilled_together_equal_each_alone(glm, speculative):
    """New prompts of one length are prefilled in one batched call; each still gets its solo logits."""
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 256, (13,), generator=g).tolist() for _ in range(6)]
    eng = Engine(glm, num_blocks=64, block_size=8, prefill_tokens=64, speculative=speculative)
    calls = []
    for name in ("run", "run_all"):
        fn = getattr(eng.runner, name)
        setattr(eng.runner, name, lambda rows, *a, fn=fn, **k: calls.append(len(rows[0][2]) and len(rows)) or
                fn(rows, *a, **k))
    seqs = eng.generate(prompts, RequestParams(max_tokens=5, temperature=0.0, logprobs=True))
    assert calls[0] == 4  # 4 whole prompts (52 tokens) in the first call; the 5th's first 12 tokens in the next
    for p, s in zip(prompts, seqs):
        ref, _ = solo_logprobs(glm, p, s.output)
        assert s.output == dsalite.generate(glm, torch.tensor([p]), max_new_tokens=5)[0, len(p):].tolist()
        torch.testing.assert_close(torch.tensor([e["logprob"] for e in s.logprobs]), ref, rtol=0, atol=1e-5)


def test_compiled_decode_compiles_once_for_every_batch_size(glm, monkeypatch):
    """`--compile`: one graph per attention regime (keys <= index_topk: every key; above: the top-k) serves decode
    steps of any number of rows and lengths. (Size tests on the batch — a chunk size, a BLAS row threshold — and duck
    sizing, which tied a first batch of 4 rows to the rope table's 4 frequencies, made the batch size a constant of
    the graph: a server recompiled, ~1 minute each, as clients came and went.) A counting eager backend counts the
    graphs quickly; outputs still equal the eager engine's."""
    from torch._dynamo.testing import CompileCounter

    import dsalite.inference.serve.runner as serve_runner
    from dsalite.inference.runner import compiled

    counter = CompileCounter()
    monkeypatch.setattr(serve_runner, "compiled", lambda fn: compiled(fn, backend=counter))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    eng = Engine(glm, num_blocks=128, block_size=8, max_batch=16, compile=True)
    ref = Engine(glm, num_blocks=128, block_size=8, max_batch=16)
    params = RequestParams(max_tokens=4, temperature=0.0)
    freqs = glm.tables["main"][0].shape[0]  # a first batch of this many rows once took the rope table's symbol
    for n in (freqs, 5, 8, 2):
        prompts = [torch.randint(0, 256, (4 + 3 * i,), generator=g).tolist() for i in range(n)]
        got = [s.output for s in eng.generate(prompts, params)]
        assert got == [s.output for s in ref.generate(prompts, params)]
    torch._dynamo.reset()
    assert counter.frame_count == 2
