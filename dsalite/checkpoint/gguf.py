"""GGUF export that llama.cpp runs (glm-dsa, deepseek32, deepseek2, deepseek4; MTP kept) and GGUF import into dsalite.

Export writes the metadata keys, tensor names, tensor types and tokenizer that llama.cpp's own converter
(`convert_hf_to_gguf.py` in the llama.cpp vendored by llama-cpp-python 0.3.36) writes for these architectures, plus
the MTP/NextN block that its DeepSeek converter drops (appended as block L, in the layout llama.cpp loads for GLM).
DeepSeek-V4 (`deepseek4`) specifics, including its separate MTP draft file, live in `families/deepseek_v4/gguf.py`.
Names live in `gguf_table.py`. Tensors are streamed: each is produced, quantised and written in turn into a temporary
file that is renamed into place only when complete (`io.atomic_file`). Import reads the metadata back into a
`ModelConfig`, dequantises every tensor (F16/BF16/Q8_0, and MXFP4 from llama.cpp's DeepSeek-V4 converter) and builds
the normal `Transformer`.

Shapes below are PyTorch order (ggml's are reversed). H heads, n/v nope/value head dims, r kv_lora_rank, E experts,
I expert width, D hidden.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dsalite.checkpoint.io import CheckpointError, atomic_file, progress, read_chat_template, read_config
from dsalite.checkpoint import gguf_table as T
from dsalite.config import ModelConfig
from dsalite.families import family
from dsalite.model import Transformer

DTYPES = tuple(T.FILE_TYPE)


class GGUFError(CheckpointError):
    """A model cannot be exported to GGUF, or a GGUF file cannot be imported; the message names the reason."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("GGUF support needs the `gguf` package: pip install 'dsalite[gguf]'") from None
    return gguf


# =========================================================================== what llama.cpp can run


def check_exportable(cfg: ModelConfig, dtype: str, mtp: bool = True) -> None:
    """Every reason llama.cpp could not load or faithfully run this model (with its MTP layer), in one error."""
    problems = []
    if dtype not in DTYPES:
        problems.append(f"dtype={dtype!r} is not supported (expected one of {', '.join(DTYPES)})")
    if cfg.model_type not in T.ARCH:
        problems.append(f"model_type={cfg.model_type!r} has no GGUF architecture (supported: {', '.join(T.ARCH)})")
    elif family(cfg.model_type).gguf is not None:
        problems += family(cfg.model_type).gguf.problems(cfg, mtp)
    else:
        problems += _mla_problems(cfg)
    if problems:
        raise GGUFError("cannot export to GGUF:\n  " + "\n  ".join(problems))


def _mla_problems(cfg: ModelConfig) -> list[str]:
    """What llama.cpp's MLA graphs (glm-dsa, deepseek32, deepseek2) cannot run."""
    problems = []
    if cfg.attention_bias:
        problems.append("attention_bias=true: llama.cpp's MLA graph has no attention biases")
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r}: llama.cpp runs these architectures with SiLU only")
    n_dense = _leading_dense(cfg)
    if any(t == "dense" for t in cfg.mlp_types[n_dense:]):
        problems.append(
            f"mlp_layer_types={cfg.mlp_types}: llama.cpp only has leading dense layers "
            "(leading_dense_block_count), not dense layers after an MoE layer"
        )
    if not cfg.rope_interleave:
        problems.append("rope_interleave=false: llama.cpp's deepseek2 graph rotates interleaved pairs only")
    if cfg.has_indexer and cfg.index_head_dim % 64:
        problems.append(
            f"index_head_dim={cfg.index_head_dim} is not a multiple of 64: llama.cpp rotates indexer keys with a "
            "Hadamard transform of size >= 64 and aborts on other sizes"
        )
    if cfg.model_type == "glm_moe_dsa" and cfg.indexer_types and cfg.indexer_types[0] != "full":
        problems.append("indexer_types[0] is 'shared': llama.cpp needs a full indexer layer before any shared one")
    if cfg.q_lora_rank is None and cfg.num_hidden_layers not in (26, 27):
        problems.append(
            f"q_lora_rank=null with num_hidden_layers={cfg.num_hidden_layers}: llama.cpp's deepseek2 loader only "
            "accepts a plain q_proj for the 26/27-layer 'lite' models"
        )
    if cfg.rope.get("rope_type", "default") == "yarn":
        from dsalite.layers.rope import inv_freq_and_scale

        _, hf_rope = inv_freq_and_scale(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings)
        hf_kq = math.sqrt(cfg.softmax_scale * math.sqrt(cfg.qk_head_dim))  # softmax scale = hf_kq² / sqrt(d)
        ll_rope, ll_kq = llama_yarn_scales(T.ARCH[cfg.model_type], cfg.rope, cfg.max_position_embeddings)
        if abs(ll_rope / hf_rope - 1) > 1e-6 or abs(ll_kq / hf_kq - 1) > 1e-6:
            problems.append(
                f"yarn rope parameters {cfg.rope}: llama.cpp's {T.ARCH[cfg.model_type]} graph would scale the rope "
                f"part by {ll_rope:.6g} (transformers: {hf_rope:.6g}) and the softmax by {ll_kq:.6g}² "
                f"(transformers: {hf_kq:.6g}²): " + _YARN_LIMITS[T.ARCH[cfg.model_type]]
            )
    return problems


