"""The CPU kernels (`dsalite.kernels`) against the PyTorch paths they replace, in every build this CPU runs
(avx512, avx2, portable: `kernels.cpu_isas()`; each has its own register blocking).

Indexer: same top-k sets on rows whose K-th score is clear of the next one, torch.topk's own choice on rows whose
boundary is an exact tie, every visibility form (causal prefix, padding, packed documents), odd head counts and widths,
threads, the cache's tiled keys. Sparse attention: the gather path's output with empty slots, queries with no key,
sinks, widths that are not whole vectors, batches; under autograd its gradients too. The build: the target reported
by the library, the choice of target and of the kernel path (DSALITE_KERNEL_ISA, DSALITE_KERNELS, the calibration)."""

import ctypes
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dsalite import kernels
from dsalite.kernels import wisdom
from dsalite.layers import indexer as ix
from dsalite.layers import sparse_attention as sa
from dsalite.layers.mask import Visibility

SCALE = 0.2


@pytest.fixture(scope="module", params=kernels.cpu_isas())
def lib(request):
    """The kernels built for each target this CPU runs."""
    return kernels.library(request.param)


@pytest.fixture(scope="module")
def best_lib():
    """The build `load` uses by default (the best target), for the tests that need only one."""
    return kernels.library()


def select(q, k, w, vis, K, kernel_lib, monkeypatch):
    """topk_indices through the kernel `kernel_lib` (None = the PyTorch path), as the model calls it."""
    monkeypatch.setattr(kernels, "load", lambda: kernel_lib)
    return ix.topk_indices(q, k, w, vis.block, K, SCALE, vis.key_range)


def reference(q, k, w, vis):
    """float64 scores with hidden keys at -inf: [B, S, T]."""
    sc = torch.einsum("bsh,bsht->bst", w.double(), torch.relu(torch.einsum("bshd,btd->bsht", q.double(), k.double())))
    return (sc * SCALE).masked_fill(~vis.full(), float("-inf"))


def clear_rows(ref, K):
    """Rows whose top-K set is unambiguous: at most K visible keys, or a gap after the K-th score well above fp32
    rounding of the score sums."""
    top = ref.topk(min(K + 1, ref.shape[-1]), -1).values
    few = (ref > float("-inf")).sum(-1) <= K
    return few | ((top[..., K - 1] - top[..., K]) > 1e-4 * top[..., 0].abs().clamp_min(1))


def assert_valid_selection(idx, ref, K):
    """Every row: distinct visible keys, min(K, visible) of them, and none left out scores clearly above one taken."""
    B, S, T = ref.shape
    visible = (ref > float("-inf")).sum(-1)
    taken = torch.zeros(B, S, T + 1, dtype=torch.bool).scatter_(-1, torch.where(idx < 0, T, idx), True)[..., :T]
    assert torch.equal(taken.sum(-1), visible.clamp_max(K)) and torch.equal((idx >= 0).sum(-1), visible.clamp_max(K))
    assert (ref[taken] > float("-inf")).all(), "a hidden key was selected"
    low = ref.masked_fill(~taken, float("inf")).amin(-1)
    high = ref.masked_fill(taken | (ref == float("-inf")), float("-inf")).amax(-1)
    assert (high <= low + 1e-4 * low.abs().clamp_min(1)).all()


def case(name, g):
    """(q, k, w, Visibility, K) for one visibility form; keys not a multiple of the kernel's tile of 64."""
    if name == "causal_chunk":  # a later prefill chunk: 300 queries after 700 cached keys, 6 heads of width 20
        B, S, T, Hi, Di, K = 1, 300, 1000, 6, 20, 64
        vis = Visibility(S, T, T - S)
    elif name == "padding":  # left-padded batch: nothing is assumed visible (k0 = 0), a mask per sequence
        B, S, T, Hi, Di, K = 2, 150, 700, 4, 32, 40
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[1, :37] = False
        vis = Visibility(S, T, T - S, valid)
    elif name == "documents":  # packed documents: short documents leave fewer than K visible keys
        B, S, T, Hi, Di, K = 1, 520, 520, 5, 16, 48
        seg = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 250, 200, 40]))[None]
        vis = Visibility(S, T, 0, None, seg)
    else:  # decode: one query per sequence over a long padded cache
        B, S, T, Hi, Di, K = 3, 1, 3001, 8, 32, 256
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[2, :500] = False
        vis = Visibility(S, T, T - S, valid)
    q, k, w = torch.randn(B, S, Hi, Di, generator=g), torch.randn(B, T, Di, generator=g), torch.randn(B, S, Hi, generator=g)
    return q, k, w, vis, K


