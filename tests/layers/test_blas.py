"""The OpenBLAS products (`kernels.blas`) and the Linear layer built on them equal torch's: every operand layout, `out`
and accumulation, the fallbacks, and gradients through `dense` (bias, frozen weight, batched input)."""

import pytest
import torch
import torch.nn.functional as F

from dsalite.kernels import blas
from dsalite.layers import linear as lin


@pytest.fixture
def openblas(monkeypatch):
    """Force the OpenBLAS path (whatever this CPU's vendor), as DSALITE_BLAS=openblas does."""
    lib = blas._load()
    monkeypatch.setattr(blas, "_lib", lib)
    monkeypatch.setattr(blas, "_decided", True)
    return lib


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def matrix(rows, cols, layout, g):
    """rows x cols with contiguous rows ("row"), contiguous columns ("col") or neither ("strided", copied first)."""
    if layout == "row":
        return torch.randn(rows, cols, generator=g)
    if layout == "col":
        return torch.randn(cols, rows, generator=g).t()
    return torch.randn(rows, 2 * cols, generator=g)[:, ::2]


@pytest.mark.parametrize("a_layout,b_layout", [("row", "row"), ("row", "col"), ("col", "row"), ("col", "col"),
                                               ("strided", "row")])
def test_mm_matches_torch_for_every_layout(openblas, a_layout, b_layout):
    g = torch.Generator().manual_seed(0)
    M, K, N = 96, 200, 150
    a, b = matrix(M, K, a_layout, g), matrix(K, N, b_layout, g)
    assert M * N * K >= blas.MIN_WORK
    close(blas.mm(a, b), a @ b)
    out = torch.randn(M, N, generator=g)
    start = out.clone()
    close(blas.mm(a, b, out=out, accumulate=True), start + a @ b)
    close(blas.mm(a, b, out=out), a @ b)
    with pytest.raises(ValueError, match="contiguous rows"):
        blas.mm(a, b, out=torch.empty(N, M).t())


def test_small_or_foreign_products_take_torch(openblas, monkeypatch):
    """Below MIN_ROWS / MIN_WORK, or not fp32, the product is torch's: the library is never called."""
    monkeypatch.setattr(blas, "_sgemm", lambda *a, **k: pytest.fail("OpenBLAS called"))
    a, b = torch.randn(8, 64), torch.randn(64, 64)
    torch.testing.assert_close(blas.mm(a, b), a @ b)
    torch.testing.assert_close(blas.mm(a.double(), b.double()), a.double() @ b.double())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_dense_gradients_equal_f_linear(openblas, bias, frozen):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 160, generator=g, requires_grad=True)
    w = torch.randn(120, 160, generator=g, requires_grad=not frozen)
    b = torch.randn(120, generator=g, requires_grad=True) if bias else None
    dy = torch.randn(3, 40, 120, generator=g)
    y = lin.dense(x, w, b)
    assert type(y.grad_fn).__name__ == "_BlasLinearBackward"
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, leaves, dy)
    want_y = F.linear(x, w, b)
    close(y, want_y)
    for a, e in zip(got, torch.autograd.grad(want_y, leaves, dy)):
        close(a, e)


def test_linear_is_an_nn_linear_with_the_same_state_dict(openblas):
    layer = lin.Linear(160, 120)
    plain = torch.nn.Linear(160, 120)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, torch.nn.Linear) and layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(64, 160)
    close(layer(x), plain(x))


def test_environment_forces_the_choice(monkeypatch):
    monkeypatch.setattr(blas, "_why", blas._why)
    for choice, expect in (("torch", False), ("openblas", True)):
        monkeypatch.setenv("DSALITE_BLAS", choice)
        monkeypatch.setattr(blas, "_decided", False)
        monkeypatch.setattr(blas, "_lib", None)
        assert (blas.library() is not None) == expect


@pytest.mark.parametrize("transposed", [False, True])
def test_head_matmul_equals_einsum_with_gradients(openblas, transposed):
    """One product per head on strided views: MLA's absorbed query map (w = rows of kv_b_proj's weight) and output map
    (a transposed view of them)."""
    g = torch.Generator().manual_seed(2)
    H, a, b = 4, 48, 80
    weight = torch.randn(H, a + b, max(a, b), generator=g)
    w = (weight[:, a:, :a].transpose(1, 2) if transposed else weight[:, :a, :b]).requires_grad_()
    x = torch.randn(2, 70, H, a, generator=g, requires_grad=True)
    dy = torch.randn(2, 70, H, b, generator=g)
    y = lin.head_matmul(x, w)
    assert type(y.grad_fn).__name__ == "_HeadMatmulBackward"
    want = torch.einsum("...ha,hab->...hb", x, w)
    close(y, want)
    for got, exp in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(want, (x, w), dy)):
        close(got, exp)


@pytest.fixture
def undecided(monkeypatch, tmp_path):
    """`library` decides again, with an empty measurement cache."""
    monkeypatch.setattr(blas, "_decided", False)
    monkeypatch.setattr(blas, "_lib", None)
    monkeypatch.setattr(blas, "_why", blas._why)  # put back afterwards, with the decision itself
    monkeypatch.delenv("DSALITE_BLAS", raising=False)
    monkeypatch.setenv("DSALITE_KERNEL_CACHE", str(tmp_path))


@pytest.mark.parametrize("vendor,openblas", [("GenuineIntel", False), ("AuthenticAMD", True), ("HygonGenuine", True)])
def test_x86_rule_by_vendor(undecided, monkeypatch, vendor, openblas):
    """On x86 a fixed rule (MKL on Intel's CPUs, OpenBLAS on others'), never a timing: every process rounds alike."""
    monkeypatch.setattr(blas, "_vendor", lambda: vendor)
    monkeypatch.setattr(blas, "_rates", lambda lib: pytest.fail("timed on x86"))
    assert (blas.library() is not None) == openblas
    d = blas.decision()
    assert d["blas"] == ("OpenBLAS" if openblas else "torch") and d["why"].startswith("rule: ")


@pytest.mark.parametrize("faster", ["openblas", "torch"])
def test_other_architectures_calibrate_once_per_cpu(undecided, monkeypatch, faster):
    """Where no rule was measured (not x86), both BLAS are timed once and the faster is kept, cached for the CPU."""
    calls = []

    def rates(lib):
        calls.append(1)
        return {"openblas": 50.0, "torch": 40.0} if faster == "openblas" else {"openblas": 40.0, "torch": 50.0}

    monkeypatch.setattr(blas, "_vendor", lambda: "")
    monkeypatch.setattr(blas, "_rates", rates)
    assert (blas.library() is not None) == (faster == "openblas")
    assert blas.decision()["why"].startswith("calibrated on this CPU")
    monkeypatch.setattr(blas, "_decided", False)
    monkeypatch.setattr(blas, "_lib", None)
    assert (blas.library() is not None) == (faster == "openblas") and len(calls) == 1


def test_rates_measure_both_libraries():
    r = blas._rates(blas._load())
    assert r["torch"] > 1 and r["openblas"] > 1