_YARN_LIMITS = {
    "glm-dsa": "its glm-dsa loader ignores rope.scaling.yarn_log_multiplier",
    "deepseek32": "it assumes mscale = 1",
    "deepseek2": "it assumes mscale = mscale_all_dim",
}


def llama_yarn_scales(arch: str, rope: dict, max_pos: int) -> tuple[float, float]:
    """(cos/sin multiplier, extra softmax multiplier m with scale m²/sqrt(d)) that llama.cpp derives from our keys.

    Mirrors llama-context.cpp (yarn_attn_factor from yarn_log_multiplier, with mscale assumed 1, or equal to
    mscale_all_dim for deepseek2) and the MLA graphs (kq_scale = (attn_factor · g(log_mul))² / sqrt(d)); glm-dsa's
    loader does not read yarn_log_multiplier. g(s) = 1 + 0.1·s·ln(factor).
    """
    factor = rope.get("factor") or max_pos / rope["original_max_position_embeddings"]
    g = lambda s: 1.0 if factor <= 1 else 0.1 * s * math.log(factor) + 1.0  # noqa: E731
    msad = rope.get("mscale_all_dim")
    log_mul = float(msad) if msad is not None and arch != "glm-dsa" else 0.0
    if log_mul:
        mscale = log_mul if arch == "deepseek2" and log_mul != 1.0 else 1.0
        attn_factor = g(mscale) / g(log_mul)
    else:
        attn_factor = g(1.0)
    attn_factor /= 1.0 + 0.1 * math.log(factor)  # cancelled again in the graph: attn_org below
    attn_org = attn_factor * (1.0 + 0.1 * math.log(factor))
    return attn_org, attn_org * g(log_mul)


def yarn_keys(rope: dict, factor: float, attn_factor: float | None = None) -> list[tuple[str, object, str]]:
    """The yarn rope keys in the converter's order (V4 adds its attention factor before the betas)."""
    kv = [
        ("rope_scaling_type", "yarn", "STRING"),
        ("rope_scaling_factor", float(factor), "FLOAT32"),
        ("rope_scaling_orig_ctx", int(rope["original_max_position_embeddings"]), "UINT32"),
    ]
    if attn_factor is not None:
        kv.append(("rope_yarn_attn_factor", float(attn_factor), "FLOAT32"))
    return kv + [(f"rope_yarn_{k}", float(rope[k]), "FLOAT32") for k in ("beta_fast", "beta_slow")
                 if rope.get(k) is not None]


def _leading_dense(cfg: ModelConfig) -> int:
    return next((i for i, t in enumerate(cfg.mlp_types) if t != "dense"), cfg.num_hidden_layers)


# =========================================================================== metadata


