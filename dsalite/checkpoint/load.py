"""HF-layout tensors → a dsalite state dict: strict validation from the headers, then one read per tensor.

Every disk tensor is checked against what the model expects (name, shape, dtype, expert index, FP8/FP4 scale
pairing and grid) before any data is read, and every problem goes into one CheckpointError. Reading then fuses
per-expert tensors, dequantises FP8 (128×128 blocks, ragged tails allowed) and FP4 (1×32 E8M0 groups), and casts.
Names follow `names.py`; a family with other on-disk names hands in a reader that presents them that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from dsalite.checkpoint import quant
from dsalite.checkpoint.io import CheckpointError, CheckpointReader, progress
from dsalite.checkpoint.names import (
    FUSED_PARTS,
    SCALE_SUFFIX,
    disk_to_dsalite_names,
    dsalite_to_disk_names,
    fused_kind,
    parse_disk,
)

_RAW_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)  # never usable without a scale

# How a dsalite tensor is assembled: (name, [(slot, disk name)], dtype after load). slot is None for a tensor read
# whole, or (expert, part) for one expert's gate/up/down slice of a fused tensor.
Plan = tuple[str, list[tuple[tuple[int, int] | None, str]], torch.dtype]


@dataclass(frozen=True)
class OnDisk:
    """What a checkpoint directory holds, as the model will be built from it (a family's `open` returns one)."""

    tensors: object  # a CheckpointReader, or a view of one that presents the names of `names.py`
    cfg: object  # config.json's ModelConfig, fitted to the files (MTP dropped when none is on disk)
    layout: str = "hf"
    mtp_own_embeddings: bool = True


def _fmt(shape) -> str:
    return str(list(shape))


def block_size(raw_config: Mapping) -> tuple[int, ...] | None:
    """`quantization_config.weight_block_size` when the config states it."""
    b = (raw_config.get("quantization_config") or {}).get("weight_block_size")
    return tuple(int(x) for x in b) if b else None


def pair_scales(keys: Iterable[str], weight_of) -> tuple[dict[str, str], list[str]]:
    """{weight: its scale} over the keys for which `weight_of(key)` names a weight, and a problem per lone scale."""
    keys = set(keys)
    scale_of, problems = {}, []
    for s in sorted(keys):
        w = weight_of(s)
        if w is None:
            continue
        if w in keys:
            scale_of[w] = s
        else:
            problems.append(f"{s}: scale without its weight {w}")
    return scale_of, problems


def _weight_of_scale(name: str) -> str | None:
    return name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else None


class _Validator:
    """Checks disk tensors against the model's expected tensors from the headers alone; collects every problem."""

    def __init__(self, reader, cfg, dtype: torch.dtype | None):
        self.reader, self.cfg, self.dtype = reader, cfg, dtype
        self.block = block_size(getattr(cfg, "raw", None) or {})
        self.scale_of, self.problems = pair_scales(reader.keys(), _weight_of_scale)

    def unexpected(self, name: str, disks: list[str]) -> None:
        for dk in disks:
            self.problems.append(f"{dk}: unexpected tensor (no {name} in the model)")
            if dk in self.scale_of:
                self.problems.append(f"{self.scale_of[dk]}: unexpected tensor (scale of {dk})")

    def plan(self, name: str, disks: list[str], shape, want: torch.dtype | None) -> Plan | None:
        """How to build `name` from its disk tensors, or None (with the problems recorded)."""
        shape = torch.Size(shape)
        label = f" (for {name})" if disks != [name] else ""
        kind = fused_kind(name)
        if kind and any(parse_disk(dk, self.cfg)[1] is not None for dk in disks):
            slots = self._expert_slots(name, kind, disks, shape)
        else:
            slots = [(None, dk, shape) for dk in disks]
        if not slots:
            return None
        srcs = [self._source_dtype(dk, part_shape, want, label) for _, dk, part_shape in slots]
        if None in srcs:
            return None
        target = self._target_dtype(name, want, srcs)
        return None if target is None else (name, [(slot, dk) for slot, dk, _ in slots], target)

    def _expert_slots(self, name: str, kind: str, disks: list[str], shape: torch.Size) -> list | None:
        """[((expert, part), disk name, part shape)] of a fused expert tensor stored per expert."""
        found = {}
        for dk in disks:
            _, e, part = parse_disk(dk, self.cfg)
            if e is None:
                self.problems.append(f"{dk}: stored both fused and per expert; drop one")
            else:
                found[(e, part)] = dk
        if len(shape) != 3 or (kind == "gate_up_proj" and shape[1] % 2):
            self.problems.append(f"{name}: expected shape {_fmt(shape)} is not a fused expert shape")
            return None
        E, parts = shape[0], FUSED_PARTS[kind]
        part_shape = (shape[1] // len(parts), shape[2])
        for (e, _), dk in found.items():
            if e >= E:
                self.problems.append(f"{dk}: unexpected expert index {e} ({name} has {E} experts)")
        stem = next(iter(found.values())).rsplit(".", 3)[0]  # "<...>.mlp.experts"
        slots = []
        for e in range(E):
            for p_i, part in enumerate(parts):
                dk = found.get((e, part))
                if dk is None:
                    self.problems.append(f"{stem}.{e}.{part}.weight: missing (expert {e} of {E} for {name})")
                else:
                    slots.append(((e, p_i), dk, part_shape))
        return slots

    def _source_dtype(self, dk: str, want_shape, want_dtype, label: str) -> torch.dtype | None:
        """One disk tensor's dtype after dequantisation, or None when it is unusable."""
        dt, shp = self.reader.dtype(dk), tuple(self.reader.shape(dk))
        scale = self.scale_of.get(dk)
        if scale is not None:
            logical, ok = self._dequantised_shape(dk, scale, dt, shp)
            if logical is None:
                return None
            src = torch.float32
        elif dt in _RAW_FLOAT8:
            self.problems.append(f"{dk}: {dt} weight without its {dk}{SCALE_SUFFIX}")
            return None
        else:
            logical, src = shp, dt
            ok = self._dtype_fits(dk, dt, want_dtype, label)
        if want_shape is not None and tuple(logical) != tuple(want_shape):
            self.problems.append(f"{dk}: shape {_fmt(logical)}, expected {_fmt(want_shape)}" + label)
            ok = False
        return src if ok else None

    def _dequantised_shape(self, dk: str, scale: str, dt: torch.dtype, shp: tuple) -> tuple[tuple | None, bool]:
        """(shape after dequantisation, whether the scale fits it); shape None when `dk` is not quantised."""
        grid_block = quant.scale_block(dt, self.block)
        if grid_block is None:
            self.problems.append(f"{dk}: has {scale} but its dtype {dt} is not a quantised format")
            return None, False
        logical = quant.logical_shape(dt, shp)
        sdt, sshp = self.reader.dtype(scale), tuple(self.reader.shape(scale))
        ok = True
        if sdt not in quant.SCALE_DTYPES:
            self.problems.append(f"{scale}: scale dtype {sdt} is not float32/bf16/fp16 or E8M0 (float8_e8m0fnu/uint8)")
            ok = False
        if len(logical) < 2:
            self.problems.append(f"{dk}: quantised weight must be at least 2-D, got {_fmt(shp)}")
            return logical, False
        grid = logical[:-2] + tuple(math.ceil(d / b) for d, b in zip(logical[-2:], grid_block))
        if sshp != grid:
            self.problems.append(
                f"{scale}: scale shape {_fmt(sshp)} does not match weight {dk} {_fmt(logical)} "
                f"with block {list(grid_block)} (expected {_fmt(grid)})"
            )
            ok = False
        return logical, ok

    def _dtype_fits(self, dk: str, dt: torch.dtype, want: torch.dtype | None, label: str) -> bool:
        """A float tensor where a float is wanted (any precision: it is cast), else exactly the integer dtype."""
        want_float = want is None or want.is_floating_point
        if want_float and not dt.is_floating_point:
            self.problems.append(f"{dk}: wrong dtype {dt}, expected a float tensor" + label)
            return False
        if not want_float and dt != want and (dt.is_floating_point or dt == torch.bool):
            self.problems.append(f"{dk}: wrong dtype {dt}, expected {want}" + label)
            return False
        return True

    def _target_dtype(self, name: str, want: torch.dtype | None, srcs: list[torch.dtype]) -> torch.dtype | None:
        if name.endswith("e_score_correction_bias") and (want is not None or self.dtype is not None):
            # fp32 whatever the load dtype (HF `_keep_in_fp32_modules_strict`); dtype=None keeps the stored bytes
            if want is not None and want != torch.float32:
                self.problems.append(
                    f"{name}: expected dtype {want}, but e_score_correction_bias always loads as float32")
            return torch.float32
        if want is not None:
            return want
        if self.dtype is not None:
            return self.dtype
        if len(set(srcs)) > 1:
            self.problems.append(f"{name}: its disk tensors mix dtypes {sorted(map(str, set(srcs)))}; pass dtype=")
            return None
        return srcs[0]

    def missing(self, expected: Mapping, present: Iterable[str], optional: set[str]) -> None:
        present = set(present)
        for name, (shape, _) in expected.items():
            if name in present or name in optional:
                continue
            E = tuple(shape)[:1]
            disk = dsalite_to_disk_names(name, self.cfg, E[0] if fused_kind(name) and E else None)
            where = f" (on disk: {disk[0]})" if len(disk) == 1 and disk[0] != name else ""
            if len(disk) > 1:
                where = f" (on disk: {disk[0].rsplit('.', 3)[0]}.{{e}}.{{gate,up,down}}_proj.weight)"
            self.problems.append(f"{name}: missing{where}")


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
    check = _Validator(reader, cfg, dtype)
    groups = disk_to_dsalite_names(reader.keys(), cfg)
    plans = []
    for name, disks in groups.items():
        if name not in expected:
            check.unexpected(name, disks)
            continue
        plan = check.plan(name, disks, *expected[name])
        if plan is not None:
            plans.append(plan)
    check.missing(expected, groups, set(optional))
    if check.problems:
        raise CheckpointError(f"{reader.path}: checkpoint does not match the model:\n" + "\n".join(check.problems))
    return _materialise(reader, plans, expected, check.scale_of, check.block)


def read_dequantised(reader, name: str, scale: str | None, block, dtype: torch.dtype) -> torch.Tensor:
    """One disk tensor as `dtype`, dequantised with its scale when it has one (errors name the tensor)."""
    t = reader.get(name)
    if scale is not None:
        try:
            t = quant.dequantize(t, reader.get(scale), name=name, block=quant.scale_block(t.dtype, block))
        except ValueError as e:
            raise CheckpointError(f"{name}: cannot dequantise ({e})") from None
    return t if t.dtype == dtype else t.to(dtype)


def _materialise(reader, plans: list[Plan], expected, scale_of: dict[str, str], block) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    bar = progress(sum(len(slots) for _, slots, _ in plans), "loading")
    try:
        for name, slots, target in plans:
            if slots[0][0] is None:
                dk = slots[0][1]
                out[name] = read_dequantised(reader, dk, scale_of.get(dk), block, target)
                bar.update(1)
                continue
            shape = torch.Size(expected[name][0])
            fused = torch.empty(shape, dtype=target)
            rows = shape[1] // len(FUSED_PARTS[fused_kind(name)])
            for (e, p_i), dk in slots:  # copy_ between equal dtypes is a byte copy
                part = read_dequantised(reader, dk, scale_of.get(dk), block, target)
                fused[e, p_i * rows : (p_i + 1) * rows].copy_(part)
                bar.update(1)
            out[name] = fused
    finally:
        bar.close()
    return out
