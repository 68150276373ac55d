"""Sharded loading of an HF checkpoint (`--init-from` under a parallel layout): each rank reads only its slices.

The model is built on the `meta` device (no memory), sharded (expert parallel, FSDP2) like any other, given storage
for its local shards only (`to_empty`), and each shard is filled from the safetensors files: FSDP2 and EP split
every tensor along dim 0, so a rank's piece is a block of rows (of experts, for the fused expert weights, which are
read expert by expert from the per-expert tensors on disk), read with pread rather than through a memory map. FP8
weights are dequantised per slice: the rows are widened to whole scale blocks, dequantised with their scale rows
and cut back. A rank's peak memory is then about its shard plus one tensor's slice, not the model.

Names come from `checkpoint/names.py` (MTP layers as `model.layers.{L+k}`). Every tensor the model needs is checked
against the headers (present, shape) before anything is read, and all problems are reported at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch

from dsalite.checkpoint.io import CheckpointError, CheckpointReader, read_config
from dsalite.checkpoint.load import block_size
from dsalite.checkpoint.names import (
    FUSED_PARTS,
    SCALE_SUFFIX,
    detect_mtp,
    dsalite_to_disk_name,
    dsalite_to_disk_names,
    fused_kind,
    optional_mtp_keys,
)


def model_on_meta(path: str):
    """The Transformer a checkpoint directory describes, on the meta device, fitted to its files as
    `from_pretrained` fits it (no MTP layer when none is on disk; MTP embeddings and head only when present)."""
    from dsalite.config import ModelConfig
    from dsalite.model import Transformer

    cfg = ModelConfig.from_hf(read_config(path))
    own = True
    with CheckpointReader(path) as reader:
        state = detect_mtp(reader, cfg)
        if state == "partial":
            raise CheckpointError(f"{path}: the MTP layer is only partly present")
        if cfg.num_nextn_predict_layers and state == "absent":
            L = cfg.num_hidden_layers
            cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0, indexer_types=cfg.indexer_types[:L])
        present = optional_mtp_keys(reader, cfg)
        own = all(present.values()) if present else True
    with torch.device("meta"):
        return Transformer(cfg, mtp_own_embeddings=own)


def _rows(t) -> tuple[int, int]:
    """[start, stop) of the dim-0 rows of the global tensor this rank holds (the whole tensor when not sharded)."""
    if not hasattr(t, "to_local"):
        return 0, t.shape[0] if t.dim() else 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if any(o for o in offset[1:]) or tuple(shape[1:]) != tuple(t.shape[1:]):
        raise NotImplementedError(f"sharded loading reads dim-0 blocks; got a shard at offset {offset}")
    return offset[0], offset[0] + shape[0]


class _Slices:
    """Row blocks of disk tensors read with pread (no memory map: mapped pages of the file would count as this
    rank's memory for as long as the file stays open), FP8 dequantised per block of scale rows."""

    def __init__(self, reader: CheckpointReader, block):
        self.reader, self.block = reader, block
        self.headers: dict[str, tuple[int, dict]] = {}  # file -> (first data byte, header)

    def _read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of a disk tensor as stored (its dtype, torch's shape)."""
        f = self.reader.file(name)
        if f not in self.headers:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self.headers[f] = (8 + n, json.loads(fh.read(n)))
        start, header = self.headers[f]
        dtype, shape = self.reader.dtype(name), tuple(self.reader.shape(name))
        row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size() if shape else 0
        if not shape:
            a, b, row = 0, 1, torch.empty((), dtype=dtype).element_size()
        buf = bytearray((b - a) * row)
        with open(f, "rb") as fh:
            got = os.preadv(fh.fileno(), [buf], start + header[name]["data_offsets"][0] + a * row) if buf else 0
        if got != len(buf):
            raise CheckpointError(f"{name}: short read of rows {a}:{b} from {f}")
        t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return t.view(dtype).reshape((b - a, *shape[1:]) if shape else ())

    def rows(self, name: str, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        from dsalite.checkpoint import quant

        scale = name + SCALE_SUFFIX if name.endswith(".weight") else None
        if scale is None or scale not in self.reader:
            return self._read(name, a, b).to(dtype)
        rb = quant.scale_block(self.reader.dtype(name), self.block)[0]  # rows per scale row
        a0, b0 = a // rb * rb, min(math.ceil(b / rb) * rb, self.reader.shape(name)[0])
        w = self._read(name, a0, b0)
        s = self._read(scale, a0 // rb, math.ceil(b0 / rb))
        try:
            full = quant.dequantize(w, s, name=name, block=quant.scale_block(w.dtype, self.block))
        except ValueError as e:
            raise CheckpointError(f"{name}: cannot dequantise rows {a}:{b} ({e})") from None
        return full[a - a0:b - a0].to(dtype)


def _check(reader, cfg, sd) -> None:
    problems = []
    for name, t in sd.items():
        kind = fused_kind(name)
        if kind is None:
            want = {dsalite_to_disk_name(name, cfg): tuple(t.shape)}
        else:
            parts = FUSED_PARTS[kind]
            part = (t.shape[1] // len(parts), t.shape[2])
            want = {dk: part for dk in dsalite_to_disk_names(name, cfg, t.shape[0])}
        for dk, shape in want.items():
            if dk not in reader:
                problems.append(f"{dk}: missing (for {name})")
            elif tuple(reader.shape(dk)) != shape:
                problems.append(f"{dk}: shape {list(reader.shape(dk))}, the model expects {list(shape)}")
    if problems:
        raise CheckpointError(f"{reader.path}: checkpoint does not match the model:\n" + "\n".join(problems))


@torch.no_grad()
def load_sharded(model, path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Give the meta-built, already sharded `model` storage for its local shards on `device` and fill them from the
    HF checkpoint at `path`, reading only this rank's rows. The router's selection bias stays float32."""
    cfg = model.cfg
    model.to_empty(device=device)
    with CheckpointReader(path) as reader:
        sd = model.state_dict()
        _check(reader, cfg, sd)
        src = _Slices(reader, block_size(read_config(path)))
        for name, t in sd.items():
            local = t.to_local() if hasattr(t, "to_local") else t
            a, b = _rows(t)
            if b <= a:
                continue
            want = torch.float32 if name.endswith("e_score_correction_bias") else dtype
            kind = fused_kind(name)
            if kind is None:
                local.copy_(src.rows(dsalite_to_disk_name(name, cfg), a, b, want).view(local.shape))
                continue
            parts = FUSED_PARTS[kind]
            disk = dsalite_to_disk_names(name, cfg, t.shape[0])
            per = t.shape[1] // len(parts)
            for e in range(a, b):  # whole experts: one [I, D] tensor per part on disk
                for p in range(len(parts)):
                    dk = disk[e * len(parts) + p]
                    local[e - a, p * per:(p + 1) * per].copy_(src.rows(dk, 0, per, want))