def model_metadata(cfg: ModelConfig, dtype: str, mtp: bool) -> list[tuple[str, object, str]]:
    """(key, value, gguf value type) in the order llama.cpp's converter adds them (general.name & co. aside)."""
    a = T.ARCH[cfg.model_type]
    u, f, b = "UINT32", "FLOAT32", "BOOL"
    n_mtp = cfg.num_nextn_predict_layers if mtp else 0
    kv = [
        ("type", "model", "STRING"),
        ("block_count", cfg.num_hidden_layers + n_mtp, u),
        ("context_length", cfg.max_position_embeddings, u),
        ("embedding_length", cfg.hidden_size, u),
        ("feed_forward_length", cfg.intermediate_size, u),
        ("head_count", cfg.num_attention_heads, u),
        ("head_count_kv", 1, u),  # absorbed MLA is MQA over the latent
    ]
    rope = cfg.rope
    if rope.get("rope_type", "default") == "yarn":
        factor = rope.get("factor") or cfg.max_position_embeddings / rope["original_max_position_embeddings"]
        kv += yarn_keys(rope, factor)
    kv += [
        ("rope_freq_base", float(rope["rope_theta"]), f),
        ("layer_norm_rms_epsilon", cfg.rms_norm_eps, f),
        ("expert_count", cfg.n_routed_experts, u),
        ("expert_used_count", cfg.num_experts_per_tok, u),
        ("expert_group_count", cfg.n_group, u),
        ("expert_group_used_count", cfg.topk_group, u),
        ("expert_gating_func", T.GATING_SIGMOID, u),
        ("file_type", T.FILE_TYPE[dtype], u),
        ("leading_dense_block_count", _leading_dense(cfg), u),
        ("vocab_size", cfg.vocab_size, u),
    ]
    if cfg.q_lora_rank is not None:
        kv.append(("q_lora_rank", cfg.q_lora_rank, u))
    kv += [
        ("kv_lora_rank", cfg.kv_lora_rank, u),
        ("key_length", cfg.kv_lora_rank + cfg.qk_rope_head_dim, u),
        ("value_length", cfg.kv_lora_rank, u),
        ("key_length_mla", cfg.qk_head_dim, u),
        ("value_length_mla", cfg.v_head_dim, u),
        ("expert_feed_forward_length", cfg.moe_intermediate_size, u),
        ("expert_shared_count", cfg.n_shared_experts, u),
        ("expert_weights_scale", cfg.routed_scaling_factor, f),
    ]
    if cfg.norm_topk_prob:
        kv.append(("expert_weights_norm", True, b))
    kv.append(("rope_dimension_count", cfg.qk_rope_head_dim, u))
    if rope.get("rope_type", "default") == "yarn" and rope.get("mscale_all_dim") is not None:
        kv.append(("rope_yarn_log_mul", 0.1 * float(rope["mscale_all_dim"]), f))  # llama.cpp divides by 0.1 again
    if n_mtp:
        kv.append(("nextn_predict_layers", n_mtp, u))
    if cfg.has_indexer:
        kv += [
            ("indexer_head_count", cfg.index_n_heads, u),
            ("indexer_key_length", cfg.index_head_dim, u),
            ("indexer_top_k", cfg.index_topk, u),
        ]
    if cfg.model_type == "glm_moe_dsa":
        kv.append(("indexer_types", [t == "full" for t in cfg.indexer_types[: cfg.num_hidden_layers]], "ARRAY"))
    kv.append(("quantization_version", T.QUANTIZATION_VERSION, u))
    return [(T.K[k].format(a=a), v, t) for k, v, t in kv]


# =========================================================================== tokenizer


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GGUFError(f"{path}: cannot read ({e})") from None


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or (tok.startswith("<｜") and tok.endswith("｜>"))


def tokenizer_metadata(tok_dir: str, cfg: ModelConfig, pre: str = "auto") -> list[tuple[str, object, str]]:
    """Byte-level BPE vocabulary, merges, token types, special ids and chat template from a `tokenizer.json` folder."""
    path = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: not found; llama.cpp needs the tokenizer (--tokenizer DIR holding tokenizer.json)")
    tj = _read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise GGUFError(f"{path}: model.type={model.get('type')!r}; only byte-level BPE tokenizers can be exported")
    V = cfg.vocab_size
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = a["content"]
    too_big = sorted(i for i in by_id if i >= V)
    if too_big:
        raise GGUFError(f"{path}: token id {too_big[0]} is outside the model's vocab_size={V}")
    tokens, types = [], []
    for i in range(V):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(T.CONTROL if added[i].get("special") or _looks_special(by_id[i]) else T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if pre == "auto":
        pre = _detect_pre(tj, cfg)
    kv = [
        (T.K["tok_model"], "gpt2", "STRING"),
        (T.K["tok_pre"], pre, "STRING"),
        (T.K["tok_tokens"], tokens, "ARRAY"),
        (T.K["tok_types"], types, "ARRAY"),
        (T.K["tok_merges"], merges, "ARRAY"),
    ]
    kv += _special_tokens(tok_dir, tj, cfg, tokens)
    return kv


def _detect_pre(tj: dict, cfg: ModelConfig) -> str:
    """A plain ByteLevel pre-tokenizer is GPT-2's regex; anything else is taken to be the family's released one."""
    pt = tj.get("pre_tokenizer") or {}
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True):
        return "gpt-2"
    return T.FAMILY_PRE[cfg.model_type]


