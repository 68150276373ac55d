"""MTP speculative decoding: greedy output identical to plain greedy; the sampler keeps the target distribution."""

import pytest
import torch

import dsalite
from dsalite.presets import PRESETS
from dsalite.config import ModelConfig
from dsalite.inference.runner import Stats
from dsalite.inference.sampling import SamplingParams
from dsalite.inference.speculative import _accept, _resample
from dsalite.model import Transformer


@pytest.fixture(scope="module")
def mtp_model():
    cfg = ModelConfig.from_hf(dict(PRESETS["glm-5.2-tiny"], index_topk=16))
    m = Transformer(cfg)
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    # make the MTP layer a decent drafter: reuse the trunk's embeddings/head and copy the last block
    with torch.no_grad():
        m.mtp[0].embed_tokens.weight.copy_(m.model.embed_tokens.weight)
        m.mtp[0].shared_head.head.weight.copy_(m.lm_head.weight)
    return m.eval()


@pytest.mark.parametrize("prompt_len", [5, 40])
def test_speculative_greedy_is_identical_to_plain_greedy(mtp_model, prompt_len):
    ids = torch.randint(0, 512, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    plain = dsalite.generate(mtp_model, ids, max_new_tokens=30)
    st = Stats()
    spec = dsalite.generate(mtp_model, ids, max_new_tokens=30, speculative="mtp", stats=st)
    assert torch.equal(spec, plain)
    assert st.drafted > 0 and 0 <= st.accepted <= st.drafted
    assert st.decode_tokens == 30


def test_speculative_accepts_when_the_draft_is_right(mtp_model):
    """With the MTP head wired to predict exactly what the main model will say, every draft is accepted."""
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    plain = dsalite.generate(mtp_model, ids, max_new_tokens=20)
    st = Stats()
    # a drafter that cheats by replaying the plain output proves the accept/bonus bookkeeping
    import dsalite.inference.speculative as spec

    class Oracle(spec.MTPDrafter):
        def feed(self, h, next_ids, positions, topk):
            super().feed(h, next_ids, positions, topk)
            nxt = int(positions[0, -1]) + 2  # the entry at position i drafts token i + 2
            logits = torch.full((1, 512), -1e9)
            logits[0, plain[0, nxt] if nxt < plain.shape[1] else 0] = 0
            return logits

    orig = spec.MTPDrafter
    spec.MTPDrafter = Oracle
    try:
        out = dsalite.generate(mtp_model, ids, max_new_tokens=20, speculative="mtp", stats=st)
    finally:
        spec.MTPDrafter = orig
    assert torch.equal(out, plain)
    assert st.accepted == st.drafted and st.drafted >= 9  # 2 tokens per iteration


def test_rejection_sampling_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    q = torch.tensor([[0.1, 0.4, 0.1, 0.2, 0.2]])
    params = SamplingParams(temperature=1.0)
    n = 40000
    counts = torch.zeros(5)
    for _ in range(n):
        d = torch.multinomial(q, 1, generator=g).squeeze(-1)
        t = d if _accept(p, q, d, params, g) else _resample(p, q, params, g)
        counts[int(t)] += 1
    freq = counts / n
    sigma = (p[0] * (1 - p[0]) / n).sqrt()
    assert ((freq - p[0]).abs() < 4 * sigma + 1e-9).all(), (freq, p)


def test_speculative_refuses_what_it_cannot_do(mtp_model):
    with pytest.raises(ValueError, match="batch"):
        dsalite.generate(mtp_model, torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, speculative="mtp")
    cfg = ModelConfig.from_hf(dict(PRESETS["glm-5.2-tiny"], num_nextn_predict_layers=0))
    no_mtp = Transformer(cfg)
    no_mtp.init_weights()
    with pytest.raises(ValueError, match="MTP"):
        dsalite.generate(no_mtp, torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2, speculative="mtp")


def test_compiled_speculative_greedy_is_identical_to_plain_greedy(mtp_model):
    """compile=True: the verify forwards and the MTP drafts run through torch.compile; same tokens as eager."""
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(40))
    plain = dsalite.generate(mtp_model, ids, max_new_tokens=12)
    st = Stats()
    spec = dsalite.generate(mtp_model, ids, max_new_tokens=12, speculative="mtp", stats=st, compile=True)
    assert torch.equal(spec, plain)
    assert st.drafted > 0
