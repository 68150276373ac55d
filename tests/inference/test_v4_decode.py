"""DeepSeek-V4 decoding with `V4Cache`: chunked prefill + 1-token decode vs full forwards and transformers' generate.

Sequences are longer than the sliding window and span several CSA and HCA entries; the full forward's CSA selection
excludes entries and is tie-free, so prefill/decode must reproduce it exactly.
"""

import pytest
import torch

import dsalite
from dsalite.checkpoint.pretrained import from_pretrained
from dsalite.cli import main as cli_main
from dsalite.presets import CSA, HCA
from dsalite.families.deepseek_v4.cache import V4Cache
from dsalite.inference.runner import Runner, Stats, new_cache
from dsalite.verify import compare
from v4_fixtures import make_v4_checkpoint

# case -> (sequence length, prefill length before 1-token decode); the prefill ends just before a HCA boundary so
# decode steps complete HCA and CSA entries
LENGTHS = {"v4_all_types": (45, 13), "v4_flash_schedule": (270, 250)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4dec")
    return {c: make_v4_checkpoint(root, c) for c in LENGTHS}


def ids_for(model, B, S, seed):
    return torch.randint(0, model.cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, ids, prefill: int, chunk: int) -> torch.Tensor:
    """Logits of every position: prefill in chunks through the engine's Runner, then one token at a time."""
    B, S = ids.shape
    runner = Runner(model, V4Cache(model.cfg, B, S), prefill_chunk=chunk)
    ones, pos = torch.ones(B, S, dtype=torch.bool), torch.arange(S).expand(B, S)
    steps = [runner.feed(ids[:, :prefill], ones[:, :prefill], pos[:, :prefill], all_logits=True)[0]]
    for t in range(prefill, S):
        steps.append(runner.feed(ids[:, t : t + 1], ones[:, :1], pos[:, t : t + 1], all_logits=True)[0])
    return torch.cat(steps, 1)


@pytest.mark.parametrize("case,chunks", [
    ("v4_all_types", (8, 4, 3)),  # CSA m=4, HCA m'=8: chunks aligned with both, with CSA only, with neither
    ("v4_flash_schedule", (128, 100, 7)),  # CSA 4, HCA 128
])
def test_prefill_plus_decode_equals_full_forward(ckpts, case, chunks):
    model = from_pretrained(ckpts[case])
    cfg = model.cfg
    S, P = LENGTHS[case]
    ids = ids_for(model, 2, S, seed=3)
    assert S > cfg.sliding_window and S >= 2 * cfg.compress_rates[HCA] and P < 2 * cfg.compress_rates[HCA] <= S
    rep = compare(ckpts[case], input_ids=ids)
    csa = [r for r in rep.layers if r.indexer == "csa"]
    assert csa and all(r.excluded_fraction > 0.2 and r.boundary_gap > 1e-6 for r in csa), rep.format()
    with torch.no_grad():
        full = model(ids).logits
    for chunk in chunks:
        torch.testing.assert_close(decode_logits(model, ids, P, chunk), full, rtol=0, atol=1e-4,
                                   msg=lambda m, chunk=chunk: f"prefill chunk {chunk}: {m}")


@pytest.mark.parametrize("case,prompt,new", [("v4_all_types", 20, 24), ("v4_flash_schedule", 120, 16)])
def test_greedy_generation_matches_transformers(ckpts, case, prompt, new):
    from dsalite.verify import load_hf

    model, hf = from_pretrained(ckpts[case]), load_hf(ckpts[case])
    ids = ids_for(model, 1, prompt, seed=7)
    stats = Stats()
    ours = dsalite.generate(model, ids, max_new_tokens=new, stats=stats)
    # attention_mask given: HF would otherwise take every token equal to pad_token_id for padding
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    assert ours.shape == (1, prompt + new)
    assert torch.equal(ours, theirs), (ours, theirs)
    assert stats.cache_bytes_per_token == new_cache(model, 1, 8).bytes_per_token() > 0


def test_batches_equal_each_alone(ckpts):
    """Rows of one length, and left-padded rows of different lengths, decode batched (test_v4_batch.py: logits)."""
    model = from_pretrained(ckpts["v4_all_types"])
    a, b, c = ids_for(model, 1, 30, 11), ids_for(model, 1, 30, 12), ids_for(model, 1, 18, 13)
    alone = {k: dsalite.generate(model, x, max_new_tokens=16) for k, x in dict(a=a, b=b, c=c).items()}
    same = dsalite.generate(model, torch.cat([a, b]), max_new_tokens=16)
    assert torch.equal(same, torch.cat([alone["a"], alone["b"]]))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 12, dtype=torch.long), c], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 12), torch.ones(1, 18)], 1)]).long()
    seen = []
    out = dsalite.generate(model, padded, max_new_tokens=16, attention_mask=mask, on_token=lambda s, t: seen.append(s))
    assert torch.equal(out[:, :30], padded)
    assert torch.equal(out[0, 30:], alone["a"][0, 30:]) and torch.equal(out[1, 30:], alone["c"][0, 18:])
    assert sorted(seen) == [0] * 16 + [1] * 16