def _special_tokens(tok_dir: str, tj: dict, cfg: ModelConfig, tokens: list[str]) -> list[tuple[str, object, str]]:
    tc_path = os.path.join(tok_dir, "tokenizer_config.json")
    tc = _read_json(tc_path) if os.path.isfile(tc_path) else {}
    ids = {t: i for i, t in enumerate(tokens)}
    roles: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        v = tc.get(f"{role}_token")
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str) and v in ids:
            roles[role] = ids[v]
    for role in ("bos", "eos", "pad"):
        v = getattr(cfg, f"{role}_token_id")
        v = v[0] if isinstance(v, list) and v else v
        if role not in roles and isinstance(v, int) and 0 <= v < len(tokens):
            roles[role] = v
    if cfg.model_type == "glm_moe_dsa":
        roles.update({role: ids[t] for role, t in T.GLM_SPECIAL.items() if t in ids})
    kv: list = [(T.SPECIAL_KEYS[r], i, "UINT32") for r, i in roles.items()]
    for flag in ("bos", "eos"):
        if isinstance(tc.get(f"add_{flag}_token"), bool):
            kv.append((T.K[f"add_{flag}"], tc[f"add_{flag}_token"], "BOOL"))
    template = read_chat_template(tok_dir, tc)
    if template is not None:
        kv.append((T.K["chat_template"], template, "STRING"))
    return kv


# =========================================================================== tensors


def _layer_prefix(cfg: ModelConfig, name: str) -> tuple[int, str] | None:
    """dsalite name -> (GGUF block index, suffix) for block tensors; None for global ones."""
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name) or re.match(r"^mtp\.(\d+)\.(.+)$", name)
    if not m:
        return None
    i = int(m.group(1)) + (cfg.num_hidden_layers if name.startswith("mtp.") else 0)
    return i, m.group(2)


def _gguf_type(gname: str, shape: tuple[int, ...], dtype: str, keep_f32: tuple[str, ...] = T.KEEP_F32) -> str:
    """The GGML type llama.cpp's converter gives this tensor: norms, 1-D, biases, router and indexer head weights (and
    `keep_f32`) stay F32; Q8_0 falls back to F16 when a row is not a whole number of 32-element blocks."""
    if len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight") or gname.endswith(keep_f32):
        return "F32"
    q = T.GGML_TYPE[dtype]
    if q == "Q8_0" and shape[-1] % 32:
        return "F16"
    return q


def tensor_plan(model: Transformer, dtype: str, mtp: bool = True) -> list[tuple[str, tuple, str, Callable]]:
    """[(GGUF name, shape, GGML type, producer of a float32 numpy array)] for every tensor of the model."""
    cfg = model.cfg
    H, n = cfg.num_attention_heads, cfg.qk_nope_head_dim
    plan = []

    def add(gname, t: torch.Tensor, fn=lambda x: x):
        shape = tuple(fn(t.detach()).shape)  # views only: nothing is copied here
        plan.append((gname, shape, _gguf_type(gname, shape, dtype), lambda t=t, fn=fn: _np(fn(t.detach()))))

    for name, t in model.state_dict().items():
        if name in T.GLOBAL:
            add(T.GLOBAL[name], t)
            continue
        loc = _layer_prefix(cfg, name)
        if loc is None:
            raise GGUFError(f"{name}: no GGUF name for this tensor")
        i, suffix = loc
        if i >= cfg.num_hidden_layers and not mtp:
            continue
        if suffix in T.BLOCK:
            add(T.block_name(suffix, i), t)
        elif suffix == "self_attn.kv_b_proj.weight":  # [H*(n+v), r] -> k_b [H, r, n], v_b [H, v, r]
            k_name, v_name = T.SPLIT[suffix]
            add(f"blk.{i}.{k_name}", t, lambda x: x.view(H, -1, x.shape[-1])[:, :n].transpose(1, 2))
            add(f"blk.{i}.{v_name}", t, lambda x: x.view(H, -1, x.shape[-1])[:, n:])
        elif suffix == "mlp.experts.gate_up_proj":  # [E, 2I, D] -> gate, up [E, I, D]
            g_name, u_name = T.SPLIT[suffix]
            add(f"blk.{i}.{g_name}", t, lambda x: x.chunk(2, dim=1)[0])
            add(f"blk.{i}.{u_name}", t, lambda x: x.chunk(2, dim=1)[1])
        else:
            raise GGUFError(f"{name}: no GGUF name for this tensor")
    return plan


