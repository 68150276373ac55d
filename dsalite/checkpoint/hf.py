"""HF safetensors checkpoint bridge: read (single or sharded), map names, dequantise FP8, validate, write atomically.

dsalite keeps HF's in-memory names (fused `mlp.experts.gate_up_proj` / `down_proj`) plus `mtp.{k}.` for MTP layers;
on disk the experts are per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`) and MTP layer k is
`model.layers.{L+k}.` with L = num_hidden_layers. Every other name maps 1:1.

Headers are parsed here rather than trusting `safetensors` so that a truncated download or a broken index is
reported up front, naming the file, before any tensor is read; loading collects every problem and raises one error.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "INDEX_NAME",
    "SINGLE_NAME",
    "SCALE_SUFFIX",
    "read_config",
    "disk_to_dsalite_name",
    "disk_to_dsalite_names",
    "dsalite_to_disk_name",
    "dsalite_to_disk_names",
    "detect_mtp",
    "mtp_required_keys",
    "missing_mtp_keys",
    "optional_mtp_keys",
    "load_state_dict",
    "save_state_dict",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SCALE_SUFFIX = "_scale_inv"  # `X.weight_scale_inv` is the block scale of `X.weight`
_MAX_HEADER = 100 * 2**20  # the safetensors format caps the JSON header at 100 MB

# safetensors dtype string -> (torch dtype, bits per header element). F4 headers count nibbles, torch counts pairs.
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 64), "F32": (torch.float32, 32), "F16": (torch.float16, 16), "BF16": (torch.bfloat16, 16),
    "I64": (torch.int64, 64), "I32": (torch.int32, 32), "I16": (torch.int16, 16), "I8": (torch.int8, 8),
    "U64": (torch.uint64, 64), "U32": (torch.uint32, 32), "U16": (torch.uint16, 16), "U8": (torch.uint8, 8),
    "BOOL": (torch.bool, 8), "C64": (torch.complex64, 64),
    "F8_E4M3": (torch.float8_e4m3fn, 8), "F8_E5M2": (torch.float8_e5m2, 8),
    "F8_E8M0": (torch.float8_e8m0fnu, 8), "F4": (torch.float4_e2m1fn_x2, 4),
}
_FP8 = torch.float8_e4m3fn
_FP4_STORAGE = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu, torch.uint8)
_RAW_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)  # never usable without a scale


class CheckpointError(ValueError):
    """A checkpoint cannot be read, does not match the model, or could not be written; the message names the culprit."""


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=None, leave=False)  # None: off when not a TTY


# =========================================================================== config


def read_config(path: str) -> dict:
    """The raw HF config dict of a checkpoint directory (or a config.json path); errors name the file."""
    p = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: config.json not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def read_chat_template(folder: str, tokenizer_config: dict) -> str | None:
    """A checkpoint's chat template: `chat_template` in tokenizer_config.json, else chat_template.jinja beside it."""
    template = tokenizer_config.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return template if isinstance(template, str) else None


# =========================================================================== reading


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: torch.Size  # as torch will return it (F4: last dim halved)


