"""`convert`: an FP8 (or FP4) block-scaled HF checkpoint → a plain one, streamed shard by shard, on disk names.

No model is built, so MTP layers and anything else on disk are kept, whatever the family (DeepSeek-V4's original
`X.scale` names included). Everything is validated from the headers before anything is written.
"""

from __future__ import annotations

import math
import os
import shutil

import torch

from dsalite.checkpoint import quant
from dsalite.checkpoint.io import (
    CONFIG_NAME,
    CheckpointError,
    CheckpointReader,
    atomic_dir,
    plan_shards,
    read_config,
    write_json,
    write_shards,
)
from dsalite.checkpoint.load import block_size, pair_scales, read_dequantised
from dsalite.checkpoint.names import SCALE_SUFFIX

# Files of a checkpoint directory that are not tensors but belong with it (copied verbatim when present).
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "tokenizer.model",
)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_UNSCALED_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu)  # meaningless without a scale
# Router selection biases stay float32 (HF `_keep_in_fp32_modules_strict`); `ffn.gate.bias` is V4's original name.
_FP32_NAMES = ("e_score_correction_bias", ".ffn.gate.bias")


def _weight_of_scale(name: str) -> str | None:
    """`X.weight` for a block-scale tensor: HF's `X.weight_scale_inv` or DeepSeek-V4's original `X.scale`."""
    if name.endswith(SCALE_SUFFIX):
        return name[: -len(SCALE_SUFFIX)]
    if name.endswith(".scale"):
        return name[: -len(".scale")] + ".weight"
    return None


def _scaled_shape(reader: CheckpointReader, name: str, scale: str, block) -> tuple | str:
    """The dequantised shape of `name`, or the problem with it or its scale."""
    dt = reader.dtype(name)
    grid = quant.scale_block(dt, block)
    if grid is None:
        return f"{name}: has {scale} but its dtype {dt} is not a quantised format"
    if reader.dtype(scale) not in quant.SCALE_DTYPES:
        return f"{scale}: scale dtype {reader.dtype(scale)} is not float32/bf16/fp16 or E8M0 (float8_e8m0fnu/uint8)"
    logical = quant.logical_shape(dt, reader.shape(name))
    kind = "FP8" if dt == torch.float8_e4m3fn else "FP4"
    try:
        quant._check_grid(logical, tuple(reader.shape(scale)), grid, scale, kind)
    except ValueError as e:
        return f"{e}; weight {name}"
    return logical


def _plan(reader: CheckpointReader, block, dtype: torch.dtype) -> list[tuple[str, str | None, torch.dtype, int]]:
    """Validate every disk tensor from the headers alone; -> [(name, scale name or None, out dtype, out nbytes)].

    All problems (FP8 weight without scale, scale without weight, wrong scale grid or dtype) go into one error.
    """
    scale_of, problems = pair_scales(reader.keys(), _weight_of_scale)
    plan = []
    for name in reader.keys():
        if _weight_of_scale(name) is not None:
            continue
        dt, scale = reader.dtype(name), scale_of.get(name)
        if scale is not None:
            logical, out = _scaled_shape(reader, name, scale, block), dtype
            if isinstance(logical, str):
                problems.append(logical)
                continue
        elif dt in _UNSCALED_FLOAT8:
            problems.append(f"{name}: {dt} weight without its {name}{SCALE_SUFFIX}")
            continue
        elif not dt.is_floating_point:
            out, logical = dt, reader.shape(name)  # integer / bool tensors are copied unchanged
        else:  # the router's selection bias stays float32, as HF and dsalite load it
            out, logical = (torch.float32 if name.endswith(_FP32_NAMES) else dtype), reader.shape(name)
        plan.append((name, scale, out, math.prod(logical) * out.itemsize))
    if problems:
        raise CheckpointError(f"{reader.path}: cannot convert:\n" + "\n".join(problems))
    return plan


def _convert_config(raw: dict, dtype: torch.dtype) -> dict:
    d = dict(raw)
    d.pop("quantization_config", None)
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in d:
            d[key] = name
    if "dtype" not in d and "torch_dtype" not in d:
        d["dtype"] = name
    return d


def _fp8_block(raw: dict, src: str) -> tuple[int, int]:
    """The FP8 block from `quantization_config` (default 128×128); only block-scaled 'fp8' is understood."""
    qc = raw.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise CheckpointError(f"{src}/config.json: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method", "fp8")
    if method != "fp8":
        raise CheckpointError(f"{src}/config.json: quantization_config.quant_method={method!r} is not supported "
                              "(only block-scaled 'fp8')")
    try:
        block = block_size(raw) or quant.DEFAULT_FP8_BLOCK
        return quant._normalise_block(block, "quantization_config.weight_block_size")
    except ValueError as e:
        raise CheckpointError(f"{src}/config.json: {e}") from None


def _paths(src: str, dst: str) -> tuple[str, str]:
    src = os.path.abspath(os.fspath(src))
    dst = os.path.abspath(os.fspath(dst)).rstrip(os.sep)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a checkpoint directory")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_src.startswith(real_dst + os.sep):
        raise CheckpointError(f"{dst}: would replace the source checkpoint {src}; choose another output directory")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"{dst}: exists and is not a directory; refusing to replace it")
    return src, dst


def convert(src: str, dst: str, *, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30) -> None:
    """Dequantise an FP8 (or FP4) block-scaled HF checkpoint into a plain HF checkpoint, streaming shard by shard.

    Every `X.weight` with an `X.weight_scale_inv` is dequantised (block from `quantization_config.weight_block_size`,
    default 128×128, ragged last blocks allowed) and cast to `dtype`; the scales are dropped; other float tensors are
    cast to `dtype` except `e_score_correction_bias` (float32); integer tensors are copied unchanged. At most one
    output shard of tensors is held in memory. The output (shards + index, config.json without `quantization_config`
    and with `dtype` updated, tokenizer and generation files, remote-code `*.py`) is written atomically
    (`io.atomic_dir`): on failure `dst` is as it was.
    """
    if dtype not in _OUT_DTYPES:
        raise CheckpointError(f"convert: dtype must be float32, bfloat16 or float16, got {dtype}")
    src, dst = _paths(src, dst)
    raw = read_config(src)
    block = _fp8_block(raw, src)
    with CheckpointReader(src) as reader:
        order = {f: i for i, f in enumerate(sorted({reader.file(k) for k in reader.keys()}))}
        plan = sorted(_plan(reader, block, dtype), key=lambda p: (order[reader.file(p[0])], p[0]))
        items = [(name, lambda n=name, s=scale, o=out: read_dequantised(reader, n, s, block, o), nbytes)
                 for name, scale, out, nbytes in plan]
        shards, names = plan_shards(items, lambda item: item[2], max_shard_bytes)
        side = [f for f in sorted(os.listdir(src)) if f in _SIDE_FILES or f.endswith(".py")]
        with atomic_dir(dst) as tmp:
            write_json(os.path.join(tmp, CONFIG_NAME), _convert_config(raw, dtype))
            write_shards(tmp, shards, names, "converting")
            for fname in side:
                if os.path.isfile(os.path.join(src, fname)):
                    shutil.copyfile(os.path.join(src, fname), os.path.join(tmp, fname))