def _np(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).contiguous().cpu().numpy()


# =========================================================================== export


def export(
    model: Transformer,
    out: str,
    dtype: str = "f32",
    *,
    tokenizer: str | None,
    pre: str = "auto",
    name: str | None = None,
    card_dir: str | None = None,
    mtp: bool = True,
) -> dict:
    """Write `model` as a GGUF file llama.cpp loads; returns {"tensors": n, "bytes": size, "types": {type: count}},
    plus "mtp": the same for the MTP draft file and its "path" when DeepSeek-V4 writes one.

    tokenizer: a folder holding `tokenizer.json` (and optionally tokenizer_config.json / chat_template.jinja).
    general.name / size_label / license & co. come from the model card in `card_dir` (a checkpoint folder) as
    llama.cpp's converter derives them, else from `name` (default: the file name). mtp=False leaves the MTP block
    out (what llama.cpp's `--no-mtp` does). DeepSeek-V4's MTP layer goes to a second file, `mtp-<name>` beside `out`
    (llama.cpp's `--mtp` layout, see `families/deepseek_v4/gguf.py`). Each file is written under a temporary name
    beside it (`io.atomic_file`) and all are renamed into place once all are complete; on failure nothing is left.
    """
    _gguf()  # a missing package fails before any work
    cfg = model.cfg
    check_exportable(cfg, dtype, mtp)
    out = os.path.abspath(os.fspath(out))
    if os.path.isdir(out):
        raise GGUFError(f"{out}: is a directory; give the path of the .gguf file to write")
    if tokenizer is None:
        raise GGUFError("tokenizer: a folder with tokenizer.json is required (llama.cpp cannot load a GGUF without)")
    tok = tokenizer_metadata(tokenizer, cfg, pre)
    own = family(cfg.model_type).gguf
    if own is not None:  # V4: the MTP layer goes to a draft file of its own
        files = [(out, own.metadata(cfg, dtype, 0) + tok, own.tensor_plan(model, dtype, mtp=False))]
        if mtp and cfg.num_nextn_predict_layers:
            files.append((own.mtp_path(out), own.metadata(cfg, dtype, cfg.num_nextn_predict_layers) + tok,
                          own.tensor_plan(model, dtype, mtp=True)))
    else:
        files = [(out, model_metadata(cfg, dtype, mtp) + tok, tensor_plan(model, dtype, mtp))]
    name = name or os.path.splitext(os.path.basename(out))[0]

    bar = progress(sum(len(plan) for _, _, plan in files), "export-gguf")
    try:
        with contextlib.ExitStack() as stack:  # every file renamed into place only once all are written
            temps = [stack.enter_context(atomic_file(path)) for path, _, _ in files]
            infos = [_write(tmp, T.ARCH[cfg.model_type], kv, plan, card_dir, name, bar)
                     for tmp, (_, kv, plan) in zip(temps, files)]
    finally:
        bar.close()
    info = infos[0]
    if len(infos) > 1:
        info["mtp"] = dict(infos[1], path=files[1][0])
    return info


def _write(part: str, arch: str, kv: list, plan: list, card_dir: str | None, name: str, bar) -> dict:
    """One GGUF file: metadata, tensor infos, then each tensor produced, quantised and written in turn."""
    gguf = _gguf()
    w = gguf.GGUFWriter(None, arch)
    for key, value, vtype in kv:
        if vtype == "ARRAY":
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, getattr(gguf.GGUFValueType, vtype))
    types: dict[str, int] = {}
    for gname, shape, qtype, _ in plan:
        qt = gguf.GGMLQuantizationType[qtype]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        nbytes = math.prod(shape) // block * size
        w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)  # logical shape, not bytes
        types[qtype] = types.get(qtype, 0) + 1
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, Path(card_dir) if card_dir else None, None, total)
    meta.name = meta.name or name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    meta.set_gguf_meta_model(w)
    try:
        w.write_header_to_file(path=part)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, shape, qtype, produce in plan:
            a = produce()
            if a.shape != shape:
                raise GGUFError(f"{gname}: produced shape {a.shape}, planned {shape}")
            w.write_tensor_data(a if qtype == "I32" else gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype]))
            bar.update(1)
    finally:
        w.close()
    return {"tensors": len(plan), "bytes": os.path.getsize(part), "types": types}


