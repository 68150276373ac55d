"""Tests for dsalite.checkpoint.quant: E8M0, FP8 block-scaled and packed FP4 decode/encode against independent references."""

import math

import pytest
import torch

from dsalite.checkpoint.quant import (
    decode_e8m0,
    dequantize,
    dequantize_fp4,
    dequantize_fp8_block,
    encode_e8m0,
    quantize_fp4,
    quantize_fp8_block,
)

# Written out by hand (not imported) so a wrong table in the module cannot pass.
E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
E2M1_MAGS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _as_storage(codes_u8, storage):
    return codes_u8 if storage == "uint8" else codes_u8.view(torch.float8_e8m0fnu)


# ----------------------------------------------------------------------------- E8M0


@pytest.mark.parametrize("storage", ["uint8", "float8_e8m0fnu"])
def test_e8m0_edge_codes(storage):
    codes = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8)
    got = decode_e8m0(_as_storage(codes, storage))
    assert got.dtype == torch.float32
    expect = [2.0**-127, 2.0**-126, 1.0, 2.0, 2.0**127]
    assert got[:5].tolist() == expect  # code 0 is 2**-127, not 0
    assert got[0].item() > 0
    assert torch.isnan(got[5])


@pytest.mark.parametrize("storage", ["uint8", "float8_e8m0fnu"])
def test_e8m0_all_codes_match_reference(storage):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = decode_e8m0(_as_storage(codes, storage))
    ref_math = torch.tensor([math.ldexp(1.0, e - 127) for e in range(255)], dtype=torch.float32)
    assert torch.equal(got[:255], ref_math)
    # torch's own e8m0 -> float cast is a second, independent reference
    assert torch.equal(got[:255], codes.view(torch.float8_e8m0fnu).float()[:255])


def test_e8m0_decode_refuses_float_input():
    # a scale that is already 2**(e-127) must never be decoded again
    with pytest.raises(ValueError, match="blk.3.scale"):
        decode_e8m0(torch.tensor([2.0**-7]), name="blk.3.scale")
    with pytest.raises(ValueError, match="blk.3.scale"):
        decode_e8m0(torch.tensor([120], dtype=torch.int8), name="blk.3.scale")


def _ceil_pow2_code(x: float) -> int:
    """Independent reference: smallest e in [0, 254] with 2**(e-127) >= x."""
    for e in range(255):
        if math.ldexp(1.0, e - 127) >= x:
            return e
    return 255


def test_encode_e8m0_rounds_up_to_power_of_two():
    g = _gen(1)
    vals = [0.0, 3.0, 1.25, 1.5, 1.0000001, 0.75, 2.0**-127, 2.0**-130, 2.0**-149, 2.0**127, 1.0 / 448, 1.0 / 6]
    vals += [math.ldexp(1.0, k) for k in range(-127, 128)]
    vals += (2.0 ** (torch.rand(1000, generator=g, dtype=torch.float64) * 250 - 125)).tolist()
    x = torch.tensor(vals, dtype=torch.float32)
    got = encode_e8m0(x)
    assert got.dtype == torch.uint8
    ref = torch.tensor([_ceil_pow2_code(v) for v in x.double().tolist()], dtype=torch.uint8)
    assert torch.equal(got, ref)
    assert encode_e8m0(torch.tensor([3.0])).item() == 129  # 3.0 -> 4.0
    assert encode_e8m0(torch.tensor([1.25])).item() == 128  # rounds up, not to nearest
    # scale >= value for every finite input: the property the quantisers rely on
    assert bool((decode_e8m0(got) >= x).all())
    # exact powers of two survive a round trip
    pows = torch.tensor([math.ldexp(1.0, k) for k in range(-127, 128)], dtype=torch.float32)
    assert torch.equal(decode_e8m0(encode_e8m0(pows)), pows)


def test_encode_e8m0_specials_and_flag():
    x = torch.tensor([float("nan"), float("inf"), 2.0**127 * 1.5, 0.0])
    assert encode_e8m0(x).tolist() == [255, 255, 255, 0]
    f8 = encode_e8m0(torch.tensor([3.0, 1.0]), as_float8=True)
    assert f8.dtype == torch.float8_e8m0fnu
    assert f8.view(torch.uint8).tolist() == [129, 127]
    with pytest.raises(ValueError, match="neg.scale"):
        encode_e8m0(torch.tensor([-1.0]), name="neg.scale")


# ----------------------------------------------------------------------------- FP8