@pytest.mark.parametrize("name", ["causal_chunk", "padding", "documents", "decode"])
def test_kernel_selects_what_the_pytorch_path_selects(lib, monkeypatch, name):
    g = torch.Generator().manual_seed(11)
    q, k, w, vis, K = case(name, g)
    got = select(q, k, w, vis, K, lib, monkeypatch)
    want = select(q, k, w, vis, K, None, monkeypatch)
    ref = reference(q, k, w, vis)
    assert_valid_selection(got, ref, K)
    assert_valid_selection(want, ref, K)
    clear = clear_rows(ref, K)
    assert clear.float().mean() > 0.8, "too few rows with a clear boundary for the comparison to mean anything"
    assert torch.equal(got.sort(-1).values[clear], want.sort(-1).values[clear])
    # the kernel returns each row's keys in ascending order (gathers then walk the cache forward)
    kept = torch.where(got < 0, torch.iinfo(torch.long).max, got)
    assert torch.equal(kept, kept.sort(-1).values)


@pytest.mark.parametrize("name", ["causal_chunk", "padding", "documents", "decode"])
def test_both_scoring_blockings_select_the_same_keys(lib, monkeypatch, name):
    """Each build compiles two scoring blockings and the calibration picks one per CPU: both add every score's terms
    in the same order, so they select exactly the same keys."""
    q, k, w, vis, K = case(name, torch.Generator().manual_seed(11))
    before = lib.dsa_set_score_blocking(0)
    try:
        default = select(q, k, w, vis, K, lib, monkeypatch)
        assert lib.dsa_set_score_blocking(1) == 0
        alternative = select(q, k, w, vis, K, lib, monkeypatch)
    finally:
        lib.dsa_set_score_blocking(before)
    assert torch.equal(default, alternative)