def test_sliding_memory_is_bounded_and_entries_grow_by_t_over_m(ckpts):
    model = from_pretrained(ckpts["v4_all_types"])
    cfg = model.cfg
    small, large = V4Cache(cfg, 1, 64), V4Cache(cfg, 1, 4096)
    assert small.fixed_bytes() == large.fixed_bytes()
    kinds = [cfg.layer_attention_type(i) for i in range(cfg.num_hidden_layers)]
    sliding = [i for i, k in enumerate(kinds) if k not in (CSA, HCA)]
    assert sliding and all(i not in large.compressors for i in sliding)
    c, Di = cfg.head_dim, cfg.index_head_dim
    per_token = sum((c + Di) * 4 / cfg.compress_rates[CSA] if k == CSA else c * 4 / cfg.compress_rates[HCA]
                    for k in kinds if k in (CSA, HCA))
    assert large.bytes_per_token() == round(per_token)
    ids = ids_for(model, 1, 5 * cfg.sliding_window + 3, 4)
    buffers = {i: (t.data_ptr(), t.shape) for i, t in small.window.items()}
    with torch.no_grad():
        model(ids[:, :7], cache=small)
        for t in range(7, ids.shape[1]):
            model(ids[:, t : t + 1], cache=small)
    assert {i: (t.data_ptr(), t.shape) for i, t in small.window.items()} == buffers
    assert buffers[sliding[0]][1][1] == cfg.sliding_window - 1
    T = ids.shape[1]
    for i, st in small.compressors.items():
        for s in st.values():
            assert s.count.tolist() == [T // s.ratio] and s.n_pending.tolist() == [T % s.ratio]


def test_bad_use_is_named(ckpts):
    model = from_pretrained(ckpts["v4_all_types"])
    ids = ids_for(model, 2, 6, 1)
    with pytest.raises(ValueError, match="speculative='mtp' needs a model with MTP layers"):  # HF drops V4's MTP
        dsalite.generate(model, ids[:1], max_new_tokens=2, speculative="mtp")
    cache = V4Cache(model.cfg, 2, 8)
    with pytest.raises(ValueError, match="left padding"):
        cache.append_tokens(torch.tensor([[1, 0]] * 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="capacity 8 tokens exceeded"):
        cache.append_tokens(torch.ones(2, 9, dtype=torch.bool), torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="rewound"):
        cache.crop(0)
    with pytest.raises(ValueError, match="V4Cache"):
        model(ids, cache=object())


def test_cli_generate_v4(ckpts, capsys):
    model = from_pretrained(ckpts["v4_all_types"])
    assert cli_main(["generate", ckpts["v4_all_types"], "--prompt-ids", "5,6,7,8,9,10,11,12,13", "--max-new-tokens",
                     "6", "--eos-id", "999"]) == 0
    want = dsalite.generate(model, torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]]), max_new_tokens=6)[0, 9:]
    assert capsys.readouterr().out.strip() == " ".join(map(str, want.tolist()))


