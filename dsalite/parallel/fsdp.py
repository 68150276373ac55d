"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied to a built Transformer, and the global gradient norm.

Units, innermost first (a module's parameters belong to the innermost unit that holds them):
  every indexer, only when the indexers alone train (the DSA warm-up stage; see `indexers_alone_train`)
  routed experts of every MoE block (only under expert parallelism: they live on the expert mesh, see mesh.py)
  every decoder block `model.layers[i]` and every MTP layer (`step` is registered as a forward method, since the
    trainer calls `mtp_forward` → `layer.step`, not the layer's `forward`)
  the input embeddings, when they are not tied to the head
  the root: final norm and head (and tied embeddings). The root is not resharded after forward: the fused head +
    cross-entropy (`losses.head_lm_loss`) reads the head weight after the forward returns.
Gradients are summed, not averaged, across ranks (`set_gradient_divide_factor(1)`): the trainer already scales each
rank's loss to its share of the global-batch mean (data_parallel.py), so the sum is the one-process gradient.
On CPU everything stays fp32; `param_dtype=bf16` gathers bf16 parameters for compute with fp32 gradient reduction
(the GPU setting).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from dsalite.layers.moe import Experts


def apply_fsdp(model: nn.Module, dense_mesh, experts_mesh=None, param_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True) -> list[FSDPModule]:
    """Shard `model` (a Transformer) in place; returns the FSDP modules in the order they were wrapped."""
    # cast_forward_inputs off: FSDP would rebuild the Context dataclass of every block call to cast it (the embedding
    # output already has the parameters' dtype); None when fp32, so nothing is cast at all
    mp = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    units: list[FSDPModule] = []

    def shard(mod, mesh, reshard=reshard_after_forward):
        fully_shard(mod, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        units.append(mod)

    layers = list(model.model.layers.values()) + list(model.mtp)
    apart = indexers_alone_train(model)
    for layer in layers:
        for m in (layer.modules() if apart else ()):
            if _is_indexer(m):
                shard(m, dense_mesh)
                for method in INDEXER_METHODS:
                    if hasattr(m, method):
                        register_fsdp_forward_method(m, method)
        if experts_mesh is not None:
            for m in layer.modules():
                if isinstance(m, Experts):
                    shard(m, experts_mesh)
        shard(layer, dense_mesh)
    for layer in model.mtp:
        register_fsdp_forward_method(layer, "step")
    if not model.cfg.tie_word_embeddings and model.model.embed_tokens is not None:  # None: a later pipeline stage
        shard(model.model.embed_tokens, dense_mesh)
    shard(model, dense_mesh, reshard=False)
    for u in units:  # plain sums (no PREMUL_SUM, which gloo lacks)
        u.set_gradient_divide_factor(1.0)
        u.set_force_sum_reduction_for_comms(True)
    return units


# The indexers' entry points besides forward (the MLA indexer's projections; the CSA indexer's queries and its keys
# of packed documents): FSDP2 unshards around each and hooks its outputs for backward.
INDEXER_METHODS = ("project", "queries", "documents")


def _is_indexer(m: nn.Module) -> bool:
    from dsalite.layers.compressor import CSAIndexer
    from dsalite.layers.indexer import Indexer

    return isinstance(m, (Indexer, CSAIndexer))


def indexers_alone_train(model: nn.Module) -> bool:
    """Whether every trainable parameter lies in an indexer (the DSA warm-up stage). Then each indexer is an FSDP
    unit of its own: it learns from detached inputs, so no block output needs a gradient and a block unit's backward
    hooks would never fire, while the indexer unit's outputs do carry gradients, which makes FSDP2 gather its weights
    for backward and reduce-scatter their gradients (in its final callback, since its inputs need none)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    owners = [n for n, m in model.named_modules() if _is_indexer(m)]
    return bool(trainable) and all(any(n.startswith(o + ".") for o in owners) for n in trainable)


def _copies(t: DTensor, world: int) -> int:
    """How many ranks hold the same local piece of `t`: the ranks outside its mesh (other replicas of the mesh)
    times its replicated mesh dimensions. (Counting sharded dimensions instead would miss FSDP's `_StridedShard`
    on expert weights, which is not a `Shard`.)"""
    return world // t.device_mesh.size() * math.prod(
        t.device_mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, world_group=None, copies_group=None) -> float:
    """`torch.nn.utils.clip_grad_norm_` for gradients sharded over any meshes (dense and expert meshes mixed): the
    squares of every local shard are summed, each divided by the number of ranks holding a copy of it, summed over
    the world, and every gradient is scaled by min(1, max_norm / (norm + 1e-6)) as torch does. Returns the norm.
    copies_group: where copies are counted when it is not the whole world (pipeline stages hold other parameters:
    a stage's ranks)."""
    world = dist.get_world_size(copies_group if copies_group is not None else world_group)
    total = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        grads.append(g)
        if isinstance(g, DTensor):
            local, copies = g.to_local(), _copies(g, world)
        else:
            local, copies = g, world
        total += local.detach().double().pow(2).sum().cpu() / copies
    dist.all_reduce(total, group=world_group)
    norm = total.sqrt().float()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return float(norm)
