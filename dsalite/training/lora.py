"""LoRA adapters (W + (alpha/r)·B·A) on chosen projections, applied to a built model from outside; saved separately,
merged back into plain weights for export.

Target groups: "attention" (q_a/q_b/q_proj, kv_a_proj_with_mqa, o_proj), "indexer" (wq_b, wk, weights_proj of full
layers; shared IndexShare layers have no indexer, hence no adapter), "mlp" (dense MLP and shared experts),
"experts" (the fused 3-D routed-expert weights, one A/B pair per expert). kv_b_proj is left alone: the sparse path
reads its weight directly (absorbed form), which an unmerged adapter would bypass.
Linear adapters run unmerged (x·Aᵀ·Bᵀ beside the frozen base); expert adapters are a parametrization that adds the
per-expert B·A to the fused tensor.
Saved in PEFT's format (`checkpoint/peft.py`): transformers' `PeftModel.from_pretrained` loads the linear adapters,
and `load_adapters` also takes a PEFT LoRA adapter trained on transformers' model.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from dsalite.checkpoint import peft
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
EXTRA_FILE = "adapter_dsalite.safetensors"  # adapters PEFT has no equivalent for (fused experts, MTP layers)
META_FILE = "adapter_dsalite.json"  # rank, alpha, target groups: what `load_adapters` re-applies


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


# Families whose transformers checkpoints use the qwen2_moe expert conversion: under transformers 5, PEFT (0.21)
# rewrites every LoRA target named gate_proj / up_proj / down_proj of such a model into an adapter on the fused
# experts (`peft.utils.transformers_weight_conversion._convert_peft_config_moe`, for v4-era adapters), so a PEFT
# adapter cannot name the dense MLP or the shared experts there.
_FUSED_EXPERT_RENAMES = ("glm_moe_dsa", "deepseek_v32", "deepseek_v3")


def _outside_peft(name: str, model_type: str) -> str | None:
    """Why PEFT on transformers' model cannot hold the adapter of module `name` (None: it can)."""
    if name.startswith("mtp."):
        return "mtp"  # transformers does not build MTP layers
    if model_type in _FUSED_EXPERT_RENAMES and name.endswith(("gate_proj", "up_proj", "down_proj")):
        return "mlp"
    return None


def save_adapters(model: nn.Module, path: str, rank: int, alpha: float, targets: list[str]) -> None:
    """The adapters in PEFT's files (`checkpoint/peft.py`): every linear adapter of the trunk in
    adapter_model.safetensors under transformers' module names, so `peft.PeftModel.from_pretrained(hf_model, path)`
    applies them; what PEFT has no equivalent for — fused-expert adapters and MTP layers' — goes to
    `adapter_dsalite.safetensors` beside it (a warning says so: PEFT's model then differs by those adapters), and
    adapter_dsalite.json the rank, alpha and target groups, so `load_adapters` restores everything. Written
    atomically."""
    model_type = model.cfg.model_type
    linear, outside = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            why = _outside_peft(name, model_type)
            if why is None:
                linear[name] = (mod.lora_A, mod.lora_B)
            else:
                outside.setdefault(why, []).append(name)
    linear_keys = {f"{n}.lora_{x}" for n in linear for x in "AB"}
    other = {k: v for k, v in adapter_state(model).items() if k not in linear_keys}
    experts = sorted({k.split(".parametrizations.")[0] for k in other if ".parametrizations." in k})
    if experts:
        outside["experts"] = experts
    reasons = {"experts": "fused experts have no PEFT equivalent (its adapters wrap nn.Linear modules)",
               "mlp": f"PEFT turns gate_proj/up_proj/down_proj targets of a {model_type} model into fused-expert "
                      f"adapters under transformers 5",
               "mtp": "transformers does not build MTP layers"}
    for why in ("experts", "mlp"):  # MTP adapters change no logits of transformers' model: no warning
        if why in outside:
            names = outside[why]
            warnings.warn(f"LoRA on {len(names)} modules (e.g. {names[0]}) saved in {EXTRA_FILE} for dsalite only: "
                          f"{reasons[why]}; peft.PeftModel on transformers' model will not apply them (merge the "
                          f"adapters and export the model instead)", stacklevel=2)
    meta = {"rank": rank, "alpha": alpha, "targets": targets, "extra_file": EXTRA_FILE if other else None,
            "peft_modules": len(linear),
            "not_in_peft": {why: reasons[why] for why in sorted(outside)}}
    peft.write(path, linear, rank, alpha, {META_FILE: meta, **({EXTRA_FILE: other} if other else {})})


def load_adapters(model: nn.Module, path: str) -> list[str]:
    """Apply the adapters at `path` to a base model: dsalite's own (`save_adapters`, every target restored) or a
    PEFT LoRA adapter trained elsewhere on transformers' model (per-module rank and scale as saved). Shapes are
    checked and every adapter tensor is required; returns the adapted module names."""
    from safetensors.torch import load_file

    peft.read_config(path)
    if not os.path.exists(os.path.join(path, META_FILE)):
        return _load_foreign(model, path)
    with open(os.path.join(path, META_FILE)) as f:
        c = json.load(f)
    done = apply_lora(model, c["rank"], c["alpha"], c["targets"])
    saved = {} if not c["peft_modules"] else {
        f"{name}.lora_{x}": t for name, (a, b, _) in peft.read(path).items() for x, t in (("A", a), ("B", b))}
    if c.get("extra_file"):
        saved.update(load_file(os.path.join(path, c["extra_file"])))
    want = adapter_state(model)
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or extra:
        raise ValueError(f"{path}: adapters do not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, t in saved.items():
        if t.shape != want[k].shape:
            raise ValueError(f"{path}: adapter {k} has shape {tuple(t.shape)}, expected {tuple(want[k].shape)}")
    model.load_state_dict(saved, strict=False)
    return done


def _load_foreign(model: nn.Module, path: str) -> list[str]:
    """A PEFT adapter from elsewhere: wrap exactly the modules it names (transformers' names are dsalite's)."""
    adapters = peft.read(path)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (a, b, scale) in sorted(adapters.items()):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: adapter on {name!r}, which this {model.cfg.model_type} model does not have "
                             f"(PEFT names are transformers' module names)") from None
        if not isinstance(mod, nn.Linear) or isinstance(mod, LoRALinear):
            raise ValueError(f"{path}: adapter on {name!r}, a {type(mod).__name__}: only plain linear modules take "
                             f"a PEFT LoRA adapter here")
        if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features:
            raise ValueError(f"{path}: {name}: adapter maps {a.shape[1]} -> {b.shape[0]} features, the module "
                             f"{mod.in_features} -> {mod.out_features}")
        r = a.shape[0]
        lora = LoRALinear(mod, r, scale * r)
        with torch.no_grad():
            lora.lora_A.copy_(a)
            lora.lora_B.copy_(b)
        parent, attr = _parent(model, name)
        setattr(parent, attr, lora)
    return sorted(adapters)


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