def export_checkpoint(path: str, out: str, dtype: str = "f32", *, tokenizer: str | None = None, pre: str = "auto",
                      mtp: bool = True) -> dict:
    """Export an HF checkpoint directory (FP8 dequantised on the way); the tokenizer defaults to the checkpoint's.

    The config is checked before any weight is read. The model is then held in memory in its stored dtype; tensors
    are converted and written one at a time.
    """
    from dsalite.checkpoint.pretrained import from_pretrained

    raw = read_config(path)
    # before reading any weights; whether MTP weights exist is known only once they are read (HF drops them)
    check_exportable(ModelConfig.from_hf(raw), dtype, mtp=False)
    model = from_pretrained(path, dtype=None)
    return export(model, out, dtype, tokenizer=tokenizer or path, pre=pre, card_dir=path, mtp=mtp)


# =========================================================================== import


def _open(path: str):
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: GGUF file not found")
    try:
        return _gguf().GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def _fields(reader) -> dict[str, object]:
    return {k: f.contents() for k, f in reader.fields.items()}


def config_from_metadata(md: dict, path: str = "GGUF") -> dict:
    """The HF config dict a GGUF's metadata describes (only what llama.cpp's keys carry)."""
    arch = md.get("general.architecture")
    if arch not in T.MODEL_TYPE:
        raise GGUFError(f"{path}: architecture {arch!r} is not one dsalite imports ({', '.join(T.MODEL_TYPE)})")
    k = {name: key.format(a=arch) for name, key in T.K.items()}

    def get(name, default=None, required=True):
        if k[name] in md:
            return md[k[name]]
        if required and default is None:
            raise GGUFError(f"{path}: metadata key {k[name]!r} is missing")
        return default

    mt = T.MODEL_TYPE[arch]
    own = family(mt).gguf
    if own is not None:
        return own.config_from_metadata(md, get, path)
    n_mtp = get("nextn_predict_layers", 0)
    L = get("block_count") - n_mtp
    rope_dim = get("rope_dimension_count")
    rope = {"rope_type": "default", "rope_theta": float(get("rope_freq_base"))}
    if get("rope_scaling_type", "none", required=False) == "yarn":
        ms = get("rope_yarn_log_mul", None, required=False)
        rope.update(rope_type="yarn", factor=float(get("rope_scaling_factor")),
                    original_max_position_embeddings=int(get("rope_scaling_orig_ctx")))
        for b in ("beta_fast", "beta_slow"):
            if k[f"rope_yarn_{b}"] in md:
                rope[b] = float(md[k[f"rope_yarn_{b}"]])
        if ms is not None:  # export refuses mscale != mscale_all_dim, so one value stands for both
            rope["mscale"] = rope["mscale_all_dim"] = float(ms) / 0.1
    n_dense = get("leading_dense_block_count", 0)
    d = dict(
        model_type=mt, vocab_size=get("vocab_size", len(md.get(T.K["tok_tokens"]) or []) or None),
        hidden_size=get("embedding_length"), intermediate_size=get("feed_forward_length"),
        moe_intermediate_size=get("expert_feed_forward_length"), num_hidden_layers=L,
        num_attention_heads=get("head_count"), q_lora_rank=get("q_lora_rank", None, required=False),
        kv_lora_rank=get("kv_lora_rank"), qk_nope_head_dim=get("key_length_mla") - rope_dim,
        qk_rope_head_dim=rope_dim, v_head_dim=get("value_length_mla"), n_routed_experts=get("expert_count"),
        n_shared_experts=get("expert_shared_count"), num_experts_per_tok=get("expert_used_count"),
        n_group=get("expert_group_count", 1), topk_group=get("expert_group_used_count", 1),
        routed_scaling_factor=float(get("expert_weights_scale", 1.0)),
        norm_topk_prob=bool(get("expert_weights_norm", False, required=False)),
        rms_norm_eps=float(get("layer_norm_rms_epsilon")), max_position_embeddings=get("context_length"),
        rope_parameters=rope, num_nextn_predict_layers=n_mtp, first_k_dense_replace=n_dense,
        bos_token_id=md.get(T.SPECIAL_KEYS["bos"]), eos_token_id=md.get(T.SPECIAL_KEYS["eos"]),
        pad_token_id=md.get(T.SPECIAL_KEYS["pad"]),
    )
    if mt != "deepseek_v3":
        d.update(index_n_heads=get("indexer_head_count"), index_head_dim=get("indexer_key_length"),
                 index_topk=get("indexer_top_k"))
        d["mlp_layer_types"] = ["dense"] * n_dense + ["sparse"] * (L - n_dense)
        if mt == "glm_moe_dsa" and k["indexer_types"] in md:
            d["indexer_types"] = ["full" if x else "shared" for x in md[k["indexer_types"]]]
    return d


