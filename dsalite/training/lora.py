"""LoRA adapters (W + (alpha/r)·B·A) on chosen projections, applied to a built model from outside; saved separately,
merged back into plain weights for export.

Target groups: "attention" (q_a/q_b/q_proj, kv_a_proj_with_mqa, o_proj), "indexer" (wq_b, wk, weights_proj of full
layers; shared IndexShare layers have no indexer, hence no adapter), "mlp" (dense MLP and shared experts),
"experts" (the fused 3-D routed-expert weights, one A/B pair per expert). kv_b_proj is left alone: the sparse path
reads its weight directly (absorbed form), which an unmerged adapter would bypass.
Linear adapters run unmerged (x·Aᵀ·Bᵀ beside the frozen base); expert adapters are a parametrization that adds the
per-expert B·A to the fused tensor.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn
from torch.nn.utils import parametrize

from dsalite.checkpoint.io import atomic_dir, write_json
from dsalite.layers.linear import Linear, dense
from dsalite.layers.moe import Experts

GROUPS = {
    # MLA; V4 adds kv_proj and o_b_proj (its grouped o_a_proj is not an nn.Linear and takes no adapter)
    "attention": ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa",
                  "self_attn.o_proj", "self_attn.kv_proj", "self_attn.o_b_proj"),
    "indexer": ("indexer.wq_b", "indexer.wk", "indexer.weights_proj", "indexer.q_b_proj", "scorer.weights_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "shared_experts.gate_proj", "shared_experts.up_proj",
            "shared_experts.down_proj"),
    "experts": (),
}
ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


class LoRALinear(nn.Linear):
    """nn.Linear plus a trainable low-rank update; the base weight keeps its name so checkpoints still map."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias) + self.scale * dense(dense(x, self.lora_A), self.lora_B)

    def merged(self) -> nn.Linear:
        out = Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * self.lora_B @ self.lora_A)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class ExpertLoRA(nn.Module):
    """Parametrization of a fused expert weight [E, O, I]: adds scale · B[e] @ A[e] to every expert's slice."""

    def __init__(self, w: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        E, O, I = w.shape
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(E, rank, I, dtype=w.dtype) / math.sqrt(I))
        self.lora_B = nn.Parameter(torch.zeros(E, O, rank, dtype=w.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * torch.bmm(self.lora_B, self.lora_A)


def _check_groups(targets: list[str]) -> None:
    bad = [t for t in targets if t not in GROUPS]
    if bad:
        raise ValueError(f"lora target {bad[0]!r} is unknown; expected some of {sorted(GROUPS)}")


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], seed: int = 0) -> list[str]:
    """Freeze the model, add adapters on the target groups; returns the adapted module names."""
    _check_groups(targets)
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    suffixes = tuple(s for t in targets for s in GROUPS[t])
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and suffixes and name.endswith(suffixes):
            parent, attr = _parent(model, name)
            setattr(parent, attr, LoRALinear(mod, rank, alpha))
            done.append(name)
        elif isinstance(mod, Experts) and "experts" in targets:
            for pname in ("gate_up_proj", "down_proj"):
                parametrize.register_parametrization(mod, pname, ExpertLoRA(getattr(mod, pname), rank, alpha))
                getattr(mod.parametrizations, pname).original.requires_grad_(False)
            done.append(name)
    if not done:
        raise ValueError(f"lora targets {targets} matched no module of this model")
    return done


def _parent(model: nn.Module, name: str):
    head, _, attr = name.rpartition(".")
    return (model.get_submodule(head) if head else model), attr


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def save_adapters(model: nn.Module, path: str, rank: int, alpha: float, targets: list[str]) -> None:
    """adapter.safetensors + adapter_config.json in `path`, written atomically (`checkpoint.io.atomic_dir`)."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file(adapter_state(model), os.path.join(tmp, ADAPTER_FILE))
        write_json(os.path.join(tmp, CONFIG_FILE), {"rank": rank, "alpha": alpha, "targets": targets})


def load_adapters(model: nn.Module, path: str) -> None:
    """Apply the adapters saved at `path` to a base model (shapes checked, every adapter tensor required)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_FILE)) as f:
        c = json.load(f)
    apply_lora(model, c["rank"], c["alpha"], c["targets"])
    saved = load_file(os.path.join(path, ADAPTER_FILE))
    want = adapter_state(model)
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or extra:
        raise ValueError(f"{path}: adapters do not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, t in saved.items():
        if t.shape != want[k].shape:
            raise ValueError(f"{path}: adapter {k} has shape {tuple(t.shape)}, expected {tuple(want[k].shape)}")
    model.load_state_dict(saved, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving plain modules (what save_pretrained exports)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            parent, attr = _parent(model, name)
            setattr(parent, attr, mod.merged())
        elif isinstance(mod, Experts) and parametrize.is_parametrized(mod):
            for pname in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
