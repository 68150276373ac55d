"""Rotary position embedding: default and yarn frequencies, interleaved and half-split rotation.

Legend: p = rotary width (qk_rope_head_dim), positions are absolute token positions.
Both layouts return HF's output order `[x1·c − x2·s | x2·c + x1·s]`; they differ only in how the pairs are taken:
interleaved pairs (x[2i], x[2i+1]) (MLA everywhere, GLM indexer), half-split pairs (x[i], x[i+p/2]) (V3.2 indexer,
V3 MLA with `rope_interleave: false`). The interleaved output is therefore de-interleaved, as in HF
(`apply_rotary_pos_emb_interleave`); dot products do not care, cached keys do.
"""

from __future__ import annotations

import math

import torch


def inv_freq_and_scale(rope: dict, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [p/2] and the cos/sin multiplier (yarn's attention_factor), as HF computes them."""
    base = float(rope["rope_theta"])
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if rope.get("rope_type", "default") == "default":
        return 1.0 / pos_freqs, 1.0
    # yarn (HF `_compute_yarn_parameters`)
    orig = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_position_embeddings / orig
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float, dtype: torch.dtype):
    """cos, sin of shape [*positions.shape, p/2], computed in fp32 then cast (HF casts to the activation dtype)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of x [..., p]; cos/sin [..., p/2] must broadcast against x's leading dims."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_trailing(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4 rope: interleaved pairs on the *trailing* p = 2·cos.shape[-1] dims, output kept interleaved, math
    in fp32 (HF `deepseek_v4.apply_rotary_pos_emb`). x [..., D]; cos/sin [..., p/2] broadcast against x's leading dims.
    The inverse rotation (V4 undoes the values' rope on the attention output) is this with -sin."""
    p = 2 * cos.shape[-1]
    r = x[..., -p:].float()
    x1, x2 = r[..., 0::2], r[..., 1::2]
    rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([x[..., :-p], rot.to(x.dtype)], dim=-1)
