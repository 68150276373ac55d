"""Decode/encode the quantised weight formats of DeepSeek/GLM checkpoints: FP8 e4m3 block-scaled, E8M0 scales, packed FP4 e2m1."""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "FP8_E4M3_MAX",
    "FP4_E2M1_MAX",
    "E2M1_VALUES",
    "decode_e8m0",
    "encode_e8m0",
    "dequantize_fp8_block",
    "quantize_fp8_block",
    "dequantize_fp4",
    "quantize_fp4",
    "dequantize",
    "SCALE_DTYPES",
    "scale_block",
    "logical_shape",
]

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
DEFAULT_FP8_BLOCK = (128, 128)
DEFAULT_FP4_GROUP = 32

# E2M1 code -> value. bit3 is the sign, bits 2..0 index the magnitude; code 0x8 is -0.0.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = tuple(list(_E2M1_MAGNITUDES) + [-m for m in _E2M1_MAGNITUDES])
# Midpoints between neighbouring magnitudes; used by the encoder's round-to-nearest.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

_FLOAT_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_E8M0_DTYPES = (torch.float8_e8m0fnu, torch.uint8)
_FP4_STORAGE_DTYPES = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)
SCALE_DTYPES = _FLOAT_SCALE_DTYPES + _E8M0_DTYPES  # what a stored scale may be


def _label(name: str | None) -> str:
    return repr(name) if name else "<unnamed tensor>"


# --------------------------------------------------------------------------- E8M0


