"""`from_pretrained`: an HF checkpoint directory → a dsalite Transformer.

config.json is read once and the files are opened once. The family's checkpoint module (or, for the MLA families,
the two functions below) says what the files hold — the config fitted to them (MTP present or not), the tensors in
`names.py` naming — and which dtype each tensor loads as; the model is then built on the meta device and its tensors
are assigned once (no double init). Validation and dequantisation are `load.py`'s; writing is `save.py`'s.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from dsalite.checkpoint.io import CheckpointError, CheckpointReader, read_config
from dsalite.checkpoint.load import OnDisk, load_state_dict
from dsalite.checkpoint.names import detect_mtp, missing_mtp_keys, optional_mtp_keys
from dsalite.config import ModelConfig
from dsalite.families import family
from dsalite.model import Transformer, build_model

log = logging.getLogger("dsalite")


def from_pretrained(
    path: str, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Load an HF-layout checkpoint directory (single or sharded safetensors, plain or FP8/FP4 block-quantised).

    dtype=None keeps every tensor's stored dtype (used for byte-exact round trips); FP8 weights are then
    dequantised to float32.
    """
    cfg = ModelConfig.from_hf(read_config(path))
    own = family(cfg.model_type).checkpoint
    on_disk, load = (own.on_disk, own.load) if own is not None else (_on_disk, _load)
    with CheckpointReader(path) as reader:
        files = on_disk(reader, cfg)
        with torch.device("meta"):
            model = build_model(files.cfg, mtp_own_embeddings=files.mtp_own_embeddings)
        sd = load(files, model.state_dict(), dtype)
    model.load_state_dict(sd, assign=True, strict=True)
    model.checkpoint_layout = files.layout
    return model.to(device).eval()


def _on_disk(reader: CheckpointReader, cfg: ModelConfig) -> OnDisk:
    """The MLA families: the config without its MTP layers when none is on disk (transformers drops them on save);
    a partly present MTP layer is an error; whether the MTP layers have their own embedding and head."""
    state = detect_mtp(reader, cfg)
    if not cfg.num_nextn_predict_layers or state == "present":
        present = optional_mtp_keys(reader, cfg)
        return OnDisk(reader, cfg, mtp_own_embeddings=all(present.values()) if present else True)
    if state == "absent":
        log.warning(
            "%s declares num_nextn_predict_layers=%d but holds no MTP weights (transformers drops them on save); "
            "loading without the MTP layer", reader.path, cfg.num_nextn_predict_layers,
        )
        L = cfg.num_hidden_layers
        return OnDisk(reader, dataclasses.replace(cfg, num_nextn_predict_layers=0, indexer_types=cfg.indexer_types[:L]))
    L = cfg.num_hidden_layers
    if f"model.layers.{L}.enorm.weight" not in reader and f"model.layers.{L}.input_layernorm.weight" in reader:
        raise CheckpointError(
            f"{reader.path}: config.json says num_hidden_layers={L}, but model.layers.{L} holds a decoder block "
            "without the MTP tensors (enorm, hnorm, eh_proj): num_hidden_layers does not match the weights"
        )
    raise CheckpointError(
        f"{reader.path}: the MTP layer is only partly present; missing tensors:\n  "
        + "\n  ".join(missing_mtp_keys(reader, cfg))
    )


def _load(files: OnDisk, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The MLA families: every tensor as `dtype`, the router's selection bias as float32 (as HF loads it)."""
    expected = {}
    for name, t in state.items():
        want = torch.float32 if name.endswith("e_score_correction_bias") and dtype is not None else dtype
        expected[name] = (t.shape, want)
    return load_state_dict(files.tensors, files.cfg, expected, dtype=dtype)