def _fp8_reference(w8: torch.Tensor, scale_vals: list[list[float]], block=128) -> torch.Tensor:
    """Plain python loop over blocks; slicing handles the ragged last block."""
    wf = w8.float()
    out = torch.empty_like(wf)
    rows, cols = wf.shape
    for bi in range(math.ceil(rows / block)):
        for bj in range(math.ceil(cols / block)):
            r, c = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            out[r, c] = wf[r, c] * torch.tensor(scale_vals[bi][bj], dtype=torch.float32)
    return out


def _random_fp8(rows, cols, seed):
    return (torch.randn(rows, cols, generator=_gen(seed)) * 60).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("shape", [(576, 256), (256, 200), (128, 128)])
@pytest.mark.parametrize("scale_kind", ["float32", "bfloat16", "uint8", "float8_e8m0fnu"])
def test_fp8_dequant_bit_exact(shape, scale_kind):
    rows, cols = shape
    w8 = _random_fp8(rows, cols, seed=rows + cols)
    grid = (math.ceil(rows / 128), math.ceil(cols / 128))
    g = _gen(7)
    if scale_kind in ("float32", "bfloat16"):
        scale = (torch.rand(grid, generator=g) * 1e-2 + 1e-4).to(getattr(torch, scale_kind))
        vals = scale.float().tolist()
    else:
        codes = torch.randint(100, 140, grid, generator=g, dtype=torch.int32).to(torch.uint8)
        codes.view(-1)[0] = 0  # 2**-127, the code most easily confused with zero
        scale = _as_storage(codes, scale_kind)
        vals = [[math.ldexp(1.0, int(e) - 127) for e in row] for row in codes.tolist()]
    got = dequantize(w8, scale, name="layers.0.self_attn.kv_a_proj_with_mqa.weight")
    assert got.dtype == torch.float32 and got.shape == shape and got.is_contiguous()
    ref = _fp8_reference(w8, vals)
    assert torch.equal(got, ref)
    assert torch.equal(dequantize_fp8_block(w8, scale, name="x", block=(128, 128)), ref)


def test_fp8_ragged_tail_uses_fixed_block():
    # 576 rows / 5 scale rows: the tail block is rows 512..575 (64 rows), not 115-row blocks
    w8 = torch.ones(576, 128).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    got = dequantize(w8, scale, name="kv_a")
    assert got[:, 0].tolist() == [float(i // 128 + 1) for i in range(576)]


def test_fp8_stacked_leading_dim():
    w8 = torch.stack([_random_fp8(200, 130, seed=s) for s in (1, 2, 3)])
    scale = torch.rand(3, 2, 2, generator=_gen(3)) + 0.5
    got = dequantize(w8, scale, name="experts")
    for e in range(3):
        assert torch.equal(got[e], _fp8_reference(w8[e], scale[e].tolist()))


def test_uint8_scale_code_120_is_two_to_minus_seven():
    w8 = _random_fp8(128, 128, seed=5)
    wf = w8.float()
    got = dequantize(w8, torch.tensor([[120]], dtype=torch.uint8), name="s120")
    assert torch.equal(got, wf * 2.0**-7)
    assert not torch.allclose(got, wf * 120.0)  # byte read as a linear number
    assert not torch.allclose(got, wf * 2.0 ** (2.0**-7 - 127))  # decoded twice
    # the same scale handed over already decoded (float32) is used as is
    assert torch.equal(dequantize(w8, torch.tensor([[2.0**-7]]), name="s120f"), got)
    # and through the FP4 path
    packed = torch.full((1, 16), 0x22, dtype=torch.uint8)  # every value 1.0
    assert dequantize(packed, torch.tensor([[120]], dtype=torch.uint8), name="fp4").unique().tolist() == [2.0**-7]


@pytest.mark.parametrize("shape", [(576, 256), (256, 200), (128, 128), (64, 300)])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_fp8_quantize_roundtrip(shape, scale_fmt):
    rows, cols = shape
    g = _gen(11)
    # magnitudes that vary by block and by row, plus an all-zero (ragged where possible) last block
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, rows).unsqueeze(1)
    r0, c0 = (rows - 1) // 128 * 128, (cols - 1) // 128 * 128
    w[r0:, c0:] = 0.0
    q, scale = quantize_fp8_block(w, scale_fmt=scale_fmt)
    assert q.dtype == torch.float8_e4m3fn
    assert scale.shape == (math.ceil(rows / 128), math.ceil(cols / 128))
    assert scale.dtype == (torch.float32 if scale_fmt == "float" else torch.uint8)
    assert not torch.isnan(q.float()).any()
    back = dequantize(q, scale, name="rt")
    amax = torch.zeros(scale.shape)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            blk = w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            err = (back[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128] - blk).abs()
            amax[bi, bj] = blk.abs().max()
            assert bool((err <= 0.07 * amax[bi, bj]).all()), (bi, bj)
    if scale_fmt == "ue8m0":
        s = decode_e8m0(scale)
        assert bool((s >= amax / 448).all())  # rounded up, never down
        assert bool(((s / 2) < amax / 448)[amax > 0].all())  # ...but only to the next power of two
    assert torch.equal(back[r0:, c0:], torch.zeros_like(back[r0:, c0:]))


def test_fp8_quantize_e8m0_dtype_flag():
    w = torch.randn(130, 130, generator=_gen(2))
    q, s = quantize_fp8_block(w, scale_fmt="ue8m0", e8m0_dtype=torch.float8_e8m0fnu)
    q2, s2 = quantize_fp8_block(w, scale_fmt="ue8m0")
    assert s.dtype == torch.float8_e8m0fnu
    assert torch.equal(s.view(torch.uint8), s2)
    assert torch.equal(dequantize(q, s, name="a"), dequantize(q2, s2, name="b"))


# ----------------------------------------------------------------------------- FP4


@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.float4_e2m1fn_x2])
def test_e2m1_all_16_codes(storage):
    # byte k = low nibble c, high nibble 15-c -> columns (2k, 2k+1) = (table[c], table[15-c])
    row = [c | ((15 - c) << 4) for c in range(16)]
    packed = torch.tensor([row], dtype=torch.uint8).view(storage)
    one = torch.tensor([[127]], dtype=torch.uint8)
    got = dequantize(packed, one, name="experts.0.w1")
    assert got.shape == (1, 32) and got.dtype == torch.float32
    for c in range(16):
        assert got[0, 2 * c].item() == E2M1_TABLE[c], c
        assert got[0, 2 * c + 1].item() == E2M1_TABLE[15 - c], c
    assert torch.signbit(got[0, 16]).item()  # code 0x8 is -0.0
    assert not torch.signbit(got[0, 31]).item()  # code 0x0 is +0.0


