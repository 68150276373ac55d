"""DeepSeek-V4 checkpoint names: one declarative table, two on-disk layouts, load and save through the shared code.

Layouts (hf-reference §7): "original" is DeepSeek's release (`embed.weight`, `layers.N.attn.wq_a.weight`,
`attn.kv_norm`, `ffn.experts.E.w1`, `hc_head_fn`, `head.weight`, `mtp.K.*`; FP8 weights carry `X.scale`, FP4 experts
are int8 pairs with an E8M0 `X.scale` per 32 columns). "hf" is what transformers 5.23 `save_pretrained` writes: the
same inner names under `model.` with `model.embed_tokens`, `model.norm`, `model.hc_head.hc_*`, the main kv norm as
`attn.norm`, and no MTP (HF drops it; we write it as `mtp.K.*`, which HF ignores on load).
In memory dsalite uses HF's module names (`model.layers.N.self_attn.q_a_proj.weight`, fused `mlp.experts.gate_up_proj`).
Loading presents the disk tensors to `checkpoint/load.py` under the names it already understands (`checkpoint/names.py`:
per-expert `mlp.experts.E.{gate,up,down}_proj.weight`, `X.weight_scale_inv`, MTP at `model.layers.{L+k}`), so
validation, expert fusion and FP8/FP4 dequantisation are the shared ones; errors are translated back to the names on
disk. The hooks `from_pretrained` and `save_pretrained` call: `on_disk`, `load`, `save`.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch

from dsalite.checkpoint.io import CheckpointError, CheckpointReader
from dsalite.checkpoint.load import OnDisk, load_state_dict
from dsalite.checkpoint.names import SCALE_SUFFIX
from dsalite.checkpoint.save import save_state_dict

LAYOUTS = ("original", "hf")

# (dsalite name, original name, hf name) at the top level.
TOP = [
    ("model.embed_tokens.weight", "embed.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "head.weight", "head.weight"),
    ("model.norm.weight", "norm.weight", "model.norm.weight"),
    ("model.hc_head.hc_fn", "hc_head_fn", "model.hc_head.hc_fn"),
    ("model.hc_head.hc_base", "hc_head_base", "model.hc_head.hc_base"),
    ("model.hc_head.hc_scale", "hc_head_scale", "model.hc_head.hc_scale"),
]
# (dsalite name, original name[, hf name when it differs]) inside a block; {e} = expert index.
BLOCK = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    *[(f"{ours}_hc.{p}", f"hc_{theirs}_{p}") for ours, theirs in (("attn", "attn"), ("ffn", "ffn"))
      for p in ("fn", "base", "scale")],
    ("self_attn.sinks", "attn.attn_sink"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("self_attn.q_a_norm.weight", "attn.q_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("self_attn.kv_proj.weight", "attn.wkv.weight"),
    ("self_attn.kv_norm.weight", "attn.kv_norm.weight", "attn.norm.weight"),
    ("self_attn.o_a_proj.weight", "attn.wo_a.weight"),
    ("self_attn.o_b_proj.weight", "attn.wo_b.weight"),
    *[(f"self_attn.compressor.{o}", f"attn.compressor.{t}") for o, t in
      (("kv_proj.weight", "wkv.weight"), ("gate_proj.weight", "wgate.weight"), ("position_bias", "ape"),
       ("kv_norm.weight", "norm.weight"))],
    *[(f"self_attn.compressor.indexer.{o}", f"attn.indexer.compressor.{t}") for o, t in
      (("kv_proj.weight", "wkv.weight"), ("gate_proj.weight", "wgate.weight"), ("position_bias", "ape"),
       ("kv_norm.weight", "norm.weight"))],
    ("self_attn.compressor.indexer.q_b_proj.weight", "attn.indexer.wq_b.weight"),
    ("self_attn.compressor.indexer.scorer.weights_proj.weight", "attn.indexer.weights_proj.weight"),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.gate.tid2eid", "ffn.gate.tid2eid"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
    ("mlp.experts.{e}.gate_proj.weight", "ffn.experts.{e}.w1.weight"),
    ("mlp.experts.{e}.up_proj.weight", "ffn.experts.{e}.w3.weight"),
    ("mlp.experts.{e}.down_proj.weight", "ffn.experts.{e}.w2.weight"),
]
# MTP layers only (DeepSeek `MTPBlock`), same in both layouts.
MTP_EXTRA = [
    ("e_proj.weight", "e_proj.weight"), ("h_proj.weight", "h_proj.weight"), ("enorm.weight", "enorm.weight"),
    ("hnorm.weight", "hnorm.weight"), ("norm.weight", "norm.weight"),
    ("hc_head.hc_fn", "hc_head_fn"), ("hc_head.hc_base", "hc_head_base"), ("hc_head.hc_scale", "hc_head_scale"),
]

# Kept in float32 whatever the load dtype, as HF's `_keep_in_fp32_modules_strict` for DeepseekV4 (matched against the
# components of a tensor's name); the forward then mixes them with bf16 activations exactly as HF does.
FP32_MODULES = frozenset({"attn_hc", "ffn_hc", "hc_head", "sinks", "position_bias", "e_score_correction_bias",
                          "q_a_norm", "kv_norm", "input_layernorm", "post_attention_layernorm", "norm"})

_ORIG_SCALE = ".scale"  # DeepSeek's suffix for the scale of `X.weight`: `X.scale`


def _compile(rows, col: int) -> list[tuple[re.Pattern, str, re.Pattern, str]]:
    """Per row: (ours regex, ours template, disk regex, disk template), expert index as a named group."""
    out = []
    for row in rows:
        ours, disk = row[0], row[min(col, len(row) - 1)]
        rx = lambda s: re.compile("^" + re.escape(s).replace(r"\{e\}", r"(?P<e>\d+)") + "$")  # noqa: E731
        out.append((rx(ours), ours, rx(disk), disk))
    return out


_TABLES = {layout: (_compile(TOP, col), _compile(BLOCK, col), _compile(MTP_EXTRA, 1))
           for col, layout in ((1, "original"), (2, "hf"))}
_DISK_LAYER = {"original": re.compile(r"^layers\.(\d+)\.(.+)$"), "hf": re.compile(r"^model\.layers\.(\d+)\.(.+)$")}
_OURS_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")


def _translate(name: str, table, src: int) -> str | None:
    """Map one name through a compiled table: src 0 = ours → disk, 2 = disk → ours."""
    for row in table:
        m = row[src].match(name)
        if m:
            out = row[3] if src == 0 else row[1]
            return out.replace("{e}", m.group("e")) if "{e}" in out else out
    return None


def to_disk(name: str, layout: str, L: int) -> str | None:
    """Disk name of a dsalite (virtual, per-expert) name; MTP layer k is `model.layers.{L+k}` in dsalite naming."""
    top, block, extra = _TABLES[layout]
    hit = _translate(name, top, 0)
    if hit:
        return hit
    m = _OURS_LAYER.match(name)
    if not m:
        return None
    i, inner = int(m.group(1)), m.group(2)
    if i >= L:
        rel = _translate(inner, extra, 0) or _translate(inner, block, 0)
        return None if rel is None else f"mtp.{i - L}.{rel}"
    rel = _translate(inner, block, 0)
    return None if rel is None else (f"layers.{i}.{rel}" if layout == "original" else f"model.layers.{i}.{rel}")


def from_disk(disk: str, layout: str, L: int) -> str | None:
    """dsalite (virtual) name of a disk tensor, `X.weight_scale_inv` for a scale; None when the name is unknown."""
    if disk.endswith(_ORIG_SCALE) or disk.endswith(SCALE_SUFFIX):
        base = disk[: -len(_ORIG_SCALE)] + ".weight" if disk.endswith(_ORIG_SCALE) else disk[: -len(SCALE_SUFFIX)]
        w = from_disk(base, layout, L)
        return None if w is None else w + SCALE_SUFFIX
    top, block, extra = _TABLES[layout]
    hit = _translate(disk, top, 2)
    if hit:
        return hit
    m = _MTP.match(disk)
    if m:
        k, inner = int(m.group(1)), m.group(2)
        rel = _translate(inner, extra, 2) or _translate(inner, block, 2)
        return None if rel is None else f"model.layers.{L + k}.{rel}"
    m = _DISK_LAYER[layout].match(disk)
    if m:
        rel = _translate(m.group(2), block, 2)
        return None if rel is None else f"model.layers.{m.group(1)}.{rel}"
    return None


def detect_layout(keys) -> str:
    keys = set(keys)
    if "embed.weight" in keys or any(k.startswith("layers.") for k in keys):
        return "original"
    return "hf"


class RenamedReader:
    """A CheckpointReader seen through the V4 table: keys are dsalite disk names (`checkpoint/names.py`)."""

    def __init__(self, reader: CheckpointReader, layout: str, L: int):
        self.reader, self.path, self.layout, self.L = reader, reader.path, layout, L
        self.to_real: dict[str, str] = {}
        self.unknown: list[str] = []
        for k in reader.keys():
            v = from_disk(k, layout, L)
            if v is None:
                self.unknown.append(k)
            else:
                self.to_real[v] = k

    def keys(self) -> list[str]:
        return sorted(self.to_real)

    def __contains__(self, name: str) -> bool:
        return name in self.to_real

    def shape(self, name):
        return self.reader.shape(self.to_real[name])

    def dtype(self, name):
        return self.reader.dtype(self.to_real[name])

    def file(self, name):
        return self.reader.file(self.to_real[name])

    def get(self, name):
        return self.reader.get(self.to_real[name])

    def close(self):
        self.reader.close()

    def real_names(self, text: str) -> str:
        """An error message with every dsalite disk-style name replaced by the name actually on disk."""
        def real(m: re.Match) -> str:
            tok = m.group(0)
            return self.to_real.get(tok) or to_disk(tok, self.layout, self.L) or tok

        return re.sub(r"[\w.]+", real, text)


def mtp_state(reader: RenamedReader, L: int, n_mtp: int) -> str:
    """'absent' (no `mtp.*` tensors: HF drops them on save) or 'present'; a half-present layer fails at load."""
    prefixes = tuple(f"model.layers.{L + k}." for k in range(n_mtp))
    return "present" if n_mtp and any(k.startswith(prefixes) for k in reader.keys()) else "absent"


def on_disk(reader: CheckpointReader, cfg) -> OnDisk:
    """Either layout seen through the table; the config without its MTP layer when none is on disk."""
    L, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    view = RenamedReader(reader, detect_layout(reader.keys()), L)
    if n_mtp and mtp_state(view, L, n_mtp) == "absent":
        logging.getLogger("dsalite").warning(
            "%s declares num_nextn_predict_layers=%d but holds no mtp.* weights (transformers drops them on save); "
            "loading without the MTP layer", reader.path, n_mtp)
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0, layer_types=cfg.layer_types[:L])
    return OnDisk(view, cfg, layout=view.layout)


def _expected(state: dict[str, torch.Tensor], view: RenamedReader, dtype) -> dict:
    """Per tensor (shape, dtype after load): FP32_MODULES stay float32, integer tables keep their dtype."""
    expected = {}
    for name, t in state.items():
        if not t.dtype.is_floating_point:  # tid2eid: int64 in memory, int32 in DeepSeek's files
            want = view.dtype(name) if dtype is None and name in view else t.dtype
        elif dtype is not None and FP32_MODULES.intersection(name.split(".")):
            want = torch.float32
        else:
            want = dtype
        expected[name] = (t.shape, want)
    return expected


def load(files: OnDisk, state: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """The model's tensors from either layout, FP8/FP4 dequantised; errors name the tensors as they are on disk."""
    view, cfg = files.tensors, files.cfg
    if view.unknown:
        raise CheckpointError(f"{view.path}: {len(view.unknown)} tensors are not DeepSeek-V4 names "
                              f"({view.layout} layout), e.g. {', '.join(view.unknown[:5])}")
    for i, t in enumerate(cfg.mlp_types):
        name = f"model.layers.{i}.mlp.gate.tid2eid"
        if t == "hash" and name in state and name not in view:
            raise CheckpointError(
                f"{view.path}: {to_disk(name, view.layout, cfg.num_hidden_layers)}: missing; layer {i} is "
                f"hash-routed (mlp_layer_types[{i}] = 'hash_moe') and cannot route without its token→expert table")
    try:
        return load_state_dict(view, cfg, _expected(state, view, dtype), dtype=dtype)
    except CheckpointError as e:
        raise CheckpointError(view.real_names(str(e))) from None


def save(path: str, cfg, state_dict, layout: str = "hf", **kwargs) -> None:
    """Write a V4 checkpoint in `layout` ('original' DeepSeek names, or 'hf' as transformers saves it)."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    L = cfg.num_hidden_layers

    def rename(virtual: str) -> str:
        real = to_disk(virtual, layout, L)
        if real is None:
            raise CheckpointError(f"{virtual}: has no DeepSeek-V4 {layout}-layout name")
        return real

    save_state_dict(path, cfg, state_dict, rename=rename, **kwargs)
