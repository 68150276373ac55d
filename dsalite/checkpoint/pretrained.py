"""`from_pretrained` / `save_pretrained`: an HF checkpoint directory ↔ a dsalite Transformer; `convert`: FP8 → plain.

The model is built on the meta device and its tensors are assigned once from the checkpoint (no double init).
Name mapping, FP8 dequantisation and strict validation live in `checkpoint/hf.py`; this file only decides which
tensors the model expects (MTP present or not, MTP embeddings/head own or shared) and hands them over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import types

import torch

from dsalite.checkpoint import hf, v4
from dsalite.config import ModelConfig
from dsalite.model import Transformer, build_model

log = logging.getLogger("dsalite")


def build_for_checkpoint(path: str) -> tuple[ModelConfig, "hf.CheckpointReader", bool]:
    """Config adjusted to what the files hold: (cfg, reader, mtp_own_embeddings)."""
    cfg = ModelConfig.from_hf(hf.read_config(path))
    reader = hf.CheckpointReader(path)
    own = True
    if cfg.num_nextn_predict_layers:
        state = hf.detect_mtp(reader, cfg)
        if state == "absent":
            log.warning(
                "%s declares num_nextn_predict_layers=%d but holds no MTP weights (transformers drops them on save); "
                "loading without the MTP layer", path, cfg.num_nextn_predict_layers,
            )
            cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0, indexer_types=cfg.indexer_types[: cfg.num_hidden_layers])
        elif state == "partial":
            missing = hf.missing_mtp_keys(reader, cfg)
            L = cfg.num_hidden_layers
            if f"model.layers.{L}.enorm.weight" not in reader and f"model.layers.{L}.input_layernorm.weight" in reader:
                raise hf.CheckpointError(
                    f"{path}: config.json says num_hidden_layers={L}, but model.layers.{L} holds a decoder block "
                    "without the MTP tensors (enorm, hnorm, eh_proj): num_hidden_layers does not match the weights"
                )
            raise hf.CheckpointError(
                f"{path}: the MTP layer is only partly present; missing tensors:\n  " + "\n  ".join(missing)
            )
        else:
            present = hf.optional_mtp_keys(reader, cfg)
            own = all(present.values()) if present else True
    return cfg, reader, own


def from_pretrained(path: str, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Load an HF-layout checkpoint directory (single or sharded safetensors, plain or FP8 block-quantised).

    dtype=None keeps every tensor's stored dtype (used for byte-exact round trips); FP8 weights are then
    dequantised to float32.
    """
    cfg = ModelConfig.from_hf(hf.read_config(path))
    if cfg.model_type in v4.FAMILIES:
        return v4.from_pretrained(path, cfg, dtype, device)
    cfg, reader, own = build_for_checkpoint(path)
    with torch.device("meta"):
        model = build_model(cfg, mtp_own_embeddings=own)
    expected = {}
    for name, t in model.state_dict().items():
        want = torch.float32 if name.endswith("e_score_correction_bias") and dtype is not None else dtype
        expected[name] = (t.shape, want)
    sd = hf.load_state_dict(reader, cfg, expected, dtype=dtype)
    model.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        pass  # the head reads embed_tokens.weight directly
    return model.to(device).eval()