def test_e2m1_nibble_order():
    packed = torch.zeros(1, 16, dtype=torch.uint8)
    packed[0, 0] = 0x21  # low nibble 1 (0.5) -> column 0, high nibble 2 (1.0) -> column 1
    packed[0, 1] = 0xF7  # low 7 (6.0) -> column 2, high 0xF (-6.0) -> column 3
    got = dequantize(packed, torch.tensor([[128]], dtype=torch.uint8), name="w")
    assert got[0, :4].tolist() == [1.0, 2.0, 12.0, -12.0]
    assert got[0, 4:].abs().sum().item() == 0.0


def test_fp4_per_group_scales():
    g = _gen(4)
    packed = torch.randint(0, 256, (3, 48), generator=g, dtype=torch.int32).to(torch.uint8)
    codes = torch.randint(110, 140, (3, 3), generator=g, dtype=torch.int32).to(torch.uint8)
    got = dequantize_fp4(packed.view(torch.int8), codes.view(torch.float8_e8m0fnu), name="w")
    for r in range(3):
        for c in range(96):
            byte = int(packed[r, c // 2])
            code = byte & 0xF if c % 2 == 0 else byte >> 4
            want = E2M1_TABLE[code] * math.ldexp(1.0, int(codes[r, c // 32]) - 127)
            assert got[r, c].item() == want, (r, c)


def test_fp4_encode_exact_for_representable():
    g = _gen(5)
    rows, cols = 8, 128
    codes = torch.randint(0, 16, (rows, cols), generator=g)
    codes[:, ::32] = torch.where(torch.rand(rows, cols // 32, generator=g) < 0.5, 7, 15)  # |6| in each group
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    scale = torch.randint(90, 160, (rows, cols // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    x = dequantize(packed, scale, name="w")
    p2, s2 = quantize_fp4(x)
    assert p2.dtype == torch.int8 and s2.dtype == torch.uint8
    assert torch.equal(p2, packed)  # bit-identical bytes, -0.0 included
    assert torch.equal(s2, scale)
    assert torch.equal(dequantize(p2, s2, name="w"), x)


def test_fp4_encode_idempotent_on_decoded_values():
    # any decoded tensor is representable, even where the new scale differs from the old one
    g = _gen(6)
    packed = torch.randint(0, 256, (16, 64), generator=g, dtype=torch.int32).to(torch.uint8)
    scale = torch.randint(20, 230, (16, 4), generator=g, dtype=torch.int32).to(torch.uint8)
    x = dequantize(packed, scale, name="w")
    assert torch.equal(dequantize(*quantize_fp4(x), name="w"), x)


def _nearest_e2m1_reference(x: torch.Tensor, group=32) -> torch.Tensor:
    """float64 reference: pow2 scale >= amax/6, nearest magnitude, ties to the even code."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for g0 in range(0, cols, group):
            blk = x[r, g0 : g0 + group].double().tolist()
            amax = max(abs(v) for v in blk)
            k = -127
            while math.ldexp(1.0, k) < amax / 6:
                k += 1
            s = math.ldexp(1.0, k)
            for j, v in enumerate(blk):
                a = min(abs(v) / s, 6.0)
                d = [abs(a - m) for m in E2M1_MAGS]
                best = min(range(8), key=lambda i: (d[i], i % 2))
                out[r, g0 + j] = math.copysign(E2M1_MAGS[best] * s, v)
    return out


def test_fp4_encode_matches_nearest_grid():
    g = _gen(8)
    x = torch.randn(6, 96, generator=g) * (2.0 ** torch.randint(-20, 20, (6, 1), generator=g).float())
    got = dequantize(*quantize_fp4(x), name="w")
    assert torch.equal(got.double(), _nearest_e2m1_reference(x))


def test_fp4_encode_ties_to_even():
    # group amax 6 -> scale 1; midpoints between neighbours go to the even code
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x = torch.zeros(1, 32)
    x[0, 0] = 6.0
    x[0, 1:8] = torch.tensor(mids)
    x[0, 8:15] = -torch.tensor(mids)
    x[0, 15] = 0.2600  # just above a midpoint: rounds up
    got = dequantize(*quantize_fp4(x), name="w")[0]
    expect = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert got[1:8].tolist() == expect
    assert got[8:15].tolist() == [-v for v in expect]
    assert got[15].item() == 0.5


def test_fp4_encode_scale_is_next_power_of_two():
    x = torch.zeros(2, 32)
    x[0, 0] = 6.5  # amax/6 just above 1 -> scale 2
    x[1, 0] = 6.0  # exactly 6 -> scale 1
    _, s = quantize_fp4(x)
    assert decode_e8m0(s).tolist() == [[2.0], [1.0]]
    packed, s = quantize_fp4(torch.zeros(1, 32))
    assert torch.equal(dequantize(packed, s, name="z"), torch.zeros(1, 32))


# ----------------------------------------------------------------------------- bad input


def test_fp8_wrong_scale_grid_names_tensor_and_shapes():
    w8 = torch.zeros(576, 256).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError) as ei:
        dequantize(w8, torch.ones(4, 2), name="layers.3.kv_a_proj_with_mqa.weight")
    msg = str(ei.value)
    assert "layers.3.kv_a_proj_with_mqa.weight" in msg and "(576, 256)" in msg and "(4, 2)" in msg
    with pytest.raises(ValueError, match="q_b_proj"):
        dequantize(torch.zeros(256, 200).to(torch.float8_e4m3fn), torch.ones(2, 1), name="q_b_proj")
    with pytest.raises(ValueError, match="q_b_proj"):  # grid fine for 128, wrong for the given block
        dequantize(torch.zeros(256, 256).to(torch.float8_e4m3fn), torch.ones(2, 2), name="q_b_proj", block=(64, 64))


def test_fp4_odd_packed_width():
    with pytest.raises(ValueError, match="experts.7.w2"):
        dequantize(torch.zeros(4, 17, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.uint8), name="experts.7.w2")


def test_fp4_in_not_multiple_of_32():
    with pytest.raises(ValueError, match="experts.7.w3"):
        dequantize(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.uint8), name="experts.7.w3")
    with pytest.raises(ValueError, match="enc.w"):
        quantize_fp4(torch.zeros(4, 48), name="enc.w")


def test_fp4_wrong_scale_grid():
    with pytest.raises(ValueError, match="experts.1.w1") as ei:
        dequantize(torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.uint8), name="experts.1.w1")
    assert "(4, 1)" in str(ei.value) and "(4, 2)" in str(ei.value)


def test_wrong_dtypes():
    with pytest.raises(ValueError, match="mlp.down_proj"):
        dequantize(torch.zeros(128, 128, dtype=torch.bfloat16), torch.ones(1, 1), name="mlp.down_proj")
    with pytest.raises(ValueError, match="mlp.up_proj"):
        dequantize(torch.zeros(128, 128).to(torch.float8_e4m3fn), torch.ones(1, 1, dtype=torch.int32), name="mlp.up_proj")
    with pytest.raises(ValueError, match="mlp.gate_proj"):
        dequantize_fp4(torch.zeros(4, 16, dtype=torch.int16), torch.zeros(4, 1, dtype=torch.uint8), name="mlp.gate_proj")
    with pytest.raises(ValueError, match="wq"):
        dequantize_fp8_block(torch.zeros(128, 128).to(torch.float8_e5m2), torch.ones(1, 1), name="wq")
