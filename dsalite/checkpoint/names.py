"""HF on-disk names ↔ dsalite names for the MLA families (GLM-5.x, DeepSeek-V3.2, DeepSeek-V3), and which MTP
tensors a checkpoint holds.

dsalite keeps HF's in-memory names (fused `mlp.experts.gate_up_proj` / `down_proj`) plus `mtp.{k}.` for MTP layers;
on disk the experts are per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`) and MTP layer k is
`model.layers.{L+k}.` with L = num_hidden_layers. Every other name maps 1:1; `X.weight_scale_inv` is the block scale
of `X.weight`. A family with other names (DeepSeek-V4) presents its files in these names (see its checkpoint.py).
"""

from __future__ import annotations

import re
from typing import Iterable

SCALE_SUFFIX = "_scale_inv"  # `X.weight_scale_inv` is the block scale of `X.weight`
FUSED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^((?:model\.layers|mtp)\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"^(?:model\.layers|mtp)\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")


def fused_kind(name: str) -> str | None:
    """'gate_up_proj' / 'down_proj' when `name` is a fused expert tensor in dsalite naming."""
    m = _FUSED_RE.match(name)
    return m.group(1) if m else None


def _layer_rename(disk: str, cfg) -> str:
    m = _LAYER_RE.match(disk)
    if m:
        j, L = int(m.group(1)), cfg.num_hidden_layers
        if L <= j < L + cfg.num_nextn_predict_layers:
            return f"mtp.{j - L}.{m.group(2)}"
    return disk


def parse_disk(disk: str, cfg) -> tuple[str, int | None, str | None]:
    """disk name -> (dsalite name, expert index or None, 'gate_proj'|'up_proj'|'down_proj' or None)."""
    name = _layer_rename(disk, cfg)
    m = _EXPERT_RE.match(name)
    if m:
        part = m.group(3)
        fused = "down_proj" if part == "down_proj" else "gate_up_proj"
        return f"{m.group(1)}.{fused}", int(m.group(2)), part
    return name, None, None


def disk_to_dsalite_name(disk: str, cfg) -> str:
    """The dsalite name a disk tensor lands in (per-expert tensors -> their fused tensor)."""
    return parse_disk(disk, cfg)[0]


def disk_to_dsalite_names(disk_keys: Iterable[str], cfg) -> dict[str, list[str]]:
    """Group disk names by the dsalite tensor they form; `*_scale_inv` keys are left out (they ride with their weight).

    Expert lists are ordered by expert, gate before up, which is the order they are concatenated in.
    """
    groups: dict[str, list[tuple[int, int, str]]] = {}
    order = {"gate_proj": 0, "up_proj": 1, "down_proj": 0, None: 0}
    for k in disk_keys:
        if k.endswith(SCALE_SUFFIX):
            continue
        name, e, part = parse_disk(k, cfg)
        groups.setdefault(name, []).append((-1 if e is None else e, order[part], k))
    return {n: [k for *_, k in sorted(v)] for n, v in groups.items()}


def dsalite_to_disk_name(name: str, cfg) -> str:
    """Disk name of a non-expert dsalite tensor (`mtp.{k}.X` -> `model.layers.{L+k}.X`)."""
    m = _MTP_RE.match(name)
    return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}" if m else name


def dsalite_to_disk_names(name: str, cfg, n_experts: int | None = None) -> list[str]:
    """All disk names of a dsalite tensor: one, or the per-expert set of a fused expert tensor."""
    base = dsalite_to_disk_name(name, cfg)
    kind = fused_kind(name)
    if kind is None:
        return [base]
    E = cfg.n_routed_experts if n_experts is None else n_experts
    stem = base.rsplit(".", 1)[0]
    return [f"{stem}.{e}.{p}.weight" for e in range(E) for p in FUSED_PARTS[kind]]


# =========================================================================== MTP presence


def _keys_of(reader_or_keys) -> set[str]:
    return set(reader_or_keys.keys() if hasattr(reader_or_keys, "keys") else reader_or_keys)


