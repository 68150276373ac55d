"""The family registry: `model_type` → the pieces a family adds on top of the shared MLA stack.

The MLA families (glm_moe_dsa, deepseek_v32, deepseek_v3) are the shared code itself: their entries hold no hooks.
A family that differs more (DeepSeek-V4 today) is a package under `dsalite/families/` that imports the shared
modules and registers what it adds — its config mapping, decoder blocks, cache, checkpoint name table, GGUF writer,
parity extras. Shared modules look those up here by `model_type` and never import a family module themselves; this
file imports no family either (a family package is loaded by name the first time its `model_type` is asked for).
Where V4 differs from the MLA families is therefore `dsalite/families/deepseek_v4/` and the primitives in
`dsalite/layers/` it builds on.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

MLA_FAMILIES = ("glm_moe_dsa", "deepseek_v32", "deepseek_v3")
# model_type -> the package that registers it on import
_PACKAGES = {"deepseek_v4": "dsalite.families.deepseek_v4"}
FAMILIES = MLA_FAMILIES + tuple(_PACKAGES)


@dataclass(frozen=True)
class Family:
    """What a family adds; None means the shared MLA implementation.

    config      module with from_hf(cls, d) -> ModelConfig, to_hf(cfg) -> dict, validate(cfg)
    block       (cfg, layer_idx) -> decoder block; forward(x, ctx, topk_in) -> (x, topk)
    mtp_layer   (cfg, depth, own_embeddings) -> MTP layer; step(h, next_ids, ctx, embed, head, topk_in)
    norm        (dim, eps) -> the final norm module
    cache       the decode cache class (cfg, batch, capacity, layers=, dtype=, device=)
    checkpoint  module with on_disk(reader, cfg) -> OnDisk, load(on_disk, state, dtype) -> state dict,
                save(path, cfg, state_dict, **kw)
    gguf        module with problems, metadata, tensor_plan, mtp_path, config_from_metadata, load
    verify      module with the family's extra parity checks (fill_topk)
    """

    model_type: str
    config: Any = None
    block: Callable | None = None
    mtp_layer: Callable | None = None
    norm: Callable | None = None
    cache: type | None = None
    checkpoint: Any = None
    gguf: Any = None
    verify: Any = None


_REGISTRY: dict[str, Family] = {mt: Family(mt) for mt in MLA_FAMILIES}


def register(family: Family) -> Family:
    _REGISTRY[family.model_type] = family
    return family


def family(model_type: str) -> Family:
    """The registered family of `model_type` (KeyError naming the known ones otherwise)."""
    if model_type not in _REGISTRY and model_type in _PACKAGES:
        importlib.import_module(_PACKAGES[model_type])
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise KeyError(f"model_type={model_type!r} is unknown; expected one of {', '.join(FAMILIES)}") from None
