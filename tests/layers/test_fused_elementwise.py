"""The fused element-wise CPU kernels (RMSNorm, SwiGLU) against float64 references, in every build this CPU runs:
forward and gradients, widths that are not whole vectors, strided inputs, exp's saturation, threads; the PyTorch code
where the kernels do not apply (small tensors, V4's clamped SwiGLU); a whole model's HF parity and training step on
either path."""

import contextlib

import pytest
import torch

from dsalite import kernels
from dsalite.layers.moe import swiglu, swiglu_fused
from dsalite.layers.norm import RMSNorm, RMSNormF32


@pytest.fixture(params=kernels.cpu_isas())
def lib(request, monkeypatch):
    """Each target's build routed to the layers, for tensors of any size."""
    built = kernels.library(request.param)
    monkeypatch.setattr(kernels, "load", lambda: built)
    monkeypatch.setattr(kernels, "ELEMENTWISE_MIN_NUMEL", 0)
    monkeypatch.setattr(kernels, "_elementwise", True)  # whatever this machine's calibration said
    return built


@contextlib.contextmanager
def routed(lib):
    """Within the block the layers run on `lib` (None: their PyTorch code)."""
    saved = kernels.load
    kernels.load = lambda: lib
    try:
        yield
    finally:
        kernels.load = saved


def grads(fn, inputs, dout):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, dout))


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("cls", [RMSNorm, RMSNormF32])
@pytest.mark.parametrize("shape,strided", [((2, 70, 256), False), ((150, 100), False), ((3, 33, 37), True),
                                           ((1, 5, 64), True)])
def test_rms_norm_kernel_matches_float64(lib, cls, shape, strided):
    """Output and gradients of x and of the weight within fp32 rounding of float64, the kernel no further from it than
    PyTorch's ops are (times a small factor: the summation orders differ); inputs that are a slice of wider rows
    (as the latent `kv_a` split hands them over) read in place."""
    g = torch.Generator().manual_seed(3)
    D = shape[-1]
    wide = torch.randn(*shape[:-1], D + 9 if strided else D, generator=g) * 3
    x = wide[..., :D]
    norm = cls(D, eps=1e-6)
    norm.weight.data = torch.randn(D, generator=g)
    dy = torch.randn(shape, generator=g)
    xg = x.detach().requires_grad_()
    out = norm(xg)
    assert type(out.grad_fn).__name__ == "KernelRMSNormBackward"
    got = (out, *torch.autograd.grad(out, (xg, norm.weight), dy))
    x64, w64 = x.double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    exact = grads(lambda a, w: w * (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)), (x64, w64), dy.double())
    with routed(None):
        twin = grads(lambda a, w: norm(a), (x.detach().requires_grad_(), norm.weight), dy)
    for name, a, t, e in zip(("y", "dx", "dw"), got, twin, exact):
        err, err_twin = (a.double() - e).abs().max(), (t.double() - e).abs().max()
        scale = e.abs().max()
        assert err < 1e-6 * scale and err <= 4 * err_twin + 1e-7 * scale, (name, err, err_twin)


