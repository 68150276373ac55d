"""MTP speculation per sequence inside the continuous batch (`--speculative mtp`): greedy outputs equal plain
decoding, and every sequence drafts and accepts exactly what the single-request drafter (speculative.py) does alone."""

import re

import pytest
import torch

import dsalite
from dsalite.inference.runner import Stats
from dsalite.inference.serve.engine import Engine
from dsalite.inference.serve.sequence import RequestParams
from serve_fixtures import ServerThread, tiny_model


def drafting_model():
    """A tiny GLM model whose MTP layer drafts well enough to be both accepted and rejected: every block's output
    scaled by 0.1 (the logits are then mostly a function of the current token), the MTP layer given the trunk's
    embeddings and head and an eh_proj that passes the next token's embedding through."""
    m = tiny_model()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj", "down_proj.weight")):
                p.mul_(0.1)
        mtp, D = m.mtp[0], m.cfg.hidden_size
        mtp.embed_tokens.weight.copy_(m.model.embed_tokens.weight)
        mtp.shared_head.head.weight.copy_(m.lm_head.weight)
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :D] = torch.eye(D)
    return m.eval()


@pytest.fixture(scope="module")
def drafter():
    return drafting_model()


def solo(model, prompt, n):
    """The single-request speculative run: (new ids, drafted, accepted)."""
    st = Stats()
    out = dsalite.generate(model, torch.tensor([prompt]), max_new_tokens=n, speculative="mtp", stats=st)
    return out[0, len(prompt):].tolist(), st.drafted, st.accepted


def test_batched_speculation_equals_plain_and_each_alone(drafter):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in range(2, 50, 6)]  # 8 lengths
    params = RequestParams(max_tokens=12, temperature=0.0, logprobs=True)
    kw = dict(num_blocks=120, block_size=8, max_batch=8, prefill_tokens=24)
    plain = Engine(drafter, **kw).generate(prompts, params)
    eng = Engine(drafter, speculative="mtp", **kw)
    spec = eng.generate(prompts, params)
    for p, a, s in zip(prompts, plain, spec):
        assert s.output == a.output and len(s.output) == 12 and s.finish_reason == "length"
        # the MTP entries in the paged cache are the drafter's: same drafts, same verdicts as the request alone
        assert solo(drafter, p, 12) == (s.output, s.drafted, s.accepted)
        torch.testing.assert_close(torch.tensor([e["logprob"] for e in s.logprobs]),
                                   torch.tensor([e["logprob"] for e in a.logprobs]), rtol=0, atol=1e-5)
    assert eng.stats.drafted == sum(s.drafted for s in spec) and eng.stats.accepted == sum(s.accepted for s in spec)
    assert 0 < eng.stats.accepted < eng.stats.drafted  # both verdicts taken
    assert eng.stats.steps < len(prompts) * 12  # batched
    assert eng.blocks.in_use == 0 and not eng.has_work


def test_speculation_with_prefix_hits_preemption_and_sampling(drafter):
    g = torch.Generator().manual_seed(12)
    shared = torch.randint(0, 256, (16,), generator=g).tolist()  # two full blocks of 8
    params = RequestParams(max_tokens=10, temperature=0.0)
    eng = Engine(drafter, num_blocks=64, block_size=8, speculative="mtp")
    eng.generate([shared + [4, 5, 6]], params)
    # under speculation a block is named with the token after it too (its last MTP entry is computed from it):
    # a prompt that differs right after the second block shares only the first; one that goes on alike, both
    for tail, hits in (([7, 8], 8), ([4, 9], 8 + 16)):
        seq = eng.generate([shared + tail], params)[0]
        assert eng.blocks.hit_tokens == hits
        assert solo(drafter, shared + tail, 10) == (seq.output, seq.drafted, seq.accepted)

    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (12, 7, 15, 9)]
    small = Engine(drafter, num_blocks=14, block_size=4, max_batch=4, prefill_tokens=16, speculative="mtp")
    seqs = small.generate(prompts, RequestParams(max_tokens=12, temperature=0.0))
    assert small.scheduler.preemptions > 0
    for p, s in zip(prompts, seqs):
        assert s.output == dsalite.generate(drafter, torch.tensor([p]), max_new_tokens=12)[0, len(p):].tolist()
    assert small.blocks.in_use == 0

    sampled = RequestParams(max_tokens=9, temperature=0.8, top_k=20, seed=3)
    runs = [Engine(drafter, num_blocks=64, block_size=8, speculative="mtp").generate(prompts, sampled)
            for _ in range(2)]
    assert [s.output for s in runs[0]] == [s.output for s in runs[1]]  # seeded: reproducible
    assert all(len(s.output) == 9 for s in runs[0])


def test_speculation_refusals(glm):
    with pytest.raises(ValueError, match="speculative must be None or 'mtp'"):
        Engine(glm, num_blocks=8, speculative="eagle")
    no_mtp = tiny_model(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="needs a model with MTP layers"):
        Engine(no_mtp, num_blocks=8, speculative="mtp")


def metric(text: str, name: str) -> float:
    m = re.search(rf"^dsalite_{name} (\S+)$", text, re.M)
    assert m, f"dsalite_{name} missing from /metrics"
    return float(m.group(1))


def test_server_speculative_streams_the_plain_output_and_reports_acceptance(ckpt):
    import urllib.request

    from openai import OpenAI

    s = ServerThread(ckpt, speculative="mtp")
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        prompts = [[5, 9, 30, 2, 7], list(range(40, 75)), [3] * 12]
        plain = Engine(s.engine.model, num_blocks=64, block_size=8).generate(
            prompts, RequestParams(max_tokens=10, temperature=0.0, ignore_eos=True))
        for p, want in zip(prompts, plain):
            stream = client.completions.create(model=s.name, prompt=p, max_tokens=10, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True},
                                               stream_options={"include_usage": True})
            chunks = list(stream)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert text == s.engine.tokenizer.tokenizer.decode(want.output, skip_special_tokens=False)
            assert chunks[-1].usage.completion_tokens == 10
        m = urllib.request.urlopen(s.url + "/metrics", timeout=30).read().decode()
        drafted, accepted = metric(m, "spec_draft_tokens_total"), metric(m, "spec_accepted_tokens_total")
        assert drafted == s.engine.stats.drafted > 0 and accepted == s.engine.stats.accepted
    finally:
        s.stop()


def test_speculation_stops_where_plain_decoding_stops(drafter):
    """A stop id or max_tokens reached by an accepted draft ends the sequence there: its bonus token is dropped."""
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 17, 30)]
    free = Engine(drafter, num_blocks=64, block_size=8).generate(prompts, RequestParams(max_tokens=14,
                                                                                       temperature=0.0))
    for cut in (1, 4, 7):  # stop on the cut-th token; max_tokens = cut elsewhere
        stops = [RequestParams(max_tokens=14, temperature=0.0, stop_token_ids=[f.output[cut - 1]]) for f in free]
        spec = Engine(drafter, num_blocks=64, block_size=8, speculative="mtp").generate(prompts, stops)
        for f, s in zip(free, spec):
            first = f.output.index(f.output[cut - 1]) + 1
            assert s.output == f.output[:first] and s.finish_reason == "stop"
        short = Engine(drafter, num_blocks=64, block_size=8, speculative="mtp").generate(
            prompts, RequestParams(max_tokens=cut, temperature=0.0))
        assert [s.output for s in short] == [f.output[:cut] for f in free]
