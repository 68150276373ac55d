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
from serve_fixtures import tiny_model


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