def save_pretrained(model: Transformer, path: str, **kwargs) -> None:
    """Write HF layout (per-expert tensors, MTP as model.layers.{L+k}) atomically: temp dir, then rename."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if model.cfg.model_type in v4.FAMILIES:  # layout="hf" (default) or "original" (DeepSeek's names)
        return v4.save(path, model.cfg, sd, **kwargs)
    hf.save_state_dict(path, model.cfg, sd, **kwargs)


# =========================================================================== convert

# Files of a checkpoint directory that are not tensors but belong with it (copied verbatim when present).
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "tokenizer.model",
)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_UNSCALED_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu)  # meaningless without a scale


def _convert_plan(reader: "hf.CheckpointReader", block: tuple[int, int], dtype: torch.dtype):
    """Validate every disk tensor from the headers alone; -> [(name, scale name or None, out dtype, out nbytes)].

    All problems (FP8 weight without scale, scale without weight, wrong scale grid or dtype) go into one error.
    """
    from dsalite.checkpoint import quant

    keys = reader.keys()
    present = set(keys)
    problems: list[str] = []
    scale_of: dict[str, str] = {}
    for s in keys:
        w = _weight_of_scale(s)
        if w is not None:
            if w in present:
                scale_of[w] = s
            else:
                problems.append(f"{s}: scale without its weight {w}")
    plan = []
    for name in keys:
        if _weight_of_scale(name) is not None:
            continue
        dt, shape = reader.dtype(name), tuple(reader.shape(name))
        scale = scale_of.get(name)
        if scale is not None:
            sdt, sshape = reader.dtype(scale), tuple(reader.shape(scale))
            if dt == torch.float8_e4m3fn:
                logical, grid, kind = shape, block, "FP8"
            elif dt in hf._FP4_STORAGE and shape:
                logical, grid, kind = shape[:-1] + (2 * shape[-1],), (1, quant.DEFAULT_FP4_GROUP), "FP4"
            else:
                problems.append(f"{name}: has {scale} but its dtype {dt} is not a quantised format")
                continue
            if sdt not in hf._SCALE_DTYPES:
                problems.append(f"{scale}: scale dtype {sdt} is not float32/bf16/fp16 or E8M0 (float8_e8m0fnu/uint8)")
                continue
            try:
                quant._check_grid(logical, sshape, grid, scale, kind)
            except ValueError as e:
                problems.append(f"{e}; weight {name}")
                continue
            out = dtype
        elif dt in _UNSCALED_FLOAT8:
            problems.append(f"{name}: {dt} weight without its {name}{hf.SCALE_SUFFIX}")
            continue
        elif not dt.is_floating_point:
            out, logical = dt, shape  # integer / bool tensors are copied unchanged
        else:
            # the router's selection bias stays float32, as HF and dsalite load it
            out, logical = (torch.float32 if name.endswith(_FP32_NAMES) else dtype), shape
        plan.append((name, scale, out, math.prod(logical) * out.itemsize))
    if problems:
        raise hf.CheckpointError(f"{reader.path}: cannot convert:\n" + "\n".join(problems))
    return plan


# Router selection biases stay float32 (HF `_keep_in_fp32_modules_strict`); `ffn.gate.bias` is V4's original name.
_FP32_NAMES = ("e_score_correction_bias", ".ffn.gate.bias")


def _weight_of_scale(name: str) -> str | None:
    """`X.weight` for a block-scale tensor: HF's `X.weight_scale_inv` or DeepSeek-V4's original `X.scale`."""
    if name.endswith(hf.SCALE_SUFFIX):
        return name[: -len(hf.SCALE_SUFFIX)]
    if name.endswith(".scale"):
        return name[: -len(".scale")] + ".weight"
    return None


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


def convert(src: str, dst: str, *, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30) -> None:
    """Dequantise an FP8 (or FP4) block-scaled HF checkpoint into a plain HF checkpoint, streaming shard by shard.

    Works on disk names (no model is built), so MTP layers and anything else on disk are kept. Every `X.weight`
    with an `X.weight_scale_inv` is dequantised (block from `quantization_config.weight_block_size`, default
    128×128, ragged last blocks allowed) and cast to `dtype`; the scales are dropped; other float tensors are cast
    to `dtype` except `e_score_correction_bias` (float32); integer tensors are copied unchanged. Everything is
    validated from the headers before anything is written. At most one output shard of tensors is held in memory.
    The output (shards + index, config.json without `quantization_config` and with `dtype` updated, tokenizer and
    generation files, remote-code `*.py`) is written into a temporary sibling directory and renamed to `dst` only
    when complete; on failure nothing is left at `dst`.
    """
    from safetensors.torch import save_file

    from dsalite.checkpoint import quant

    if dtype not in _OUT_DTYPES:
        raise hf.CheckpointError(f"convert: dtype must be float32, bfloat16 or float16, got {dtype}")
    if max_shard_bytes <= 0:
        raise hf.CheckpointError(f"convert: max_shard_bytes must be positive, got {max_shard_bytes}")
    src = os.path.abspath(os.fspath(src))
    dst = os.path.abspath(os.fspath(dst)).rstrip(os.sep)
    if not os.path.isdir(src):
        raise hf.CheckpointError(f"{src}: not a checkpoint directory")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_src.startswith(real_dst + os.sep):
        raise hf.CheckpointError(f"{dst}: would replace the source checkpoint {src}; choose another output directory")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise hf.CheckpointError(f"{dst}: exists and is not a directory; refusing to replace it")

    raw = hf.read_config(src)
    qc = raw.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise hf.CheckpointError(f"{src}/config.json: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method", "fp8")
    if method != "fp8":
        raise hf.CheckpointError(f"{src}/config.json: quantization_config.quant_method={method!r} is not supported "
                                 "(only block-scaled 'fp8')")
    try:
        block = quant._normalise_block(hf._block_size(types.SimpleNamespace(raw=raw)) or quant.DEFAULT_FP8_BLOCK,
                                       "quantization_config.weight_block_size")
    except ValueError as e:
        raise hf.CheckpointError(f"{src}/config.json: {e}") from None

    reader = hf.CheckpointReader(src)
    order = {f: i for i, f in enumerate(sorted({reader.file(k) for k in reader.keys()}))}
    plan = sorted(_convert_plan(reader, block, dtype), key=lambda p: (order[reader.file(p[0])], p[0]))
    config_text = json.dumps(_convert_config(raw, dtype), indent=2)

    shards, names = hf.plan_shards(plan, lambda item: item[3], max_shard_bytes)
    side = [f for f in sorted(os.listdir(src)) if f in _SIDE_FILES or f.endswith(".py")]
    side = [f for f in side if os.path.isfile(os.path.join(src, f))]

    def produce(name: str, scale: str | None, out: torch.dtype) -> torch.Tensor:
        t = reader.get(name)
        if scale is not None:
            try:
                blk = block if t.dtype == torch.float8_e4m3fn else None  # FP4 keeps its 1x32 groups
                t = quant.dequantize(t, reader.get(scale), name=name, block=blk)
            except ValueError as e:
                raise hf.CheckpointError(f"{name}: cannot dequantise ({e})") from None
        return t if t.dtype == out else t.to(out)

    tmp, made = hf._begin_temp(dst)
    bar = hf._progress(len(plan), "converting")
    try:
        written = [hf.CONFIG_NAME]
        with open(os.path.join(tmp, hf.CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(config_text + "\n")
        weight_map, total = {}, 0
        for fname, shard in zip(names, shards):
            tensors = {}
            for name, scale, out, nbytes in shard:
                tensors[name] = produce(name, scale, out)
                total += nbytes
                weight_map[name] = fname
                bar.update(1)
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            written.append(fname)
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(tmp, hf.INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
            written.append(hf.INDEX_NAME)
        for fname in side:
            shutil.copyfile(os.path.join(src, fname), os.path.join(tmp, fname))
            written.append(fname)
        for fname in written:
            hf._fsync(os.path.join(tmp, fname))
        reader.close()
        hf._swap_into_place(tmp, dst)
    except BaseException:
        hf._abandon(tmp, made)
        raise
    finally:
        bar.close()
        reader.close()