def _attention_keys(cfg, i: int, a: str) -> list[str]:
    """Disk names of block i's attention (prefix `a` ends in `self_attn.`), its indexer included on full layers."""
    b = cfg.attention_bias
    if cfg.q_lora_rank:
        keys = [a + "q_a_proj.weight", a + "q_a_layernorm.weight", a + "q_b_proj.weight"]
        keys += [a + "q_a_proj.bias"] if b else []
    else:
        keys = [a + "q_proj.weight"]
    keys += [a + "kv_a_proj_with_mqa.weight", a + "kv_a_layernorm.weight", a + "kv_b_proj.weight", a + "o_proj.weight"]
    keys += [a + "kv_a_proj_with_mqa.bias", a + "o_proj.bias"] if b else []
    types = cfg.indexer_types if cfg.has_indexer else []
    if cfg.has_indexer and (types[i] if i < len(types) else "full") == "full":
        idx = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
        keys += [a + "indexer." + n for n in idx]
    return keys


def _mlp_keys(cfg, i: int, m: str) -> list[str]:
    """Disk names of block i's MLP (prefix `m` ends in `mlp.`): dense, or router + per-expert + shared experts."""
    parts = ("gate_proj", "up_proj", "down_proj")
    if cfg.layer_mlp_type(i) != "sparse":
        return [f"{m}{p}.weight" for p in parts]
    keys = [m + "gate.weight", m + "gate.e_score_correction_bias"]
    keys += [f"{m}experts.{e}.{p}.weight" for e in range(cfg.n_routed_experts) for p in parts]
    if cfg.n_shared_experts:
        keys += [f"{m}shared_experts.{p}.weight" for p in parts]
    return keys


def mtp_required_keys(cfg, k: int) -> list[str]:
    """Disk names MTP layer k cannot do without (its optional own embed_tokens / shared_head.head excluded)."""
    i = cfg.num_hidden_layers + k
    p = f"model.layers.{i}."
    keys = [p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight", p + "shared_head.norm.weight"]
    keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return keys + _attention_keys(cfg, i, p + "self_attn.") + _mlp_keys(cfg, i, p + "mlp.")


def _satisfied(key: str, keys: set[str]) -> bool:
    """A per-expert key also counts as present when the checkpoint stores the experts already fused."""
    if key in keys:
        return True
    m = re.match(r"^(.*\.mlp\.experts)\.\d+\.(gate_proj|up_proj|down_proj)\.weight$", key)
    if m:
        fused = "down_proj" if m.group(2) == "down_proj" else "gate_up_proj"
        return f"{m.group(1)}.{fused}" in keys
    return False


def missing_mtp_keys(reader_or_keys, cfg) -> list[str]:
    """Required MTP disk names that are absent, for every declared MTP layer (empty when all are there)."""
    keys = _keys_of(reader_or_keys)
    required = [key for k in range(cfg.num_nextn_predict_layers) for key in mtp_required_keys(cfg, k)]
    return [key for key in required if not _satisfied(key, keys)]


def detect_mtp(reader_or_keys, cfg) -> str:
    """'absent' (no tensor under any MTP layer: transformers drops them on save), 'present', or 'partial'."""
    keys = _keys_of(reader_or_keys)
    L, n = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    prefixes = tuple(f"model.layers.{L + k}." for k in range(n))
    if not n or not any(key.startswith(prefixes) for key in keys):
        return "absent"
    return "partial" if missing_mtp_keys(keys, cfg) else "present"


def optional_mtp_keys(reader_or_keys, cfg) -> dict[str, bool]:
    """For each MTP layer's optional own `embed_tokens.weight` / `shared_head.head.weight`: whether it is on disk."""
    keys = _keys_of(reader_or_keys)
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{cfg.num_hidden_layers + k}."
        for x in ("embed_tokens.weight", "shared_head.head.weight"):
            out[p + x] = p + x in keys
    return out
