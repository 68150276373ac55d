"""IndexShare never falls back silently: a shared layer without its source's top-k raises, and a shared MTP layer
reuses its trunk source's top-k in training, prefill and speculative drafting."""

from __future__ import annotations

import pytest
import torch

import dsalite
from dsalite.config import ModelConfig
from dsalite.indexshare import NOT_GIVEN, IndexShareError
from dsalite.inference.cache import LatentCache
from dsalite.inference.runner import Runner
from dsalite.inference.speculative import MTPDrafter
from dsalite.model import Transformer
from dsalite.presets import PRESETS

# 6 trunk layers, freq 3, offset 2: full at 0, 1, 4; the MTP layer (global index 6) is shared with layer 4.
SHARED_MTP = dict(PRESETS["glm-5.2-tiny"], num_hidden_layers=6, index_topk_freq=3, index_skip_topk_offset=2,
                  index_topk=12)


def model_with_shared_mtp(**kw) -> Transformer:
    cfg = ModelConfig.from_hf(dict(SHARED_MTP, **kw))
    assert cfg.indexer_types == ["full", "full", "shared", "shared", "full", "shared", "shared"]
    m = Transformer(cfg)
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return m.eval()


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def mtp_topk_in(model) -> list:
    """Record the top-k the MTP layer's attention receives."""
    seen = []
    model.mtp[0].self_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[2]))
    return seen


def test_shared_layer_without_topk_raises():
    m = model_with_shared_mtp()
    block = m.model.layers["2"]
    x = torch.randn(1, 8, m.cfg.hidden_size)
    ctx = m.context(None, torch.arange(8)[None], dsalite.model.Visibility(8, 8), x.dtype)
    with pytest.raises(IndexShareError, match="layer 2 is an IndexShare 'shared' layer.*layer 1"):
        block(x, ctx)
    with pytest.raises(IndexShareError, match="layer 6 .*layer 4"):
        m.mtp_forward(m(ids_of(30)).mtp_input, ids_of(30, 2))  # the trunk's top-k not handed over


def test_shared_mtp_layer_trains_on_its_trunk_source_topk():
    m = model_with_shared_mtp()
    ids = ids_of(40)
    seen = mtp_topk_in(m)
    out = m(ids)
    src = out.topk[4]
    assert src is not None and bool((src >= 0).sum(-1).max() < 40), "layer 4's selection must be sparse"
    logits = m.mtp_forward(out.mtp_input, torch.roll(ids, -1, 1), topk=out.topk)[0]
    assert seen[-1] is src
    dense = m.mtp_forward(out.mtp_input, torch.roll(ids, -1, 1), topk=[None] * 6)[0]  # every visible key instead
    assert not torch.allclose(logits, dense, atol=1e-4), "the shared top-k must change the MTP layer's attention"


@pytest.mark.parametrize("chunk", [64, 16])  # one prefill chunk; chunks whose first one is still dense (T <= 12)
def test_drafter_uses_the_trunk_topk_of_the_same_positions(chunk):
    m = model_with_shared_mtp()
    ids = ids_of(40)
    nxt = torch.cat([ids[:, 1:], torch.tensor([[7]])], 1)
    with torch.no_grad():
        out = m(ids)
        want = m.mtp_forward(out.mtp_input, nxt, topk=out.topk)[0][:, -1]
        cache = LatentCache(m.cfg, 1, 64)
        runner = Runner(m, cache, prefill_chunk=chunk)
        pos = torch.arange(40)[None]
        _, h, topk = runner.feed(ids, torch.ones(1, 40, dtype=torch.bool), pos, with_topk=True)
        assert topk is not NOT_GIVEN and topk.shape[:2] == (1, 40)
        drafter = MTPDrafter(m, 64, torch.float32)
        got = drafter.feed(h, nxt, pos, topk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_speculative_decoding_with_a_shared_mtp_layer_equals_plain_greedy():
    m = model_with_shared_mtp()
    ids = ids_of(30)
    seen = mtp_topk_in(m)
    plain = dsalite.generate(m, ids, max_new_tokens=12)
    spec = dsalite.generate(m, ids, max_new_tokens=12, speculative="mtp", prefill_chunk=16)
    assert torch.equal(spec, plain)
    assert seen and all(isinstance(t, torch.Tensor) for t in seen), "every draft must reuse layer 4's top-k"