def test_rms_norm_threads_split_rows_and_sum_the_weight_gradient(lib):
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(300, 96, generator=g, requires_grad=True), torch.randn(300, 96, generator=g)
    norm = RMSNorm(96)
    one = grads(lambda a: norm(a), (x,), dy) + torch.autograd.grad(norm(x), norm.weight, dy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        three = grads(lambda a: norm(a), (x,), dy) + torch.autograd.grad(norm(x), norm.weight, dy)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])  # row-local: identical
    # the weight's gradient is summed in parts: each sum within fp32 rounding of the float64 one
    terms = dy.double() * (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6))
    exact, bound = terms.sum(0), terms.abs().sum(0) * 2e-6
    for dw in (one[2], three[2]):
        assert ((dw.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("rows,I", [(90, 256), (7, 45), (33, 8)])
def test_swiglu_kernel_matches_float64(lib, rows, I):
    """silu(gate)·up and its gradients, separate gate and up (dense MLP) and the experts' fused gate_up, whose
    gradient comes back as one tensor; gates far out on both sides, where e^-g saturates (silu → 0 and → g)."""
    g = torch.Generator().manual_seed(5)
    gate_up = torch.randn(rows, 2 * I, generator=g) * 4
    gate_up[0, :I] = torch.linspace(-120, 120, I)
    dy = torch.randn(rows, I, generator=g)
    gu64 = gate_up.double().requires_grad_()
    exact = grads(lambda t: torch.nn.functional.silu(t[:, :I]) * t[:, I:], (gu64,), dy.double())
    gu = leaves(gate_up)[0]
    fused = swiglu_fused(gu)
    assert type(fused.grad_fn).__name__ == "KernelSwiGLUBackward"
    got_fused = (fused, *torch.autograd.grad(fused, gu, dy))
    gate, up = leaves(gate_up[:, :I], gate_up[:, I:])
    sep = grads(swiglu, (gate, up), dy)
    got_sep = (sep[0], torch.cat(sep[1:], dim=-1))
    for got in (got_fused, got_sep):
        for a, e in zip(got, exact):
            torch.testing.assert_close(a.double(), e, rtol=2e-6, atol=2e-6 * e.abs().max().item())


def test_swiglu_takes_strided_halves_and_batched_rows(lib):
    """gate and up as column halves of one tensor (a row stride of 2I) and with leading batch dimensions."""
    g = torch.Generator().manual_seed(6)
    gate_up = torch.randn(2, 11, 2 * 40, generator=g)
    gate, up = gate_up.chunk(2, dim=-1)
    dy = torch.randn(2, 11, 40, generator=g)
    got = grads(swiglu, leaves(gate, up), dy)
    with routed(None):
        want = grads(swiglu, leaves(gate, up), dy)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clamped_swiglu_and_small_tensors_take_the_pytorch_code(monkeypatch):
    """V4's clamped SwiGLU has no kernel; a tensor below ELEMENTWISE_MIN_NUMEL (a decode step) runs PyTorch's ops."""
    monkeypatch.setattr(kernels, "load", lambda: kernels.library())
    monkeypatch.setattr(kernels, "_elementwise", True)
    big = torch.randn(kernels.ELEMENTWISE_MIN_NUMEL // 64, 128, requires_grad=True)
    assert type(swiglu_fused(big).grad_fn).__name__ == "KernelSwiGLUBackward"
    clamped = swiglu_fused(big, limit=1.5)
    assert type(clamped.grad_fn).__name__ == "MulBackward0"
    torch.testing.assert_close(clamped, torch.nn.functional.silu(big[:, :64].clamp(max=1.5))
                               * big[:, 64:].clamp(-1.5, 1.5))
    small = torch.randn(4, 128, requires_grad=True)
    assert type(swiglu_fused(small).grad_fn).__name__ == "MulBackward0"
    assert type(RMSNorm(128)(small).grad_fn).__name__ == "MulBackward0"
    assert type(RMSNorm(128)(big).grad_fn).__name__ == "KernelRMSNormBackward"


@pytest.mark.parametrize("case", ["glm52_schedule", "v3"])
def test_model_matches_transformers_and_trains_alike_on_either_path(lib, tmp_path, case):
    """With the fused kernels on every norm and SwiGLU (dense MLP, shared and routed experts) a tiny checkpoint's
    logits still match transformers to 1e-4, and a training step's loss and every parameter's gradient equal the
    PyTorch code's within fp32 rounding."""
    import torch.nn.functional as F
    from hf_fixtures import make_checkpoint

    from dsalite.checkpoint.pretrained import from_pretrained
    from dsalite.verify import compare

    path = make_checkpoint(tmp_path, case)
    rep = compare(path, batch=2, seed=1)
    assert rep.max_abs <= 1e-4 and rep.cosine > 0.999999, rep.format()
    model = from_pretrained(path)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))
    results = []
    for use in (True, False):
        model.zero_grad()
        with routed(lib if use else None):
            seen = set()
            hooks = [m.register_forward_hook(lambda mod, i, o, s=seen: s.add(type(o.grad_fn).__name__))
                     for m in model.modules() if isinstance(m, RMSNorm)]
            logits = model(ids).logits
            for h in hooks:
                h.remove()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
        assert ("KernelRMSNormBackward" in seen) == use, seen
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_k, grads_k), (loss_t, grads_t) = results
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-6, atol=1e-6)
    assert grads_k.keys() == grads_t.keys() and grads_k
    for name in grads_k:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
