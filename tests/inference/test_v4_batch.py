"""DeepSeek-V4 batched decode of left-padded prompts, and compiled decode steps.

Ground truth is each row decoded alone (which test_v4_decode.py holds to transformers): a padded row must give the
same logits and tokens, so its compression windows, entry positions and sliding window all count from its own first
real token. Row lengths are and are not multiples of the compression ratios (CSA m = 4, HCA m' = 8), and the
prefill runs in chunks of 5, so some chunks are all padding for the shortest row and entries complete at different
decode steps in different rows.
"""

import pytest
import torch

import dsalite
from dsalite.config import ModelConfig
from dsalite.inference.runner import Runner, left_pad, new_cache
from dsalite.layers.compressor import CSAIndexer
from dsalite.model import Transformer
from dsalite.presets import CSA, HCA

LENGTHS = (24, 20, 13, 7)  # 24: multiple of both ratios; 20: of CSA's only; 13 and 7: of neither
NEW = 12


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.tiny("deepseek_v4", index_n_heads=8)  # 8 ReLU heads: no all-zero score ties at the top-k
    assert (cfg.compress_rates[CSA], cfg.compress_rates[HCA], cfg.sliding_window) == (4, 8, 8)
    m = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    m.init_weights(std=0.2, generator=g)
    with torch.no_grad():  # init zeroes these: random, so the sinks and the CSA overlap's position bias matter
        for name, p in m.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def prompts(model):
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g) for n in LENGTHS]
    follow = torch.randint(0, model.cfg.vocab_size, (len(rows), NEW), generator=g)
    S = max(LENGTHS)
    ids = torch.stack([torch.cat([torch.zeros(S - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.arange(S) >= S - len(r) for r in rows]).long()
    return rows, follow, ids, mask


def forced_logits(model, ids, mask, follow, compile=False, chunk=5) -> torch.Tensor:
    """[B, 1 + NEW, V]: the last prompt position's logits, then those of each forced decode step."""
    B, S = ids.shape
    valid, pos = left_pad(ids, mask)
    runner = Runner(model, new_cache(model, B, S + NEW), prefill_chunk=chunk, compile=compile)
    out = [runner.feed(ids, valid, pos)[0]]
    nxt = pos[:, -1:] + 1
    for t in range(NEW - 1):
        out.append(runner.feed(follow[:, t : t + 1], torch.ones(B, 1, dtype=torch.bool), nxt + t)[0])
    return torch.cat(out, 1)


@pytest.fixture
def boundary_gaps(monkeypatch):
    """Records, for every CSA selection, the smallest gap between the K-th and (K+1)-th visible indexer score of a
    query with more than K visible entries: a comparison of selections is only meaningful when it is tie-free."""
    gaps = []
    pick = CSAIndexer.pick

    def recording(self, q, k, w, positions, packed):
        s = (torch.einsum("bshd,bwd->bshw", q.float(), k.float()).relu() * w[..., None]).sum(2)  # [B, S, W]
        s = s.masked_fill(~self.visible(positions, k.shape[1], packed)(0, q.shape[1]), float("-inf"))
        top = s.topk(min(self.topk + 1, s.shape[-1]), -1).values
        if top.shape[-1] > self.topk:
            ok = top[..., self.topk] > float("-inf")
            gaps.extend((top[..., self.topk - 1] - top[..., self.topk])[ok].tolist())
        return pick(self, q, k, w, positions, packed)

    monkeypatch.setattr(CSAIndexer, "pick", recording)
    return gaps


def test_padded_batch_logits_equal_each_row_alone(model, boundary_gaps):
    rows, follow, ids, mask = prompts(model)
    batched = forced_logits(model, ids, mask, follow)
    for b, r in enumerate(rows):
        alone = forced_logits(model, r[None], None, follow[b : b + 1], chunk=64)
        # logits reach ±6: 1e-4 is fp32 noise there (a row alone in chunks of 5 vs 64 differs by 1.4e-5)
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=0, atol=1e-4,
                                   msg=lambda m, b=b: f"row {b} ({len(rows[b])}): {m}")
    assert len(boundary_gaps) > 50 and min(boundary_gaps) > 1e-4  # sparse selections, and no ties at the boundary
    # the rows really differ in where their windows complete: entries made per row after the prefill
    cache = new_cache(model, len(rows), 64)
    valid, pos = left_pad(ids, mask)
    Runner(model, cache, prefill_chunk=5).feed(ids, valid, pos)
    for i, st in cache.compressors.items():
        for s in st.values():
            assert s.count.tolist() == [n // s.ratio for n in LENGTHS]
            assert s.n_pending.tolist() == [n % s.ratio for n in LENGTHS]


def test_padded_generate_equals_each_alone(model):
    rows, _, ids, mask = prompts(model)
    out = dsalite.generate(model, ids, max_new_tokens=NEW, attention_mask=mask)
    for b, r in enumerate(rows):
        alone = dsalite.generate(model, r[None], max_new_tokens=NEW)
        assert torch.equal(out[b, ids.shape[1] :], alone[0, len(r) :]), b


def test_padding_inside_a_row_is_refused(model):
    cache = new_cache(model, 2, 16)
    with pytest.raises(ValueError, match="left padding"):
        cache.append_tokens(torch.tensor([[1, 0, 1], [1, 1, 1]]), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.slow  # compiling the decode step takes ≈ 2 CPU minutes
def test_compiled_decode_equals_eager(model):
    """Compiled decode steps (one graph at every length: the rows' counts are tensors) = the eager steps, on the
    padded batch whose rows complete entries at different steps."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    rows, follow, ids, mask = prompts(model)
    eager = forced_logits(model, ids, mask, follow, chunk=64)  # prefill in one eager call, the steps compiled
    comp = forced_logits(model, ids, mask, follow, compile=True, chunk=64)
    # the same fp32 noise floor as above (logits reach ±6; inductor sums in another order: 1.4e-5 seen)
    torch.testing.assert_close(comp, eager, rtol=0, atol=1e-4)
    assert torch.equal(comp.argmax(-1), eager.argmax(-1))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for all 11 steps
