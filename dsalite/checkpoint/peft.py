"""LoRA adapters in PEFT's files: `adapter_config.json` + `adapter_model.safetensors`, keyed by transformers' module names.

PEFT (huggingface/peft, `PeftModel.save_pretrained`) stores a LoRA adapter of module X of a causal LM as
`base_model.model.X.lora_A.weight` [r, in] and `base_model.model.X.lora_B.weight` [out, r]; its config names the
wrapped modules (`target_modules`), r / lora_alpha (and per-module `rank_pattern` / `alpha_pattern`), and the update
is scale·B·A with scale = alpha / r (alpha / √r with `use_rslora`). dsalite keeps transformers' in-memory module names
(`checkpoint/names.py`), so X is a dsalite module name too. This module only reads and writes the files; which modules
carry adapters is `training/lora.py`'s business. Variants PEFT can save that plain LoRA cannot express here (DoRA,
fan_in_fan_out, trained biases, modules_to_save, adapters on parameters) are refused by name.
"""

from __future__ import annotations

import json
import os
import re

import torch

from dsalite.checkpoint.io import atomic_dir, write_json

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def peft_config(modules: list[str], rank: int, alpha: float) -> dict:
    """The adapter_config.json of a plain LoRA adapter on exactly `modules`. target_modules is one regex that PEFT
    full-matches against module names: a list would be shortened to suffixes (PEFT does so past 20 names), and
    transformers' PEFT integration turns suffixes like `gate_proj` into adapters on the fused experts' parameters."""
    names = "|".join(re.escape(m) for m in sorted(modules))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
        "r": rank, "lora_alpha": alpha, "target_modules": f"(?:{names})", "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write(path: str, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float,
          extra_files: dict[str, dict] | None = None) -> None:
    """adapters: module name -> (A [r, in], B [out, r]), all of rank `rank` and scale alpha / rank. Written atomically,
    with `extra_files` beside them (name -> tensors for .safetensors, else a JSON object)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (a, b) in adapters.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().contiguous().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().contiguous().clone()
    with atomic_dir(path) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        for fname, obj in (extra_files or {}).items():
            if fname.endswith(".safetensors"):
                save_file(obj, os.path.join(tmp, fname), metadata={"format": "pt"})
            else:
                write_json(os.path.join(tmp, fname), obj)
        write_json(os.path.join(tmp, CONFIG_FILE), peft_config(list(adapters), rank, alpha))


def read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a PEFT or dsalite adapter directory)")
    with open(file) as f:
        return json.load(f)


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's per-module override: the first key k with name matching `(.*\\.)?k$`."""
    for k, v in patterns.items():
        if re.match(rf"(.*\.)?({k})$", name):
            return v
    return default


def read(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A PEFT LoRA adapter: module name -> (A [r, in], B [out, r], scale). Refuses what plain LoRA is not."""
    from safetensors.torch import load_file

    c = read_config(path)
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {c.get('peft_type')!r} is not supported (only LORA)")
    refuse = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
              "modules_to_save": "modules_to_save (fully trained module copies)",
              "target_parameters": "adapters on parameters (target_parameters, e.g. fused experts)"}
    for key, what in refuse.items():
        if c.get(key):
            raise ValueError(f"{path}: {key} = {c[key]!r}: {what} is not supported; plain LoRA on linear modules is")
    if c.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias = {c['bias']!r}: trained biases are not supported (bias must be 'none')")
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(file).items():
        m = _KEY_RE.match(key)
        if m is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA A/B weight under {PREFIX!r}")
        parts.setdefault(m.group(1), {})[m.group(2)] = t
    out = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {name} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise ValueError(f"{path}: {name}: lora_A is [{r}, {a.shape[1]}] but lora_B is {list(b.shape)}")
        alpha = _pattern_value(name, c.get("alpha_pattern") or {}, c.get("lora_alpha", 8))
        out[name] = (a, b, alpha / (r**0.5 if c.get("use_rslora") else r))
    if not out:
        raise ValueError(f"{path}: {WEIGHTS_FILE} holds no LoRA weights")
    return out