def _parse_header(file: str) -> dict[str, _Entry]:
    """Validate a safetensors file from its header alone: lengths, JSON, dtypes, offsets inside the file."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated: {size} bytes, too short for the 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise CheckpointError(
                    f"{file}: truncated or not a safetensors file: header length {n} exceeds the {size - 8} bytes left"
                )
            if n > _MAX_HEADER:
                raise CheckpointError(f"{file}: corrupt header: header length {n} exceeds the 100 MB limit")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt header: expected a JSON object, got {type(header).__name__}")
    data_len = size - 8 - n
    out, problems = {}, []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, bits = _ST_DTYPES[e["dtype"]]
            shape = [int(s) for s in e["shape"]]
            begin, end = (int(x) for x in e["data_offsets"])
            if any(s < 0 for s in shape) or not 0 <= begin <= end:
                raise ValueError
        except KeyError as k:
            problems.append(f"{file}: tensor {name!r}: corrupt header entry (missing or unknown {k})")
            continue
        except (TypeError, ValueError):
            problems.append(f"{file}: tensor {name!r}: corrupt header entry {e!r}")
            continue
        need = math.ceil(math.prod(shape) * bits / 8)
        if end - begin != need:
            problems.append(
                f"{file}: tensor {name!r}: data_offsets span {end - begin} bytes but {e['dtype']}{shape} needs {need}"
            )
        elif end > data_len:
            problems.append(
                f"{file}: truncated: tensor {name!r} ends at data byte {end} but the file holds only {data_len}"
            )
        else:
            if bits == 4:
                if not shape or shape[-1] % 2:
                    problems.append(f"{file}: tensor {name!r}: F4 shape {shape} has an odd last dimension")
                    continue
                shape = shape[:-1] + [shape[-1] // 2]
            out[name] = _Entry(file, dtype, torch.Size(shape))
    if problems:
        raise CheckpointError("\n".join(problems))
    return out


class CheckpointReader:
    """All tensors of a checkpoint directory by name, validated from the headers when opened; data read on demand.

    Layouts: `model.safetensors.index.json` (+ the shards its weight_map names), a single `model.safetensors`,
    or else every `*.safetensors` in the directory. A path to one `.safetensors` file also works.
    """

    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, object] = {}
        problems: list[str] = []
        weight_map: dict[str, str] | None = None
        if os.path.isfile(path):
            files = [path]
        elif os.path.isdir(path):
            index = os.path.join(path, INDEX_NAME)
            if os.path.exists(index):
                weight_map = self._read_index(index)
                files = []
                for shard in sorted(set(weight_map.values())):
                    f = os.path.join(path, shard)
                    if os.path.isfile(f):
                        files.append(f)
                    else:
                        problems.append(f"{f}: shard listed in {INDEX_NAME} is missing")
            elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
                files = [os.path.join(path, SINGLE_NAME)]
            else:
                files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
                if not files:
                    raise CheckpointError(f"{path}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors files")
        else:
            raise CheckpointError(f"{path}: checkpoint path does not exist")

        self._entries: dict[str, _Entry] = {}
        per_file: dict[str, set[str]] = {}
        for f in files:
            try:
                entries = _parse_header(f)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            per_file[os.path.basename(f)] = set(entries)
            for name, ent in entries.items():
                if name in self._entries:
                    problems.append(f"{name}: duplicate tensor, held by both {self._entries[name].file} and {f}")
                else:
                    self._entries[name] = ent
        if weight_map is not None:
            for name, shard in weight_map.items():
                held = per_file.get(os.path.basename(shard))
                if held is not None and name not in held:
                    problems.append(f"{name}: {INDEX_NAME} maps it to {shard}, which does not hold it")
        if problems:
            raise CheckpointError("\n".join(problems))

    @staticmethod
    def _read_index(index: str) -> dict[str, str]:
        try:
            with open(index, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: cannot parse ({e})") from None
        wm = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to shard files")
        return wm

    # ----- header queries (no data read) -----
    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{name}: no such tensor in {self.path}") from None

    def shape(self, name: str) -> torch.Size:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def file(self, name: str) -> str:
        return self._entry(name).file

    # ----- data -----
    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self._entry(name).file
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(f, framework="pt", device="cpu")
        return h.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# =========================================================================== names

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^((?:model\.layers|mtp)\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _fused_kind(name: str) -> str | None:
    """'gate_up_proj' / 'down_proj' when `name` is a fused expert tensor in dsalite naming."""
    m = re.match(r"^(?:model\.layers|mtp)\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
    return m.group(1) if m else None


def _layer_rename(disk: str, cfg) -> str:
    m = _LAYER_RE.match(disk)
    if m:
        j, L = int(m.group(1)), cfg.num_hidden_layers
        if L <= j < L + cfg.num_nextn_predict_layers:
            return f"mtp.{j - L}.{m.group(2)}"
    return disk


def _parse_disk(disk: str, cfg) -> tuple[str, int | None, str | None]:
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
    return _parse_disk(disk, cfg)[0]


def disk_to_dsalite_names(disk_keys: Iterable[str], cfg) -> dict[str, list[str]]:
    """Group disk names by the dsalite tensor they form; `*_scale_inv` keys are left out (they ride with their weight).

    Expert lists are ordered by expert, gate before up, which is the order they are concatenated in.
    """
    groups: dict[str, list[tuple[int, int, str]]] = {}
    order = {"gate_proj": 0, "up_proj": 1, "down_proj": 0, None: 0}
    for k in disk_keys:
        if k.endswith(SCALE_SUFFIX):
            continue
        name, e, part = _parse_disk(k, cfg)
        groups.setdefault(name, []).append((-1 if e is None else e, order[part], k))
    return {n: [k for *_, k in sorted(v)] for n, v in groups.items()}


def dsalite_to_disk_name(name: str, cfg) -> str:
    """Disk name of a non-expert dsalite tensor (`mtp.{k}.X` -> `model.layers.{L+k}.X`)."""
    m = _MTP_RE.match(name)
    return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}" if m else name


def dsalite_to_disk_names(name: str, cfg, n_experts: int | None = None) -> list[str]:
    """All disk names of a dsalite tensor: one, or the per-expert set of a fused expert tensor."""
    base = dsalite_to_disk_name(name, cfg)
    kind = _fused_kind(name)
    if kind is None:
        return [base]
    E = cfg.n_routed_experts if n_experts is None else n_experts
    stem = base.rsplit(".", 1)[0]
    return [f"{stem}.{e}.{p}.weight" for e in range(E) for p in _FUSED_PARTS[kind]]


# =========================================================================== MTP presence


def _keys_of(reader_or_keys) -> set[str]:
    return set(reader_or_keys.keys() if hasattr(reader_or_keys, "keys") else reader_or_keys)


def _block_keys(cfg, i: int, prefix: str) -> list[str]:
    """Disk names a decoder block at global layer index i must hold (scales aside; experts per expert)."""
    b = cfg.attention_bias
    a = prefix + "self_attn."
    keys = [prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"]
    if cfg.q_lora_rank:
        keys += [a + "q_a_proj.weight", a + "q_a_layernorm.weight", a + "q_b_proj.weight"]
        keys += [a + "q_a_proj.bias"] if b else []
    else:
        keys += [a + "q_proj.weight"]
    keys += [a + "kv_a_proj_with_mqa.weight", a + "kv_a_layernorm.weight", a + "kv_b_proj.weight", a + "o_proj.weight"]
    keys += [a + "kv_a_proj_with_mqa.bias", a + "o_proj.bias"] if b else []
    types = cfg.indexer_types if cfg.has_indexer else []
    if cfg.has_indexer and (types[i] if i < len(types) else "full") == "full":
        idx = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
        keys += [a + "indexer." + n for n in idx]
    m = prefix + "mlp."
    if cfg.layer_mlp_type(i) == "sparse":
        keys += [m + "gate.weight", m + "gate.e_score_correction_bias"]
        parts = ("gate_proj", "up_proj", "down_proj")
        keys += [f"{m}experts.{e}.{p}.weight" for e in range(cfg.n_routed_experts) for p in parts]
        if cfg.n_shared_experts:
            keys += [f"{m}shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    else:
        keys += [f"{m}{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    return keys


def mtp_required_keys(cfg, k: int) -> list[str]:
    """Disk names MTP layer k cannot do without (its optional own embed_tokens / shared_head.head excluded)."""
    i = cfg.num_hidden_layers + k
    p = f"model.layers.{i}."
    extra = [p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight", p + "shared_head.norm.weight"]
    return extra + _block_keys(cfg, i, p)


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


# =========================================================================== loading


def _fmt(shape) -> str:
    return str(list(shape))


def _block_size(cfg) -> tuple[int, int] | None:
    """FP8 block from `quantization_config.weight_block_size` when the config states it, else quant's default."""
    qc = (getattr(cfg, "raw", None) or {}).get("quantization_config") or {}
    b = qc.get("weight_block_size")
    return tuple(int(x) for x in b) if b else None