def test_tied_boundaries_take_torch_topk_over_the_whole_row(lib, monkeypatch):
    """Every key twice, K odd: the K-th score always ties with a key left out, so every row goes back to torch.topk
    over its whole row (HF's tie order); all-zero queries tie everything at 0."""
    g = torch.Generator().manual_seed(12)
    B, S, T, Hi, Di, K = 1, 40, 600, 4, 16, 33
    half = torch.randn(B, T // 2, Di, generator=g)
    k = torch.cat([half, half], 1)[:, torch.randperm(T, generator=g)]
    q, w = torch.randn(B, S, Hi, Di, generator=g), torch.rand(B, S, Hi, generator=g)
    q[:, :5] = 0
    vis = Visibility(S, T, T - S)
    got = select(q, k, w, vis, K, lib, monkeypatch)
    sc = ix.index_scores(q, k, w, SCALE).masked_fill(~vis.full(), float("-inf"))
    want = sc.view(S, T).topk(K, -1, sorted=False).indices.view(B, S, K)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_threads_split_rows_without_changing_the_result(best_lib, monkeypatch):
    g = torch.Generator().manual_seed(13)
    q, k, w, vis, K = case("causal_chunk", g)
    one = select(q, k, w, vis, K, best_lib, monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = select(q, k, w, vis, K, best_lib, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_every_build_selects_exactly_what_the_best_one_does(best_lib, monkeypatch):
    """Scores differ between builds only in summation order: on rows with a clear boundary (all of them here) the
    selections are identical."""
    g = torch.Generator().manual_seed(14)
    q, k, w, vis, K = case("padding", g)
    want = select(q, k, w, vis, K, best_lib, monkeypatch)
    for isa in kernels.cpu_isas():
        assert torch.equal(select(q, k, w, vis, K, kernels.library(isa), monkeypatch), want), isa


def test_builds_report_their_target_and_blocking():
    """Each build is compiled for the target asked for (the library says so) with its own register blocking; the
    targets offered are those /proc/cpuinfo's flags allow, best first."""
    flags = kernels.cpu_flags()
    isas = kernels.cpu_isas()
    assert isas[-1] == "portable" and ("avx512" in isas) == ({"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags)
    assert ("avx2" in isas) == ({"avx2", "fma"} <= flags)
    infos = {isa: kernels.build_info(kernels.library(isa)) for isa in isas}
    for isa, info in infos.items():
        assert info.split()[0] == isa and f"vw={ {'avx512': 16, 'avx2': 8, 'portable': 4}[isa]} " in info
        assert re.search(r" score=\d+x\d+\|\d+x\d+ ", info), info  # the scoring default and its alternative
    assert len(set(infos.values())) == len(infos)


def test_target_from_the_environment(monkeypatch):
    monkeypatch.setenv("DSALITE_KERNEL_ISA", "portable")
    assert kernels.requested_isa() == "portable"
    monkeypatch.setenv("DSALITE_KERNEL_ISA", "sse9")
    with pytest.raises(ValueError, match="DSALITE_KERNEL_ISA='sse9': expected one of avx512, avx2, portable"):
        kernels.requested_isa()
    missing = [isa for isa in kernels.ISAS if isa not in kernels.cpu_isas()]
    if missing:
        monkeypatch.setenv("DSALITE_KERNEL_ISA", missing[0])
        with pytest.raises(ValueError, match="this CPU lacks"):
            kernels.requested_isa()
    monkeypatch.delenv("DSALITE_KERNEL_ISA")
    assert kernels.requested_isa() == kernels.cpu_isas()[0]


@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    """`load` decides again, with an empty kernel cache (builds are reused from the usual one)."""
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_available", False)
    monkeypatch.setattr(kernels, "_decision", {})
    lib = kernels.library()
    monkeypatch.setattr(kernels, "library", lambda isa=None: lib)
    monkeypatch.setenv("DSALITE_KERNEL_CACHE", str(tmp_path))
    return lib


def test_environment_forces_the_path(fresh_choice, monkeypatch):
    monkeypatch.setenv("DSALITE_KERNELS", "0")
    assert kernels.load() is None and kernels.decision()["why"] == "DSALITE_KERNELS=0"
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("DSALITE_KERNELS", "1")
    assert kernels.load() is fresh_choice and kernels.available()


def test_forced_path_inside_a_block_only(fresh_choice, monkeypatch):
    """`kernels.forced` (benches timing both paths in one process) switches the path for its block, caches built
    inside take that path's layout, and the machine's decision comes back after it."""
    from dsalite.config import ModelConfig
    from dsalite.inference.cache import LatentCache

    monkeypatch.setenv("DSALITE_KERNELS", "0")
    assert kernels.load() is None
    cfg = ModelConfig.tiny("glm_moe_dsa")
    with kernels.forced(True):
        assert kernels.load() is fresh_choice and kernels.available()
        assert LatentCache(cfg, 1, 64).index_tiles
        with kernels.forced(False):
            assert kernels.load() is None and not kernels.available()
            assert not LatentCache(cfg, 1, 64).index_tiles
        assert kernels.available()
    assert kernels.load() is None and not kernels.available() and not kernels.decision()["use"]


@pytest.mark.parametrize("faster", [True, False])
def test_calibration_decides_and_is_measured_once(fresh_choice, monkeypatch, faster):
    """By default the cached calibration of this CPU decides; it is measured once (under a lock), then read back."""
    calls = []

    def measure():
        calls.append(1)
        return {"kernel_faster": faster, "kernels": {"select": {"speedup": 2.0 if faster else 0.5}},
                "score_blocking": {"alt": 1, "blocking": "16x4", "alternative_over_default": 0.9}}

    monkeypatch.delenv("DSALITE_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_measure", lambda lib: measure())
    before = fresh_choice.dsa_set_score_blocking(0)
    try:
        assert (kernels.load() is fresh_choice) == faster
        # the scoring blocking the calibration found faster is the one the kernels run with
        assert fresh_choice.dsa_set_score_blocking(0) == int(faster)
    finally:
        fresh_choice.dsa_set_score_blocking(before)
    assert kernels.decision()["use"] == faster and "calibrated on this CPU" in kernels.decision()["why"]
    assert "scoring blocking 16x4" in kernels.decision()["why"]
    monkeypatch.setattr(kernels, "_tried", False)
    kernels.load()
    assert len(calls) == 1
    assert len(wisdom.forget()) == 1


def test_calibration_runs_and_reports_every_kernel():
    """The calibration subprocess itself (one thread, a few seconds): every case timed on both paths."""
    env = dict(os.environ, DSALITE_KERNELS="1")
    out = subprocess.run([sys.executable, "-m", "dsalite.kernels.calibrate"], env=env, capture_output=True, text=True,
                         check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["build"] == kernels.build_info(kernels.library())
    assert set(rec["kernels"]) == {"select", "attention", "elementwise"} and isinstance(rec["kernel_faster"], bool)
    assert rec["elementwise_faster"] == (rec["kernels"]["elementwise"]["speedup"] >= 1.0)
    blocking = rec["score_blocking"]
    assert blocking["blocking"] == [blocking["default"], blocking["alternative"]][blocking["alt"]]
    assert (blocking["alt"] == 1) == (blocking["alternative_over_default"] < 0.97)
    for case in rec["cases"].values():
        assert case["kernel_ms"] > 0 and case["torch_ms"] > 0


def test_cache_keeps_the_tiled_keys_in_step_with_the_keys(best_lib, monkeypatch, tmp_path):
    """Chunked prefill, decode steps and a crop-and-rewrite (rejected drafts) leave the cache's tiled copy equal to
    `tile_keys` of its indexer keys on every cached token."""
    from hf_fixtures import make_checkpoint

    from dsalite.checkpoint.pretrained import from_pretrained
    from dsalite.inference.cache import LatentCache
    from dsalite.inference.runner import Runner

    monkeypatch.setattr(kernels, "load", lambda: best_lib)
    model = from_pretrained(make_checkpoint(tmp_path, "glm52_schedule"))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 90), generator=torch.Generator().manual_seed(15))
    cache = LatentCache(model.cfg, 2, 100)
    assert cache.index_tiles, "no tiled key copy kept on CPU with the kernel available"
    runner = Runner(model, cache, prefill_chunk=32)
    ones, pos = torch.ones(2, 90, dtype=torch.bool), torch.arange(90).expand(2, 90)
    runner.feed(ids[:, :70], ones[:, :70], pos[:, :70])
    for t in range(70, 80):
        runner.feed(ids[:, t : t + 1], ones[:, :1], pos[:, t : t + 1])
    cache.crop(75)
    runner.feed(ids[:, 80:90], ones[:, :10], pos[:, 75:85])
    T = cache.seq_len
    for layer, tiles in cache.index_tiles.items():
        want = ix.tile_keys(cache.index_keys[layer][:, :T])
        assert torch.equal(tiles[:, : want.shape[1]].transpose(2, 3).reshape(2, -1, tiles.shape[2])[:, :T],
                           want.transpose(2, 3).reshape(2, -1, tiles.shape[2])[:, :T])


@pytest.mark.parametrize("B,H,D,Dv,K,sinks", [(1, 4, 80, 64, 48, False), (2, 6, 37, 21, 33, True),
                                              (3, 5, 144, 128, 16, False)])
def test_sparse_attention_kernel_matches_the_gather_path(lib, monkeypatch, B, H, D, Dv, K, sinks):
    """Shared key rows (the absorbed MLA form, values = their first Dv channels) read in place by the kernel equal the
    gathered-copy path: -1 slots, a query with no key at all (zeros, or only the sink), heads not a multiple of 4,
    widths not a multiple of 16 or 64, sequences at different offsets of a larger cache buffer."""
    g = torch.Generator().manual_seed(16)
    S, T = 70, 200
    q = torch.randn(B, S, H, D, generator=g)
    cache = torch.randn(B, T + 30, D, generator=g)  # a view of the first T slots, as the latent cache hands out
    k = cache[:, :T, None]
    idx = torch.stack([torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(S)]) for _ in range(B)])
    idx[:, ::3, K // 2 :] = -1  # empty slots
    idx[0, 5] = -1  # no key at all
    sink = torch.randn(H, generator=g) if sinks else None
    with torch.no_grad():
        monkeypatch.setattr(kernels, "load", lambda: lib)
        got = sa.sparse_attention(q, k, Dv, idx, 0.3, sink)
        monkeypatch.setattr(kernels, "load", lambda: None)
        want = sa.sparse_attention(q, k, Dv, idx, 0.3, sink)
    # both are fp32 with their own summation order: each within fp32 rounding of the float64 result
    with torch.no_grad():
        exact = sa.sparse_attention(q.double(), k.double(), Dv, idx, 0.3, None if sink is None else sink.double())
    err_kernel, err_torch = (got.double() - exact).abs().max(), (want.double() - exact).abs().max()
    assert err_kernel < 1e-5 and err_kernel < 4 * err_torch + 1e-7, (err_kernel, err_torch)
    if not sinks:
        assert torch.equal(got[0, 5], torch.zeros(H, Dv))


@pytest.mark.parametrize("B,H,D,Dv,K", [(1, 4, 80, 64, 48), (2, 6, 37, 21, 33), (2, 5, 144, 128, 16)])
def test_trainable_kernel_attention_gradients(lib, monkeypatch, B, H, D, Dv, K):
    """Under autograd the kernel path (forward keeping the probabilities, backward adding every selected row's gradient
    from all heads) gives the float64 gather path's output and gradients: -1 slots, a query with no key, a key listed
    twice, heads not a multiple of 4, widths not whole vectors (values ending inside a vector), a batch; the threads
    split the query rows without changing the result beyond rounding."""
    g = torch.Generator().manual_seed(17)
    S, T = 70, 90
    q = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    kv = torch.randn(B, T, D, generator=g, requires_grad=True)
    idx = torch.stack([torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(S)]) for _ in range(B)])
    idx[:, ::3, K // 2 :] = -1
    idx[0, 5] = -1
    idx[-1, 7, 1] = idx[-1, 7, 0]  # counted twice, as in the gather path
    dout = torch.randn(B, S, H, Dv, generator=g)
    monkeypatch.setattr(kernels, "load", lambda: lib)
    got = sa.sparse_attention(q, kv[:, :, None], Dv, idx, 0.3)
    assert type(got.grad_fn).__name__ == "LatentKernelAttentionBackward"
    grads = torch.autograd.grad(got, (q, kv), dout)
    q64, kv64 = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    exact = sa.sparse_attention(q64, kv64[:, :, None], Dv, idx, 0.3)
    exact_grads = torch.autograd.grad(exact, (q64, kv64), dout.double())
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0, 5].detach(), torch.zeros(H, Dv)) and grads[0][0, 5].abs().max() == 0
    for a, b in zip(grads, exact_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = torch.autograd.grad(sa.sparse_attention(q, kv[:, :, None], Dv, idx, 0.3), (q, kv), dout)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(grads, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fresh_build_into_an_empty_cache(tmp_path, monkeypatch):
    """A machine without a cached build compiles the kernel (about a second) into DSALITE_KERNEL_CACHE and loads it;
    an unwritable cache directory falls back to a temporary one."""
    cxx = kernels.compiler()
    monkeypatch.setenv("DSALITE_KERNEL_CACHE", str(tmp_path / "cache"))
    built = kernels._build(cxx, "portable")  # the quickest to compile
    assert built.parent == tmp_path / "cache" and built.exists()
    assert kernels.build_info(kernels._declare(ctypes.CDLL(str(built)))).startswith("portable ")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("DSALITE_KERNEL_CACHE", str(blocked / "cache"))
    monkeypatch.setattr(wisdom.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert kernels._build(cxx, "portable").parent.parent == tmp_path / "tmp"


@pytest.mark.parametrize("min_work,calls", [(1, True), (1 << 40, False)])
def test_compiled_graphs_call_the_kernel_only_above_the_work_threshold(best_lib, monkeypatch, min_work, calls):
    """In a compiled graph (dynamo tracing; the eager backend keeps the test quick) the indexer calls the kernel on the
    cache's tiled keys when the scoring work reaches COMPILED_MIN_WORK, and runs its fused PyTorch ops below that;
    both select the same keys."""
    counted = []

    class Counting:
        def __getattr__(self, name):
            counted.append(name)
            return getattr(best_lib, name)

    lib = Counting()
    monkeypatch.setattr(kernels, "load", lambda: lib)
    monkeypatch.setattr(kernels, "_available", True)
    monkeypatch.setattr(kernels, "COMPILED_MIN_WORK", min_work)
    g = torch.Generator().manual_seed(18)
    q, k, w, vis, K = case("decode", g)
    tiles = ix.tile_keys(k)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, w, t: ix.topk_indices(q, k, w, vis.block, K, SCALE, vis.key_range, t),
                       backend="eager", fullgraph=True)
    got = fn(q, k, w, tiles)
    torch._dynamo.reset()
    assert ("dsa_select" in counted) == calls
    want = select(q, k, w, vis, K, None, monkeypatch)
    clear = clear_rows(reference(q, k, w, vis), K)
    assert torch.equal(got.sort(-1).values[clear], want.sort(-1).values[clear])


@pytest.mark.parametrize("capacity,kept", [(4096, False), (16384, True)])
def test_compiled_runner_keeps_tiles_only_where_they_can_pay(best_lib, monkeypatch, capacity, kept):
    """A compiled runner whose cache can never hold COMPILED_TILES_MIN_WORK of scoring work drops the tiled keys
    (keeping them costs every compiled step more than the kernel gains there); an eager runner always keeps them."""
    from dsalite.config import ModelConfig
    from dsalite.inference.runner import Runner, new_cache
    from dsalite.model import build_model

    monkeypatch.setattr(kernels, "_lib", best_lib)
    monkeypatch.setattr(kernels, "_available", True)
    monkeypatch.setattr(kernels, "_tried", True)
    model = build_model(ModelConfig.tiny("glm_moe_dsa", index_n_heads=4, index_head_dim=32))
    work = capacity * 4 * 32
    assert (work >= kernels.COMPILED_TILES_MIN_WORK) == kept
    assert bool(Runner(model, new_cache(model, 1, capacity)).cache.index_tiles)
    assert bool(Runner(model, new_cache(model, 1, capacity), compile=True).cache.index_tiles) == kept