def decode_e8m0(t: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """E8M0 exponent bytes -> float32 2**(e-127); code 0 is 2**-127, 255 is NaN.

    Accepts float8_e8m0fnu or raw uint8 storage and nothing else: refusing float
    input is what stops an already-decoded scale from being decoded a second time,
    and going through the byte (never ``.float()`` of a uint8) stops code 120 from
    being read as the number 120.  The float32 bit pattern is built directly, so
    the result is exact for every code.
    """
    if t.dtype == torch.float8_e8m0fnu:
        codes = t.view(torch.uint8)
    elif t.dtype == torch.uint8:
        codes = t
    else:
        raise ValueError(
            f"{_label(name)}: E8M0 scales must be float8_e8m0fnu or uint8, got {t.dtype} "
            "(float scales are already decoded and must be used as is)"
        )
    e = codes.to(torch.int32)
    bits = e << 23  # codes 1..254: biased exponent field, zero mantissa
    bits = torch.where(e == 0, torch.full_like(bits, 0x00400000), bits)  # 2**-127 is subnormal in fp32
    bits = torch.where(e == 255, torch.full_like(bits, 0x7FC00000), bits)  # quiet NaN
    return bits.view(torch.float32)


def encode_e8m0(
    x: torch.Tensor, *, as_float8: bool = False, name: str | None = None
) -> torch.Tensor:
    """Positive float scales -> E8M0 codes, rounding UP to the next power of two.

    Rounding up guarantees ``scale >= amax / qmax`` so quantised values never
    exceed the format's range.  Exact powers of two map to themselves; 0 and
    anything below 2**-127 map to code 0 (2**-127); values above 2**127, inf and
    NaN map to 255 (NaN).  Note torch's own ``.to(float8_e8m0fnu)`` cast rounds to
    nearest on the mantissa (1.25 -> 1.0, 1.5 -> 2.0), so it is not used here.
    Returns uint8, or float8_e8m0fnu with ``as_float8=True``.
    """
    if not x.dtype.is_floating_point or x.dtype in (torch.float8_e8m0fnu,):
        raise ValueError(f"{_label(name)}: encode_e8m0 expects a float tensor, got {x.dtype}")
    xf = x.float()
    if bool((xf < 0).any()):
        raise ValueError(f"{_label(name)}: E8M0 scales must be non-negative")
    mant, exp = torch.frexp(xf)  # x = mant * 2**exp, mant in [0.5, 1)
    # exact power of two 2**(exp-1) keeps its exponent; anything else goes up to 2**exp
    code = torch.where(mant == 0.5, exp + 126, exp + 127)
    code = torch.where(xf == 0, torch.zeros_like(code), code)
    code = code.clamp(0, 255)
    code = torch.where(torch.isnan(xf) | torch.isinf(xf), torch.full_like(code, 255), code)
    out = code.to(torch.uint8)
    return out.view(torch.float8_e8m0fnu) if as_float8 else out


def _scale_to_float(scale: torch.Tensor, name: str | None) -> torch.Tensor:
    """Dispatch a scale tensor by dtype: float scales as is, E8M0 bytes decoded once."""
    if scale.dtype in _FLOAT_SCALE_DTYPES:
        return scale.float()
    if scale.dtype in _E8M0_DTYPES:
        return decode_e8m0(scale, name=name)
    raise ValueError(
        f"{_label(name)}: unsupported scale dtype {scale.dtype} "
        "(expected float32/bfloat16/float16 or E8M0 as float8_e8m0fnu/uint8)"
    )


# --------------------------------------------------------------------------- block helpers


def _check_grid(
    w_shape: Sequence[int], s_shape: Sequence[int], block: tuple[int, int], name: str | None, what: str
) -> None:
    """The scale grid must be exactly ceil(rows/b0) x ceil(cols/b1) (ragged tail allowed)."""
    w_shape, s_shape = tuple(w_shape), tuple(s_shape)
    if len(w_shape) < 2:
        raise ValueError(f"{_label(name)}: {what} weight must be at least 2-D, got shape {w_shape}")
    rows, cols = w_shape[-2:]
    expect = tuple(w_shape[:-2]) + (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if s_shape != expect:
        raise ValueError(
            f"{_label(name)}: {what} scale grid {s_shape} does not match weight shape {w_shape} "
            f"with block {tuple(block)} (expected scale shape {expect})"
        )


def _normalise_block(block, name: str | None) -> tuple[int, int]:
    try:
        b0, b1 = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"{_label(name)}: block must be a pair of ints, got {block!r}") from None
    if b0 <= 0 or b1 <= 0:
        raise ValueError(f"{_label(name)}: block sizes must be positive, got {block!r}")
    return b0, b1


def _blockwise_(out: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], divide: bool = False) -> torch.Tensor:
    """In place, out[..., i, j] (*|/)= scale[..., i // b0, j // b1].

    The matrix is cut into at most four regions (full blocks, ragged right
    columns, ragged bottom rows, ragged corner); each region is a strided *view*
    split into [n_blocks, block] per dim and combined with a broadcast view of
    the matching scale slice, so no full-size scale tensor is ever built.
    """
    b0, b1 = block
    rows, cols = out.shape[-2:]
    lead = out.shape[:-2]
    out3 = out.reshape(-1, rows, cols)  # a view: out is freshly allocated and contiguous
    s3 = scale.reshape(-1, *scale.shape[-2:])
    full_r, full_c = (rows // b0) * b0, (cols // b1) * b1
    row_parts = [(0, rows // b0, b0)] + ([(full_r, 1, rows - full_r)] if rows > full_r else [])
    col_parts = [(0, cols // b1, b1)] + ([(full_c, 1, cols - full_c)] if cols > full_c else [])
    for r0, nr, rb in row_parts:
        for c0, nc, cb in col_parts:
            if nr == 0 or nc == 0:
                continue
            region = out3[:, r0 : r0 + nr * rb, c0 : c0 + nc * cb].view(-1, nr, rb, nc, cb)
            s = s3[:, r0 // b0 : r0 // b0 + nr, None, c0 // b1 : c0 // b1 + nc, None]
            if divide:
                region.div_(s)
            else:
                region.mul_(s)
    return out3.view(*lead, rows, cols)


def _block_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-block max |w| over a (possibly ragged) grid; zero padding cannot raise a max of |.|."""
    b0, b1 = block
    rows, cols = w.shape[-2:]
    nr, nc = math.ceil(rows / b0), math.ceil(cols / b1)
    a = w.abs().reshape(-1, rows, cols)
    a = torch.nn.functional.pad(a, (0, nc * b1 - cols, 0, nr * b0 - rows))
    amax = a.view(-1, nr, b0, nc, b1).amax(dim=(2, 4))
    return amax.view(*w.shape[:-2], nr, nc)


def _pow2_scale_codes(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power-of-two E8M0 code whose scale satisfies amax <= qmax * scale.

    ``amax / qmax`` is rounded in float32.  For qmax 6 or 448 that rounding
    cannot land on a power of two from above, but checking ``amax <= qmax *
    scale`` directly (exact: power-of-two scale) keeps the guarantee independent
    of that argument, e.g. for other qmax values.
    """
    code = encode_e8m0(amax / qmax).to(torch.int32)
    short = amax > qmax * decode_e8m0(code.clamp(0, 255).to(torch.uint8))
    code = torch.where(short & (code < 254), code + 1, code)
    return code.to(torch.uint8)


# --------------------------------------------------------------------------- FP8


def dequantize_fp8_block(
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    name: str | None = None,
    block: Sequence[int] | None = None,
) -> torch.Tensor:
    """float8_e4m3fn weight x per-block scale -> float32.

    Block size is fixed (default 128x128) and the last block in each dim may be
    ragged: the scale grid must be ceil(out/b) x ceil(in/b).  Deriving the block
    as rows // scale_rows (as transformers does) is wrong for e.g. 576-row
    kv_a_proj_with_mqa, so it is never done.  The product is taken in float32
    so it is bit-exact against a plain w.float() * s reference.
    """
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{_label(name)}: FP8 weight must be float8_e4m3fn, got {weight.dtype}")
    blk = _normalise_block(DEFAULT_FP8_BLOCK if block is None else block, name)
    _check_grid(weight.shape, scale.shape, blk, name, "FP8")
    s = _scale_to_float(scale, name)
    out = weight.to(torch.float32).contiguous()
    return _blockwise_(out, s, blk)


def quantize_fp8_block(
    w: torch.Tensor,
    block: Sequence[int] = DEFAULT_FP8_BLOCK,
    scale_fmt: str = "float",
    *,
    e8m0_dtype: torch.dtype = torch.uint8,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight -> (float8_e4m3fn weight, per-block scale) with scale ~ amax/448.

    ``scale_fmt="float"`` gives float32 scales = amax/448 (all-zero blocks get
    1.0 to avoid 0/0); ``"ue8m0"`` rounds the scale up to a power of two and
    returns E8M0 codes (``e8m0_dtype`` uint8 or float8_e8m0fnu), as in the
    UE8M0 DeepSeek checkpoints.  Values are clamped to +-448 before the cast
    because torch's fp8 cast does not saturate.  Mainly for building test
    checkpoints.
    """
    if not w.dtype.is_floating_point or w.dtype.itemsize < 2:
        raise ValueError(f"{_label(name)}: quantize_fp8_block expects a float16/bf16/float32 tensor, got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"{_label(name)}: FP8 weight must be at least 2-D, got shape {tuple(w.shape)}")
    blk = _normalise_block(block, name)
    wf = w.to(torch.float32)
    amax = _block_amax(wf, blk)
    if scale_fmt == "float":
        scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
        scale_f = scale
    elif scale_fmt == "ue8m0":
        if e8m0_dtype not in _E8M0_DTYPES:
            raise ValueError(f"{_label(name)}: e8m0_dtype must be uint8 or float8_e8m0fnu, got {e8m0_dtype}")
        codes = _pow2_scale_codes(amax, FP8_E4M3_MAX)
        scale = codes.view(e8m0_dtype)
        scale_f = decode_e8m0(codes)
    else:
        raise ValueError(f"{_label(name)}: scale_fmt must be 'float' or 'ue8m0', got {scale_fmt!r}")
    q = _blockwise_(wf.clone().contiguous(), scale_f, blk, divide=True)
    q = q.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


# --------------------------------------------------------------------------- FP4


def _e2m1_pair_table(device: torch.device) -> torch.Tensor:
    """byte -> (value of low nibble, value of high nibble) as a [256, 2] float32 table."""
    vals = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([vals[b & 0xF], vals[b >> 4]], dim=-1).to(device)


def _fp4_bytes(packed: torch.Tensor, name: str | None) -> torch.Tensor:
    if packed.dtype not in _FP4_STORAGE_DTYPES:
        raise ValueError(
            f"{_label(name)}: packed FP4 weight must be int8/uint8/float4_e2m1fn_x2, got {packed.dtype}"
        )
    return packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)


def dequantize_fp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    *,
    name: str | None = None,
    group: int = DEFAULT_FP4_GROUP,
) -> torch.Tensor:
    """Packed E2M1 [out, in/2] x E8M0 scale per ``group`` input columns -> float32 [out, in].

    Byte k of a row holds column 2k in its LOW nibble and column 2k+1 in its
    HIGH nibble.  Decoding goes through a 256-entry byte -> value-pair table, so
    each byte is read once and the result is laid out without an interleave copy.
    """
    raw = _fp4_bytes(packed, name)
    if raw.dim() < 2:
        raise ValueError(f"{_label(name)}: packed FP4 weight must be at least 2-D, got shape {tuple(raw.shape)}")
    rows, half = raw.shape[-2:]
    cols = 2 * half
    if cols % group != 0:
        hint = " (odd packed width)" if half % 2 else ""
        raise ValueError(
            f"{_label(name)}: FP4 input width {cols} (packed width {half}){hint} is not a multiple "
            f"of the scale group {group}"
        )
    full_shape = tuple(raw.shape[:-1]) + (cols,)
    _check_grid(full_shape, scale.shape, (1, group), name, "FP4")
    s = _scale_to_float(scale, name)
    out = _e2m1_pair_table(raw.device)[raw.long()].view(full_shape)
    return _blockwise_(out, s, (1, group))


def quantize_fp4(
    w: torch.Tensor,
    *,
    group: int = DEFAULT_FP4_GROUP,
    e8m0_dtype: torch.dtype = torch.uint8,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (packed int8 [out, in/2], E8M0 scale [out, in/group]).

    Each group's scale is the smallest power of two >= amax/6, so scaled values
    fit E2M1's +-6 range; values are then rounded to the nearest E2M1 value,
    ties going to the even code (mantissa bit 0), and clamped to +-6.  The sign
    bit is copied from the input, so small negatives become -0.0 (code 0x8).
    """
    if not w.dtype.is_floating_point or w.dtype.itemsize < 2:
        raise ValueError(f"{_label(name)}: quantize_fp4 expects a float16/bf16/float32 tensor, got {w.dtype}")
    if e8m0_dtype not in _E8M0_DTYPES:
        raise ValueError(f"{_label(name)}: e8m0_dtype must be uint8 or float8_e8m0fnu, got {e8m0_dtype}")
    if w.dim() < 2:
        raise ValueError(f"{_label(name)}: FP4 weight must be at least 2-D, got shape {tuple(w.shape)}")
    cols = w.shape[-1]
    if cols % group != 0 or cols % 2 != 0:
        raise ValueError(f"{_label(name)}: FP4 input width {cols} is not a multiple of the scale group {group}")
    wf = w.to(torch.float32)
    g = wf.reshape(*wf.shape[:-1], cols // group, group)
    codes_s = _pow2_scale_codes(g.abs().amax(dim=-1), FP4_E2M1_MAX)
    v = (g / decode_e8m0(codes_s).unsqueeze(-1)).reshape(wf.shape)  # exact: power-of-two divisor
    mag = v.abs().clamp_(max=FP4_E2M1_MAX)
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=v.device)
    idx = torch.bucketize(mag, mids)  # a value equal to a midpoint goes to the lower code
    on_mid = mag == mids[idx.clamp(max=len(_E2M1_MIDPOINTS) - 1)]
    idx = idx + (on_mid & (idx % 2 == 1)).long()  # ...unless that lower code is odd
    code = idx | (torch.signbit(v).long() << 3)
    byte = code[..., 0::2] | (code[..., 1::2] << 4)
    packed = byte.to(torch.uint8).view(torch.int8)
    return packed, codes_s.view(e8m0_dtype)


# --------------------------------------------------------------------------- entry point


def scale_block(dtype: torch.dtype, block: Sequence[int] | None = None) -> tuple[int, int] | None:
    """The scale block `dequantize` applies to a weight stored as `dtype`, given a config's weight_block_size
    (`block`, or None): FP8 -> `block` or 128x128; packed E2M1 -> `block` when it is (1, g), else 1x32 groups.
    None when `dtype` is not a quantised format."""
    if dtype == torch.float8_e4m3fn:
        return tuple(block) if block else DEFAULT_FP8_BLOCK
    if dtype in _FP4_STORAGE_DTYPES:
        return tuple(block) if block and block[0] == 1 else (1, DEFAULT_FP4_GROUP)
    return None


def logical_shape(dtype: torch.dtype, shape: Sequence[int]) -> tuple[int, ...]:
    """The dequantised shape of a weight stored as `dtype`: packed E2M1 holds two columns per byte."""
    shape = tuple(shape)
    return shape[:-1] + (2 * shape[-1],) if dtype in _FP4_STORAGE_DTYPES and shape else shape


def dequantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    name: str,
    block: Sequence[int] | None = None,
) -> torch.Tensor:
    """The loader's single entry point: quantised weight + scale -> float32.

    Dispatch is on dtypes only: float8_e4m3fn -> FP8 block-scaled (``block``
    default 128x128, ragged tails allowed); int8/uint8/float4_e2m1fn_x2 ->
    packed FP4 with 1x32 groups (``block`` may override as (1, g)).  Scales in
    float32/bf16/fp16 are used as is, float8_e8m0fnu/uint8 are decoded once.
    """
    if weight.dtype == torch.float8_e4m3fn:
        return dequantize_fp8_block(weight, scale, name=name, block=block)
    if weight.dtype in _FP4_STORAGE_DTYPES:
        group = DEFAULT_FP4_GROUP
        if block is not None:
            b0, group = _normalise_block(block, name)
            if b0 != 1:
                raise ValueError(f"{_label(name)}: FP4 scales are per row group, block must be (1, g), got {block!r}")
        return dequantize_fp4(weight, scale, name=name, group=group)
    raise ValueError(
        f"{_label(name)}: weight dtype {weight.dtype} is not a quantised format "
        "(expected float8_e4m3fn, or int8/uint8/float4_e2m1fn_x2 packed FP4)"
    )