def load_state_dict(
    path_or_reader,
    cfg,
    expected: Mapping[str, tuple[torch.Size, torch.dtype | None]],
    *,
    dtype: torch.dtype | None = None,
    optional: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Read every disk tensor into dsalite naming, checked against `expected` before any data is read.

    Dtype after load: `expected[name][1]` when given; else `e_score_correction_bias` is float32, other tensors are
    cast to `dtype`; with dtype=None every tensor keeps its stored dtype (FP8/FP4 weights dequantise to float32).
    Every problem (missing, unexpected, shape, dtype, expert index, FP8 scale pairing) goes into one CheckpointError.
    """
    reader = path_or_reader if hasattr(path_or_reader, "get") else CheckpointReader(path_or_reader)
    optional = set(optional)
    block = _block_size(cfg)
    keys = set(reader.keys())
    problems: list[str] = []

    scale_of: dict[str, str] = {}
    for s in sorted(k for k in keys if k.endswith(SCALE_SUFFIX)):
        w = s[: -len(SCALE_SUFFIX)]
        if w in keys:
            scale_of[w] = s
        else:
            problems.append(f"{s}: scale without its weight {w}")

    def check(dk: str, want_shape, want_dtype, label: str) -> torch.dtype | None:
        """Validate one disk tensor; returns its dtype after dequantisation (None when it is unusable)."""
        dt, shp = reader.dtype(dk), tuple(reader.shape(dk))
        scale = scale_of.get(dk)
        src = dt
        ok = True
        if scale is not None:
            sdt, sshp = reader.dtype(scale), tuple(reader.shape(scale))
            if dt == _FP8:
                logical, grid_block = shp, block or (128, 128)
            elif dt in _FP4_STORAGE and len(shp) >= 1:
                logical = shp[:-1] + (2 * shp[-1],)
                grid_block = (1, 32) if block is None or block[0] != 1 else block
            else:
                problems.append(f"{dk}: has {scale} but its dtype {dt} is not a quantised format")
                return None
            if sdt not in _SCALE_DTYPES:
                problems.append(f"{scale}: scale dtype {sdt} is not float32/bf16/fp16 or E8M0 (float8_e8m0fnu/uint8)")
                ok = False
            if len(logical) >= 2:
                grid = logical[:-2] + tuple(math.ceil(d / b) for d, b in zip(logical[-2:], grid_block))
                if sshp != grid:
                    problems.append(
                        f"{scale}: scale shape {_fmt(sshp)} does not match weight {dk} {_fmt(logical)} "
                        f"with block {list(grid_block)} (expected {_fmt(grid)})"
                    )
                    ok = False
            else:
                problems.append(f"{dk}: quantised weight must be at least 2-D, got {_fmt(shp)}")
                ok = False
            src = torch.float32
        else:
            logical = shp
            if dt in _RAW_FLOAT8:
                problems.append(f"{dk}: {dt} weight without its {dk}{SCALE_SUFFIX}")
                return None
            want_float = want_dtype is None or want_dtype.is_floating_point
            if want_float and not dt.is_floating_point:
                problems.append(f"{dk}: wrong dtype {dt}, expected a float tensor" + label)
                ok = False
            elif not want_float and dt != want_dtype and (dt.is_floating_point or dt == torch.bool):
                problems.append(f"{dk}: wrong dtype {dt}, expected {want_dtype}" + label)
                ok = False
        if want_shape is not None and tuple(logical) != tuple(want_shape):
            problems.append(f"{dk}: shape {_fmt(logical)}, expected {_fmt(want_shape)}" + label)
            ok = False
        return src if ok else None

    groups = disk_to_dsalite_names(keys, cfg)
    plans: list[tuple[str, list, torch.dtype]] = []  # (name, [(slot, disk)], target dtype)
    for name, disks in groups.items():
        if name not in expected:
            for dk in disks:
                problems.append(f"{dk}: unexpected tensor (no {name} in the model)")
                if dk in scale_of:
                    problems.append(f"{scale_of[dk]}: unexpected tensor (scale of {dk})")
            continue
        shape, want = expected[name]
        shape = torch.Size(shape)
        label = f" (for {name})" if disks != [name] else ""
        kind = _fused_kind(name)
        per_expert = [dk for dk in disks if _parse_disk(dk, cfg)[1] is not None]
        srcs: list[torch.dtype | None] = []
        slots: list = []
        if kind and per_expert:
            for dk in disks:
                if dk not in per_expert:
                    problems.append(f"{dk}: stored both fused and per expert; drop one")
            if len(shape) != 3 or (kind == "gate_up_proj" and shape[1] % 2):
                problems.append(f"{name}: expected shape {_fmt(shape)} is not a fused expert shape")
                continue
            E = shape[0]
            part_shape = (shape[1] // 2, shape[2]) if kind == "gate_up_proj" else (shape[1], shape[2])
            found = {}
            for dk in per_expert:
                _, e, part = _parse_disk(dk, cfg)
                if e >= E:
                    problems.append(f"{dk}: unexpected expert index {e} ({name} has {E} experts)")
                else:
                    found[(e, part)] = dk
            stem = per_expert[0].rsplit(".", 3)[0]  # "<...>.mlp.experts"
            for e in range(E):
                for p_i, part in enumerate(_FUSED_PARTS[kind]):
                    dk = found.get((e, part))
                    if dk is None:
                        problems.append(f"{stem}.{e}.{part}.weight: missing (expert {e} of {E} for {name})")
                        continue
                    srcs.append(check(dk, part_shape, want, label))
                    slots.append(((e, p_i), dk))
        else:
            for dk in disks:
                srcs.append(check(dk, shape, want, label))
                slots.append((None, dk))
        if any(s is None for s in srcs):
            continue
        if name.endswith("e_score_correction_bias") and (want is not None or dtype is not None):
            # fp32 whatever the load dtype (HF `_keep_in_fp32_modules_strict`); dtype=None keeps the stored bytes
            target = torch.float32
            if want is not None and want != torch.float32:
                problems.append(f"{name}: expected dtype {want}, but e_score_correction_bias always loads as float32")
        elif want is not None:
            target = want
        elif dtype is not None:
            target = dtype
        else:
            if len(set(srcs)) > 1:
                problems.append(f"{name}: its disk tensors mix dtypes {sorted(map(str, set(srcs)))}; pass dtype=")
                continue
            target = srcs[0]
        if slots:
            plans.append((name, slots, target))

    for name in expected:
        if name not in groups and name not in optional:
            E = tuple(expected[name][0])[:1]
            disk = dsalite_to_disk_names(name, cfg, E[0] if _fused_kind(name) and E else None)
            where = f" (on disk: {disk[0]})" if len(disk) == 1 and disk[0] != name else ""
            if len(disk) > 1:
                where = f" (on disk: {disk[0].rsplit('.', 3)[0]}.{{e}}.{{gate,up,down}}_proj.weight)"
            problems.append(f"{name}: missing{where}")

    if problems:
        raise CheckpointError(f"{reader.path}: checkpoint does not match the model:\n" + "\n".join(problems))
    return _materialise(reader, plans, expected, scale_of, block)


def _materialise(reader, plans, expected, scale_of, block) -> dict[str, torch.Tensor]:
    from dsalite.checkpoint import quant  # imported late: only needed once tensors are read

    def read(dk: str, target: torch.dtype) -> torch.Tensor:
        t = reader.get(dk)
        if dk in scale_of:
            try:
                # weight_block_size is the FP8 block; FP4 experts keep their 1x32 groups
                blk = block if t.dtype == _FP8 or (block and block[0] == 1) else None
                t = quant.dequantize(t, reader.get(scale_of[dk]), name=dk, block=blk)
            except ValueError as e:
                raise CheckpointError(f"{dk}: cannot dequantise ({e})") from None
        return t if t.dtype == target else t.to(target)

    out: dict[str, torch.Tensor] = {}
    bar = _progress(sum(len(s) for _, s, _ in plans), "loading")
    try:
        for name, slots, target in plans:
            if slots[0][0] is None:
                out[name] = read(slots[0][1], target)
                bar.update(1)
                continue
            shape = torch.Size(expected[name][0])
            fused = torch.empty(shape, dtype=target)
            half = shape[1] // len(_FUSED_PARTS[_fused_kind(name)])
            for (e, p_i), dk in slots:  # copy_ between equal dtypes is a byte copy
                fused[e, p_i * half : (p_i + 1) * half].copy_(read(dk, target))
                bar.update(1)
            out[name] = fused
    finally:
        bar.close()
    return out


# =========================================================================== saving


def _disk_plan(state_dict: Mapping[str, torch.Tensor], cfg) -> list[tuple[str, Callable[[], torch.Tensor], int]]:
    """(disk name, producer, nbytes) for every tensor to write; expert slices are produced lazily, shard by shard."""
    plan, problems, seen = [], [], {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name}: not a tensor ({type(t).__name__})")
            continue
        if t.device.type == "meta":
            problems.append(f"{name}: is on the meta device (no data to save)")
            continue
        kind = _fused_kind(name)
        if kind:
            if t.dim() != 3 or (kind == "gate_up_proj" and t.shape[1] % 2):
                problems.append(f"{name}: shape {_fmt(t.shape)} is not a fused expert shape")
                continue
            parts = _FUSED_PARTS[kind]
            half = t.shape[1] // len(parts)
            disks = dsalite_to_disk_names(name, cfg, t.shape[0])
            nb = half * t.shape[2] * t.element_size()
            for j, dk in enumerate(disks):
                e, p_i = divmod(j, len(parts))
                fn = lambda t=t, e=e, a=p_i * half, b=(p_i + 1) * half: t[e, a:b].detach().cpu().clone(
                    memory_format=torch.contiguous_format
                )
                plan.append((dk, fn, nb))
        else:
            disks = [dsalite_to_disk_name(name, cfg)]
            plan.append((disks[0], lambda t=t: t.detach().cpu(), t.numel() * t.element_size()))
        for dk in disks:
            if dk in seen:
                problems.append(f"{name}: writes {dk}, which {seen[dk]} writes too")
            seen[dk] = name
    if problems:
        raise CheckpointError("cannot save state dict:\n" + "\n".join(problems))
    return plan


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone views and tensors sharing storage (tied weights): safetensors refuses shared or partial storage."""
    out, seen = {}, set()
    for k, t in tensors.items():
        st = t.untyped_storage()
        whole = t.is_contiguous() and t.data_ptr() == st.data_ptr() and st.nbytes() == t.numel() * t.element_size()
        if not whole or (st.data_ptr() and st.data_ptr() in seen):
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hf_config(cfg, state_dict) -> dict:
    """cfg.to_hf(), minus a `quantization_config` inherited from an FP8 source when nothing written is quantised."""
    d = cfg.to_hf()
    if "quantization_config" in d and not any(
        isinstance(t, torch.Tensor) and t.dtype in (_FP8, torch.float4_e2m1fn_x2) for t in state_dict.values()
    ):
        d.pop("quantization_config")
    return d


def save_state_dict(
    path: str,
    cfg,
    state_dict: Mapping[str, torch.Tensor],
    *,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: Mapping[str, bytes] | None = None,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Write an HF-layout checkpoint (per-expert tensors, MTP at model.layers.{L+k}) atomically.

    `rename` maps each of those disk names to another layout's (a family's name table, e.g. checkpoint/v4.py).

    Everything goes to a sibling `path.tmp-<random>` first and is renamed into place only when complete; an existing
    `path` is swapped out, then deleted. On any failure the temp dir is removed and `path` is as it was.
    """
    from safetensors.torch import save_file

    path = os.path.abspath(os.fspath(path)).rstrip(os.sep)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path}: exists and is not a directory; refusing to replace it")
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    extra_files = dict(extra_files or {})
    for fname, data in extra_files.items():
        bad = os.path.isabs(fname) or ".." in fname.replace("\\", "/").split("/") or not fname
        if bad or not isinstance(data, (bytes, bytearray)):
            raise CheckpointError(f"extra_files[{fname!r}]: must be a relative path inside the checkpoint, with bytes")
    plan = _disk_plan(state_dict, cfg)
    if rename is not None:
        plan = [(rename(dk), fn, nb) for dk, fn, nb in plan]
    config_text = json.dumps(_hf_config(cfg, state_dict), indent=2)

    shards, names = plan_shards(plan, lambda item: item[2], max_shard_bytes)
    for fname in extra_files:
        if fname in (CONFIG_NAME, INDEX_NAME, *names):
            raise CheckpointError(f"extra_files[{fname!r}]: clashes with a file the checkpoint itself writes")

    tmp, made = _begin_temp(path)
    bar = _progress(len(plan), "saving")
    try:
        written = []
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(config_text + "\n")
        written.append(CONFIG_NAME)
        weight_map, total = {}, 0
        for fname, shard in zip(names, shards):
            tensors = _own_storage({dk: fn() for dk, fn, _ in shard})
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            written.append(fname)
            for dk, t in tensors.items():
                weight_map[dk] = fname
                total += t.numel() * t.element_size()
            del tensors
            bar.update(len(shard))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
            written.append(INDEX_NAME)
        for fname, data in extra_files.items():
            p = os.path.join(tmp, fname)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
            written.append(fname)
        for fname in written:
            _fsync(os.path.join(tmp, fname))
        _swap_into_place(tmp, path)
    except BaseException:
        _abandon(tmp, made)
        raise
    finally:
        bar.close()


def plan_shards(items: list, size_of: Callable, max_shard_bytes: int) -> tuple[list[list], list[str]]:
    """Greedy split into shards of at most max_shard_bytes (a lone larger tensor gets its own) and their file names."""
    shards: list[list] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + size_of(item) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += size_of(item)
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return shards, names


def _begin_temp(path: str) -> tuple[str, list[str]]:
    """A sibling temp dir for an atomic write of `path`, and the parent dirs created for it (innermost first)."""
    parent = os.path.dirname(path)
    made = []
    d = parent
    while not os.path.isdir(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent), made


def _abandon(tmp: str, made: list[str]) -> None:
    """Remove a failed write's temp dir and the (empty) parent dirs it created, innermost first."""
    shutil.rmtree(tmp, ignore_errors=True)
    for d in made:
        try:
            os.rmdir(d)
        except OSError:
            break


def _swap_into_place(tmp: str, path: str) -> None:
    """Rename the finished temp dir to `path`; an existing `path` is moved aside first and deleted only afterwards."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = f"{path}.old-{secrets.token_hex(4)}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