def _dsalite_name(gname: str, L: int) -> tuple[str, int | None]:
    """GGUF name -> (dsalite name, part index for split tensors or None)."""
    for ours, theirs in T.GLOBAL.items():
        if gname == theirs:
            return ours, None
    m = re.match(r"^blk\.(\d+)\.(.+)$", gname)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        prefix = f"model.layers.{i}." if i < L else f"mtp.{i - L}."
        for ours, theirs in T.BLOCK.items():
            if rest == theirs:
                return prefix + ours, None
        for ours, parts in T.SPLIT.items():
            if rest in parts:
                return prefix + ours, parts.index(rest)
    raise GGUFError(f"{gname}: not a tensor of the architectures dsalite imports")


def load(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Build a dsalite `Transformer` from a GGUF file written by `export` (or llama.cpp's converter); for
    DeepSeek-V4 with the MTP layer of the `mtp-<name>` draft file beside it, when there is one."""
    gguf = _gguf()
    reader = _open(path)
    md = _fields(reader)
    own = family(T.MODEL_TYPE.get(md.get("general.architecture"), "")).gguf \
        if md.get("general.architecture") in T.MODEL_TYPE else None
    if own is not None:
        return own.load(path, reader, md, dtype, device)
    cfg = ModelConfig.from_hf(config_from_metadata(md, path))
    L = cfg.num_hidden_layers
    parts: dict[str, dict[int | None, np.ndarray]] = {}
    for t in reader.tensors:
        name, part = _dsalite_name(t.name, L)
        parts.setdefault(name, {})[part] = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    own = cfg.num_nextn_predict_layers == 0 or all(
        f"mtp.{k}.{s}" in parts for k in range(cfg.num_nextn_predict_layers)
        for s in ("embed_tokens.weight", "shared_head.head.weight")
    )
    with torch.device("meta"):
        model = Transformer(cfg, mtp_own_embeddings=own)
    expected = model.state_dict()
    problems = [f"{n}: unexpected tensor (built from {path})" for n in parts if n not in expected]
    problems += [f"{n}: missing from {path}" for n in expected if n not in parts]
    sd = {}
    for name, want in expected.items():
        if name not in parts:
            continue
        p = parts[name]
        split = next((g for s, g in T.SPLIT.items() if name.endswith(s)), None)
        if split and None not in p and len(p) != 2:
            problems.append(f"{name}: missing {' and '.join(g for j, g in enumerate(split) if j not in p)} in {path}")
            continue
        if None in p:
            t = torch.from_numpy(p[None])
        elif name.endswith("kv_b_proj.weight"):  # k_b [H, r, n], v_b [H, v, r] -> [H*(n+v), r]
            k_b, v_b = torch.from_numpy(p[0]), torch.from_numpy(p[1])
            t = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])
        else:  # gate, up [E, I, D] -> [E, 2I, D]
            t = torch.cat([torch.from_numpy(p[0]), torch.from_numpy(p[1])], dim=1)
        if tuple(t.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {list(t.shape)} in {path}, expected {list(want.shape)}")
            continue
        target = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        sd[name] = t.to(target).clone()
    if problems:
        raise GGUFError(f"{path}: GGUF does not match the model its metadata describes:\n  " + "\n  ".join(problems))
    model.load_state_dict(sd, assign=True, strict=True)
    return model.to(device).eval()