def test_cache_holds_what_transformers_caches(ckpts):
    """After a chunked prefill, each layer's window, entries, pending tail and overlap equal HF's DeepseekV4*Cache."""
    from transformers import DynamicCache

    from dsalite.verify import load_hf

    model, hf = from_pretrained(ckpts["v4_all_types"]), load_hf(ckpts["v4_all_types"])
    ids = ids_for(model, 2, 39, 9)  # 39 = 4·9 + 3 = 8·4 + 7: tails pending in both compressors
    ref = DynamicCache(config=hf.config)
    ours = V4Cache(model.cfg, 2, 39)
    with torch.no_grad():
        hf(ids, past_key_values=ref, use_cache=True)
        for s0 in range(0, 39, 5):
            model(ids[:, s0 : s0 + 5], cache=ours)
    for i, layer in enumerate(ref.layers):
        torch.testing.assert_close(ours.window[i], layer.keys[:, 0], rtol=0, atol=1e-5)
        names = ours.compressors.get(i, {})
        assert set(names) == set(getattr(layer, "compressed_kv", {}))
        attn = model.model.layers[str(i)].self_attn
        for name, st in names.items():
            comp = attn.compressor if name == "compressor" else attn.compressor.indexer
            n, p = layer.entry_count[name], 39 % st.ratio
            assert st.count.tolist() == [n, n] and n == 39 // st.ratio and st.n_pending.tolist() == [p, p]
            torch.testing.assert_close(st.entries[:, :n], layer.compressed_kv[name], rtol=0, atol=1e-5)
            torch.testing.assert_close(st.pending_kv[:, :p], layer.buffer_kv[name], rtol=0, atol=1e-5)
            torch.testing.assert_close(st.pending_gate[:, :p], layer.buffer_gate[name], rtol=0, atol=1e-5)
            if st.overlap:
                c = st.width
                torch.testing.assert_close(st.prev_kv, layer.overlap_kv[name], rtol=0, atol=1e-5)
                torch.testing.assert_close(st.prev_gate + comp.position_bias[:, :c], layer.overlap_gate[name],
                                           rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def v4_mtp_model():
    from dsalite.config import ModelConfig
    from dsalite.model import Transformer
    from dsalite.presets import PRESETS

    m = Transformer(ModelConfig.from_hf(dict(PRESETS["deepseek-v4-tiny"])))  # window 16, CSA 4 / HCA 16, MTP
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return m.eval()


@pytest.mark.parametrize("oracle", [False, True])
def test_v4_speculative_greedy_equals_plain_greedy(v4_mtp_model, oracle):
    """Drafts rejected (the random MTP layer's, or every other oracle draft) right after entries are compressed:
    the snapshot + replay leaves the cache as plain decoding has it, so the output is token for token the same."""
    import dsalite.inference.speculative as spec

    ids = torch.randint(0, 512, (1, 13), generator=torch.Generator().manual_seed(2))
    plain = dsalite.generate(v4_mtp_model, ids, max_new_tokens=40)
    st = Stats()

    class HalfOracle(spec.MTPDrafter):  # two drafts right, then one wrong
        calls = 0

        def feed(self, h, next_ids, positions, topk):
            super().feed(h, next_ids, positions, topk)
            nxt = int(positions[0, -1]) + 2
            want = int(plain[0, nxt]) if nxt < plain.shape[1] else 0
            HalfOracle.calls += 1
            logits = torch.full((1, 512), -1e9)
            logits[0, want if HalfOracle.calls % 3 else (want + 1) % 512] = 0
            return logits

    orig = spec.MTPDrafter
    spec.MTPDrafter = HalfOracle if oracle else orig
    try:
        out = dsalite.generate(v4_mtp_model, ids, max_new_tokens=40, speculative="mtp", stats=st)
    finally:
        spec.MTPDrafter = orig
    assert torch.equal(out, plain) and st.drafted >= 13
    if oracle:
        assert 5 < st.accepted < st.drafted
