"""DeepSeek-V4 (`deepseek4`) GGUF: what llama.cpp can run, its metadata, the tensor plans, and reading files back.

Mirrors llama.cpp's `DeepseekV4Model` converter (conversion/deepseek.py) and its loader and graph
(src/models/deepseek4.cpp, llama-cpp-python 0.3.36). The main file is the trunk, as the converter writes it by
default. The MTP layer goes to a second, draft-only file `mtp-<name>` beside it, as the converter writes it with
`--mtp`: the same metadata plus `nextn_predict_layers` and block_count L+1, the shared embedding / final norm / head,
the MTP block at blk.L with `nextn.{eh_proj,enorm,hnorm,shared_head_norm}`, and the MTP layer's own hc_head as the root
`output_hc_*` — llama.cpp's MTP graph reads the root hc_head, so one file has no place for a second one.
Names live in `gguf_table.py` (`V4_*`). Shapes are PyTorch order; D hidden, N = hc_mult streams.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from dsalite.checkpoint import gguf as G
from dsalite.checkpoint import gguf_table as T
from dsalite.config import ModelConfig
from dsalite.families.deepseek_v4.checkpoint import FP32_MODULES
from dsalite.model import build_model
from dsalite.presets import CSA, HCA, SLIDING

ARCH = "deepseek4"
RATIO = {CSA: 4, HCA: 128}  # the only compression ratios llama.cpp's deepseek4 graph knows (ratio 4 = CSA + indexer)


def mtp_path(out: str) -> str:
    """Where the MTP draft file of `out` lives: `mtp-<file name>` beside it (llama.cpp's `--mtp` prefix)."""
    return os.path.join(os.path.dirname(out), "mtp-" + os.path.basename(out))


# =========================================================================== what llama.cpp can run


def problems(cfg: ModelConfig, mtp: bool) -> list[str]:
    """Every reason llama.cpp's deepseek4 graph could not load or faithfully run this model (and its MTP layer)."""
    out = []
    L = cfg.num_hidden_layers
    if cfg.hc_mult != 4:
        out.append(f"hc_mult={cfg.hc_mult}: llama.cpp's deepseek4 graph asserts 4 mHC streams")
    used = set(cfg.layer_types[:L])
    for kind, want in RATIO.items():
        if kind in used and cfg.compress_rates[kind] != want:
            out.append(f"compress_rates[{kind!r}]={cfg.compress_rates[kind]}: llama.cpp's deepseek4 graph only knows "
                       f"ratio 4 (CSA with indexer) and 128 (HCA)")
    if CSA in used and cfg.index_head_dim % 64:
        out.append(f"index_head_dim={cfg.index_head_dim} is not a multiple of 64: llama.cpp rotates indexer keys "
                   "with a Hadamard transform of size >= 64")
    n_hash = cfg.mlp_types.count("hash")
    if cfg.mlp_types[:n_hash] != ["hash"] * n_hash:
        out.append(f"mlp_layer_types={cfg.mlp_types}: llama.cpp hash-routes the first hash_layer_count layers only")
    if cfg.rope.get("rope_type", "default") != "default":
        out.append(f"rope_parameters.main={cfg.rope}: llama.cpp rotates sliding-window layers with plain rope")
    if cfg.compress_rope.get("rope_type") == "yarn" and cfg.compress_rope.get("attention_factor", 1.0) != 1.0:
        out.append(f"rope_parameters.compress.attention_factor={cfg.compress_rope['attention_factor']}: "
                   "llama.cpp's deepseek4 graph fixes the yarn attention factor to 1")
    if cfg.hidden_act != "silu":
        out.append(f"hidden_act={cfg.hidden_act!r}: llama.cpp runs deepseek4 with SiLU only")
    if cfg.tie_word_embeddings:
        out.append("tie_word_embeddings=true: llama.cpp's deepseek4 loader needs its own output.weight")
    n_mtp = cfg.num_nextn_predict_layers if mtp else 0
    if n_mtp > 1:
        out.append(f"num_nextn_predict_layers={n_mtp}: llama.cpp's deepseek4 MTP graph runs one block "
                   "(export with mtp=False / --no-mtp)")
    if n_mtp and cfg.layer_types[L] != SLIDING:
        out.append(f"MTP layer type {cfg.layer_types[L]!r}: llama.cpp's deepseek4 MTP graph has sliding-window "
                   "attention only (export with mtp=False / --no-mtp)")
    return out


# =========================================================================== metadata


def compress_ratios(cfg: ModelConfig) -> list[int]:
    """Per layer, MTP layers included (the converter writes the config's whole list): 0, 4 or 128."""
    return [RATIO.get(t, 0) for t in cfg.layer_types]


def metadata(cfg: ModelConfig, dtype: str, n_mtp: int) -> list[tuple[str, object, str]]:
    """(key, value, gguf value type) as the converter writes them; n_mtp > 0 for the MTP draft file."""
    u, f = "UINT32", "FLOAT32"
    n_blocks = cfg.num_hidden_layers + n_mtp
    kv = [
        ("type", "model", "STRING"),
        ("block_count", n_blocks, u),
        ("context_length", cfg.max_position_embeddings, u),
        ("embedding_length", cfg.hidden_size, u),
        ("head_count", cfg.num_attention_heads, u),
        ("head_count_kv", 1, u),
    ]
    rope = cfg.compress_rope  # llama.cpp applies the scaling keys to the compressed (CSA/HCA) layers only
    if rope.get("rope_type") == "yarn":
        kv += G.yarn_keys(rope, rope["factor"], rope.get("attention_factor", 1.0))
    limit = [float(cfg.swiglu_limit)] * n_blocks
    kv += [
        ("rope_freq_base", float(cfg.rope["rope_theta"]), f),
        ("layer_norm_rms_epsilon", cfg.rms_norm_eps, f),
        ("expert_count", cfg.n_routed_experts, u),
        ("expert_used_count", cfg.num_experts_per_tok, u),
        ("expert_gating_func", T.GATING_SQRT_SOFTPLUS, u),
        ("key_length", cfg.head_dim, u),
        ("value_length", cfg.head_dim, u),
        ("file_type", T.FILE_TYPE[dtype], u),
        ("rope_dimension_count", cfg.qk_rope_head_dim, u),
        ("q_lora_rank", cfg.q_lora_rank, u),
        ("sliding_window", cfg.sliding_window, u),
        ("expert_feed_forward_length", cfg.moe_intermediate_size, u),
        ("expert_shared_count", cfg.n_shared_experts, u),
        ("expert_weights_scale", cfg.routed_scaling_factor, f),
        ("expert_weights_norm", bool(cfg.norm_topk_prob), "BOOL"),
        ("swiglu_clamp_exp", limit, "ARRAY"),
        ("swiglu_clamp_shexp", limit, "ARRAY"),
        ("indexer_head_count", cfg.index_n_heads, u),
        ("indexer_key_length", cfg.index_head_dim, u),
        ("indexer_top_k", cfg.index_topk, u),
        ("output_group_count", cfg.o_groups, u),
        ("output_lora_rank", cfg.o_lora_rank, u),
        ("compress_ratios", compress_ratios(cfg), "ARRAY"),
        ("compress_rope_freq_base", float(cfg.compress_rope["rope_theta"]), f),
        ("hc_count", cfg.hc_mult, u),
        ("hc_sinkhorn_iterations", cfg.hc_sinkhorn_iters, u),
        ("hc_epsilon", cfg.hc_eps, f),
        ("hash_layer_count", cfg.mlp_types.count("hash"), u),
        ("embedding_length_out", cfg.hidden_size * cfg.hc_mult, u),
    ]
    if n_mtp:
        kv.append(("nextn_predict_layers", n_mtp, u))
    kv.append(("quantization_version", T.QUANTIZATION_VERSION, u))
    return [(T.K[k].format(a=ARCH), v, t) for k, v, t in kv]


# =========================================================================== tensors


def _gguf_type(gname: str, shape: tuple, dtype: str) -> str:
    return "I32" if gname.endswith(T.V4_INT) else G._gguf_type(gname, shape, dtype, T.V4_KEEP_F32)


def _array(t: torch.Tensor, qtype: str) -> np.ndarray:
    return t.to(torch.int32).contiguous().cpu().numpy() if qtype == "I32" else G._np(t)


def tensor_plan(model, dtype: str, mtp: bool) -> list[tuple[str, tuple, str, object]]:
    """[(GGUF name, shape, GGML type, producer)] of the trunk file (mtp=False) or of the MTP draft file (mtp=True)."""
    cfg = model.cfg
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    sd = model.state_dict()
    plan = []

    def add(gname, produce, shape=None):
        shape = tuple(produce().shape) if shape is None else shape  # views only, except where shape is given
        qtype = _gguf_type(gname, shape, dtype)
        plan.append((gname, shape, qtype, lambda: _array(produce().detach(), qtype)))

    for name, t in sd.items():
        if name in T.V4_GLOBAL:
            if not (mtp and name.startswith("model.hc_head.")):  # the draft file's root hc_head is the MTP's
                add(T.V4_GLOBAL[name], lambda t=t: t)
            continue
        m = re.match(r"^(model\.layers|mtp)\.(\d+)\.(.+)$", name)
        if not m:
            raise G.GGUFError(f"{name}: no deepseek4 GGUF name for this tensor")
        in_mtp, suffix = m.group(1) == "mtp", m.group(3)
        if in_mtp != mtp:
            continue
        i = int(m.group(2)) + (L if in_mtp else 0)
        if in_mtp and suffix in T.V4_MTP_ROOT:
            add(T.V4_MTP_ROOT[suffix], lambda t=t: t)
        elif suffix in T.V4_BLOCK:
            add(f"blk.{i}.{T.V4_BLOCK[suffix]}", lambda t=t: t)
        elif suffix == "mlp.experts.gate_up_proj":  # [E, 2I, D] -> gate, up [E, I, D]
            for half, gname in enumerate(T.SPLIT[suffix]):
                add(f"blk.{i}.{gname}", lambda t=t, h=half: t.chunk(2, dim=1)[h])
        elif in_mtp and suffix == T.V4_EH_PROJ[0]:  # [D, D] twice -> [D, 2D]
            h = sd[f"mtp.{m.group(2)}.{T.V4_EH_PROJ[1]}"]
            add(f"blk.{i}.{T.V4_EH_PROJ[2]}", lambda e=t, h=h: torch.cat([e, h], dim=1), shape=(D, 2 * D))
        elif not (in_mtp and suffix == T.V4_EH_PROJ[1]):
            raise G.GGUFError(f"{name}: no deepseek4 GGUF name for this tensor")
    return plan


# =========================================================================== import


def _f32(x) -> float:
    """A float read from a FLOAT32 key, as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def config_from_metadata(md: dict, get, path: str) -> dict:
    """An original-spelling DeepSeek-V4 config dict (`compress_ratios`, `num_hash_layers`, ...) from deepseek4 keys."""
    gating = get("expert_gating_func")
    if gating != T.GATING_SQRT_SOFTPLUS:
        raise G.GGUFError(f"{path}: {ARCH}.expert_gating_func={gating}; DeepSeek-V4 routes with sqrtsoftplus "
                          f"({T.GATING_SQRT_SOFTPLUS})")
    clamps = {_f32(x) for x in list(get("swiglu_clamp_exp")) + list(get("swiglu_clamp_shexp", [], required=False))}
    if len(clamps) != 1:
        raise G.GGUFError(f"{path}: per-layer swiglu clamps {sorted(clamps)}; DeepSeek-V4 has one swiglu_limit")
    n_mtp = get("nextn_predict_layers", 0, required=False)
    d = dict(
        architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4",
        vocab_size=get("vocab_size", len(md.get(T.K["tok_tokens"]) or []) or None, required=False),
        hidden_size=get("embedding_length"), moe_intermediate_size=get("expert_feed_forward_length"),
        num_hidden_layers=get("block_count") - n_mtp, num_attention_heads=get("head_count"), num_key_value_heads=1,
        head_dim=get("key_length"), qk_rope_head_dim=get("rope_dimension_count"), q_lora_rank=get("q_lora_rank"),
        o_groups=get("output_group_count"), o_lora_rank=get("output_lora_rank"),
        index_n_heads=get("indexer_head_count"), index_head_dim=get("indexer_key_length"),
        index_topk=get("indexer_top_k"), n_routed_experts=get("expert_count"),
        n_shared_experts=get("expert_shared_count"), num_experts_per_tok=get("expert_used_count"),
        sliding_window=get("sliding_window"), hc_mult=get("hc_count"),
        hc_sinkhorn_iters=get("hc_sinkhorn_iterations"), hc_eps=_f32(get("hc_epsilon")),
        compress_ratios=[int(r) for r in get("compress_ratios")], num_hash_layers=get("hash_layer_count"),
        num_nextn_predict_layers=n_mtp, rope_theta=_f32(get("rope_freq_base")),
        compress_rope_theta=_f32(get("compress_rope_freq_base")), scoring_func="sqrtsoftplus",
        norm_topk_prob=bool(get("expert_weights_norm")), routed_scaling_factor=_f32(get("expert_weights_scale")),
        swiglu_limit=clamps.pop(), max_position_embeddings=get("context_length"),
        rms_norm_eps=_f32(get("layer_norm_rms_epsilon")), tie_word_embeddings=False,
        bos_token_id=md.get(T.SPECIAL_KEYS["bos"]), eos_token_id=md.get(T.SPECIAL_KEYS["eos"]),
        pad_token_id=md.get(T.SPECIAL_KEYS["pad"]),
    )
    if get("rope_scaling_type", "none", required=False) == "yarn":
        d["rope_scaling"] = {"type": "yarn", "factor": _f32(get("rope_scaling_factor")),
                             "original_max_position_embeddings": int(get("rope_scaling_orig_ctx"))}
        for k in ("beta_fast", "beta_slow", "attn_factor"):
            v = get(f"rope_yarn_{k}", "absent", required=False)
            if v != "absent":
                d["rope_scaling"]["attention_factor" if k == "attn_factor" else k] = _f32(v)
    return d


_BY_GGUF = {v: k for k, v in T.V4_BLOCK.items()}
_GLOBAL_BY_GGUF = {v: k for k, v in T.V4_GLOBAL.items()}
_MTP_ROOT_BY_GGUF = {v: k for k, v in T.V4_MTP_ROOT.items()}
_SHARED = ("token_embd.weight", "output.weight", "output_norm.weight")  # repeated in the draft file


def _tensors(reader, L: int, mtp_file: bool, path: str):
    """(dsalite name, part index or None, array) for every tensor of a trunk or MTP draft file."""
    gguf = G._gguf()
    for t in reader.tensors:
        if mtp_file and t.name in _SHARED:
            continue  # the trunk file's copy is the one used
        if t.tensor_type == gguf.GGMLQuantizationType.I32:
            a = np.array(t.data, dtype=np.int32)
        else:
            a = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if mtp_file and t.name in _MTP_ROOT_BY_GGUF:
            yield f"mtp.0.{_MTP_ROOT_BY_GGUF[t.name]}", None, a
            continue
        if not mtp_file and t.name in _GLOBAL_BY_GGUF:
            yield _GLOBAL_BY_GGUF[t.name], None, a
            continue
        m = re.match(r"^blk\.(\d+)\.(.+)$", t.name)
        i = int(m.group(1)) if m else -1
        if m and (i >= L) == mtp_file:
            prefix = f"mtp.{i - L}." if mtp_file else f"model.layers.{i}."
            rest = m.group(2)
            if rest in _BY_GGUF:
                yield prefix + _BY_GGUF[rest], None, a
                continue
            if rest in T.SPLIT["mlp.experts.gate_up_proj"]:
                yield prefix + "mlp.experts.gate_up_proj", T.SPLIT["mlp.experts.gate_up_proj"].index(rest), a
                continue
            if mtp_file and rest == T.V4_EH_PROJ[2]:
                half = a.shape[1] // 2
                yield prefix + T.V4_EH_PROJ[0], None, a[:, :half]
                yield prefix + T.V4_EH_PROJ[1], None, a[:, half:]
                continue
        raise G.GGUFError(f"{path}: {t.name}: not a tensor of a deepseek4 {'MTP draft' if mtp_file else 'trunk'} "
                          "file")


def load(path: str, reader, md: dict, dtype: torch.dtype, device) -> torch.nn.Module:
    """Build a dsalite DeepSeek-V4 model from a deepseek4 GGUF, with the MTP layer from `mtp-<name>` beside it when
    that file exists (the pair `export` writes, or the converter's default and `--mtp` outputs)."""

    raw = G.config_from_metadata(md, path)
    if raw.get("num_nextn_predict_layers"):
        raise G.GGUFError(f"{path}: is an MTP draft file (nextn_predict_layers set); load the trunk file beside it")
    L = raw["num_hidden_layers"]
    files = [(path, reader, False)]
    draft = mtp_path(path)
    if os.path.isfile(draft):
        d_reader = G._open(draft)
        dmd = G._fields(d_reader)
        n = dmd.get(T.K["nextn_predict_layers"].format(a=ARCH))
        if dmd.get("general.architecture") != ARCH or n != 1 or dmd.get(T.K["block_count"].format(a=ARCH)) != L + 1:
            raise G.GGUFError(f"{draft}: not the deepseek4 MTP draft file of {path} (expected nextn_predict_layers "
                              f"= 1, the one MTP block llama.cpp runs, and block_count = {L + 1})")
        raw["num_nextn_predict_layers"] = 1
        files.append((draft, d_reader, True))
    cfg = ModelConfig.from_hf(raw)
    parts: dict[str, dict] = {}
    for p, r, is_mtp in files:
        for name, part, a in _tensors(r, L, is_mtp, p):
            parts.setdefault(name, {})[part] = a
    with torch.device("meta"):
        model = build_model(cfg)
    expected = model.state_dict()
    bad = [f"{n}: unexpected tensor" for n in parts if n not in expected]
    bad += [f"{n}: missing" for n in expected if n not in parts]
    sd = {}
    for name, want in expected.items():
        p = parts.get(name)
        if p is None:
            continue
        if None in p:
            t = torch.from_numpy(p[None])
        elif len(p) == 2:  # gate, up [E, I, D] -> [E, 2I, D]
            t = torch.cat([torch.from_numpy(p[0]), torch.from_numpy(p[1])], dim=1)
        else:
            bad.append(f"{name}: only one of {', '.join(T.SPLIT['mlp.experts.gate_up_proj'])}")
            continue
        if tuple(t.shape) != tuple(want.shape):
            bad.append(f"{name}: shape {list(t.shape)}, expected {list(want.shape)}")
            continue
        if not want.dtype.is_floating_point:
            target = want.dtype
        elif FP32_MODULES.intersection(name.split(".")):
            target = torch.float32
        else:
            target = dtype
        sd[name] = t.to(target).clone()
    if bad:
        raise G.GGUFError(f"{path}: GGUF does not match the model its metadata describes:\n  " + "\n  ".join(bad))
    model.load_state_dict(sd, assign=True, strict=True)
    return model.to(device).eval()
