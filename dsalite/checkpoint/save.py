"""A dsalite state dict + config → an HF-layout checkpoint directory, written atomically (`save_pretrained`).

This is the writing side only: it imports neither `dsalite.model` nor any family module (a family's own writer is
looked up through `family(model_type).checkpoint`), so `Transformer.save_pretrained` can call it without an import
circle. Loading (which builds a model) is `pretrained.py`.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import torch

from dsalite.checkpoint.io import (
    CONFIG_NAME,
    INDEX_NAME,
    CheckpointError,
    Item,
    atomic_dir,
    plan_shards,
    write_json,
    write_shards,
)
from dsalite.checkpoint.names import FUSED_PARTS, dsalite_to_disk_name, dsalite_to_disk_names, fused_kind
from dsalite.families import family

_QUANTISED = (torch.float8_e4m3fn, torch.float4_e2m1fn_x2)


def save_pretrained(model, path: str, **kwargs) -> None:
    """Write `model` (a Transformer) in HF layout (per-expert tensors, MTP as model.layers.{L+k}) atomically.

    A family with its own on-disk names writes through its checkpoint module (DeepSeek-V4: layout="hf" or
    "original"); keyword arguments go to that writer or to `save_state_dict`.
    """
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    own = family(model.cfg.model_type).checkpoint
    if own is not None:
        return own.save(path, model.cfg, sd, **kwargs)
    save_state_dict(path, model.cfg, sd, **kwargs)


def _expert_items(name: str, t: torch.Tensor, cfg) -> list[Item] | str:
    """A fused expert tensor [E, parts·R, C] as per-expert disk tensors, each sliced out when its shard is written."""
    kind = fused_kind(name)
    if t.dim() != 3 or (kind == "gate_up_proj" and t.shape[1] % 2):
        return f"{name}: shape {list(t.shape)} is not a fused expert shape"
    parts = FUSED_PARTS[kind]
    rows = t.shape[1] // len(parts)
    nbytes = rows * t.shape[2] * t.element_size()
    items = []
    for j, dk in enumerate(dsalite_to_disk_names(name, cfg, t.shape[0])):
        e, p_i = divmod(j, len(parts))
        a, b = p_i * rows, (p_i + 1) * rows
        items.append((dk, lambda e=e, a=a, b=b: t[e, a:b].detach().cpu().clone(memory_format=torch.contiguous_format),
                      nbytes))
    return items


def disk_items(state_dict: Mapping[str, torch.Tensor], cfg) -> list[Item]:
    """(disk name, producer, nbytes) for every tensor to write; every problem in one CheckpointError."""
    items, problems, writer = [], [], {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name}: not a tensor ({type(t).__name__})")
            continue
        if t.device.type == "meta":
            problems.append(f"{name}: is on the meta device (no data to save)")
            continue
        if fused_kind(name):
            got = _expert_items(name, t, cfg)
            if isinstance(got, str):
                problems.append(got)
                continue
        else:
            got = [(dsalite_to_disk_name(name, cfg), lambda t=t: t.detach().cpu(), t.numel() * t.element_size())]
        for dk, _, _ in got:
            if dk in writer:
                problems.append(f"{name}: writes {dk}, which {writer[dk]} writes too")
            writer[dk] = name
        items += got
    if problems:
        raise CheckpointError("cannot save state dict:\n" + "\n".join(problems))
    return items


def _hf_config(cfg, state_dict) -> dict:
    """cfg.to_hf(), minus a `quantization_config` inherited from an FP8 source when nothing written is quantised."""
    d = cfg.to_hf()
    if "quantization_config" in d and not any(
        isinstance(t, torch.Tensor) and t.dtype in _QUANTISED for t in state_dict.values()
    ):
        d.pop("quantization_config")
    return d


def _check_extra_files(extra_files: Mapping[str, bytes], taken: list[str]) -> None:
    for fname, data in extra_files.items():
        bad = os.path.isabs(fname) or ".." in fname.replace("\\", "/").split("/") or not fname
        if bad or not isinstance(data, (bytes, bytearray)):
            raise CheckpointError(f"extra_files[{fname!r}]: must be a relative path inside the checkpoint, with bytes")
        if fname in taken:
            raise CheckpointError(f"extra_files[{fname!r}]: clashes with a file the checkpoint itself writes")


def save_state_dict(
    path: str,
    cfg,
    state_dict: Mapping[str, torch.Tensor],
    *,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: Mapping[str, bytes] | None = None,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Write an HF-layout checkpoint (per-expert tensors, MTP at model.layers.{L+k}) atomically (`io.atomic_dir`).

    `rename` maps each of those disk names to another layout's (a family's name table). Everything is checked
    before anything is written; `path` is replaced whole, or left as it was when anything fails.
    """
    items = disk_items(state_dict, cfg)
    if rename is not None:
        items = [(rename(dk), fn, nb) for dk, fn, nb in items]
    config = _hf_config(cfg, state_dict)
    shards, names = plan_shards(items, lambda item: item[2], max_shard_bytes)
    extra_files = dict(extra_files or {})
    _check_extra_files(extra_files, [CONFIG_NAME, INDEX_NAME, *names])
    with atomic_dir(path) as tmp:
        write_json(os.path.join(tmp, CONFIG_NAME), config)
        write_shards(tmp, shards, names, "saving")
        for fname, data in extra_files.items():
            p = os.path.join(tmp, fname)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
