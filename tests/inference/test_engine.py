"""The engine against full forwards and against transformers' generate, on tiny checkpoints transformers builds."""

import pytest
import torch

import dsalite
from dsalite.checkpoint.pretrained import from_pretrained
from dsalite.inference.cache import LatentCache
from dsalite.inference.runner import Runner, Stats
from dsalite.verify import compare
from hf_fixtures import make_checkpoint

CASES = ["glm52_schedule", "v32_groups", "v3"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {c: make_checkpoint(root, c) for c in CASES}


@pytest.mark.parametrize("case", CASES)
def test_prefill_plus_decode_equals_full_forward(ckpts, case):
    model = from_pretrained(ckpts[case])
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=g)
    # the full forward's selection must be tie-free for the comparison to be defined
    rep = compare(ckpts[case], input_ids=ids)
    for r in rep.layers:
        assert r.boundary_gap is None or r.boundary_gap > 1e-6
    full = model(ids).logits
    P = 17  # prefill in chunks of 8, then one token at a time
    cache = LatentCache(model.cfg, 2, 40)
    runner = Runner(model, cache, prefill_chunk=8)
    ones = torch.ones(2, 40, dtype=torch.bool)
    pos = torch.arange(40).expand(2, 40)
    logits, _ = runner.feed(ids[:, :P], ones[:, :P], pos[:, :P], all_logits=True)
    steps = [logits]
    for t in range(P, 40):
        lg, _ = runner.feed(ids[:, t : t + 1], ones[:, :1], pos[:, t : t + 1], all_logits=True)
        steps.append(lg)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(ckpts, case):
    from dsalite.verify import load_hf

    model, hf = from_pretrained(ckpts[case]), load_hf(ckpts[case])
    ids = torch.randint(0, model.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(7))
    ours = dsalite.generate(model, ids, max_new_tokens=24)
    # an explicit mask: without one HF treats every prompt token equal to pad_token_id as padding
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                         min_new_tokens=24, eos_token_id=None, pad_token_id=0)
    assert ours.shape == (1, 44)
    assert torch.equal(ours, theirs), (ours, theirs)


def test_batch_of_different_lengths_equals_each_alone(ckpts):
    model = from_pretrained(ckpts["glm52_schedule"])
    g = torch.Generator().manual_seed(11)
    a = torch.randint(2, 256, (1, 30), generator=g)
    b = torch.randint(2, 256, (1, 18), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 12, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 12), torch.ones(1, 18)], 1)]).long()
    out = dsalite.generate(model, batch, max_new_tokens=16, attention_mask=mask)
    assert torch.equal(out[0, 30:], dsalite.generate(model, a, max_new_tokens=16)[0, 30:])
    assert torch.equal(out[1, 30:], dsalite.generate(model, b, max_new_tokens=16)[0, 18:])


def test_eos_stops_and_stats(ckpts):
    model = from_pretrained(ckpts["v3"])
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    free = dsalite.generate(model, ids, max_new_tokens=12)
    eos = int(free[0, 14])  # the 5th new token
    st = Stats()
    out = dsalite.generate(model, ids, max_new_tokens=12, eos_token_id=eos, stats=st)
    first = (free[0, 10:] == eos).nonzero()[0, 0].item()
    assert out.shape[1] == 10 + first + 1 and int(out[0, -1]) == eos
    assert st.decode_tokens == first + 1 and st.prefill_tokens == 10
    assert st.cache_bytes_per_token == 4 * 4 * (32 + 8)  # 4 layers × (r + p) fp32, no indexer keys in V3


def test_sampling_is_seeded_and_respects_top_k(ckpts):
    model = from_pretrained(ckpts["v32_groups"])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    a = dsalite.generate(model, ids, max_new_tokens=8, temperature=1.0, top_k=5, seed=1)
    b = dsalite.generate(model, ids, max_new_tokens=8, temperature=1.0, top_k=5, seed=1)
    assert torch.equal(a, b)
    # every sampled token is among the 5 most likely under the full forward of its prefix
    logits = model(a[:, :-1]).logits
    top5 = logits[:, 11:].topk(5, -1).indices
    assert (top5 == a[:, 12:, None]).any(-1).all()


@pytest.mark.parametrize("bad,match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(speculative="eagle"), "speculative"),
])
def test_bad_arguments_are_named(ckpts, bad, match):
    model = from_pretrained(ckpts["v3"])
    kw = dict(max_new_tokens=2)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        dsalite.generate(model, torch.zeros(1, 3, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="vocabulary"):
        dsalite.generate(model, torch.full((1, 3), 10_000), max_new_tokens=2)


def test_compiled_decode_equals_eager(ckpts):
    """Runner(compile=True): decode steps through torch.compile give the eager logits on a left-padded batch whose
    selection is sparse (context > index_topk), and later steps reuse the graph (the length is a symbol)."""
    model = from_pretrained(ckpts["glm52_schedule"])
    ids = torch.randint(2, 256, (2, 2 * model.cfg.index_topk), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    torch._dynamo.utils.counters.clear()
    runs = []
    for compile in (False, True):
        runner = Runner(model, LatentCache(model.cfg, 2, ids.shape[1] + 9), compile=compile)
        logits, _ = runner.feed(ids, mask, pos)
        out, nxt = [logits], pos[:, -1:] + 1
        for _ in range(8):
            logits, _ = runner.feed(logits[:, -1].argmax(-1, keepdim=True), torch.ones(2, 1, dtype=torch.bool), nxt)
            out.append(logits)
            nxt = nxt + 1
        runs.append(torch.cat(out, 1))
    eager, comp = runs
    torch.testing.assert_close(comp, eager, rtol=0, atol=1e-5)
    assert torch.equal(comp.argmax(-1), eager.argmax(-1))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, not one per length
