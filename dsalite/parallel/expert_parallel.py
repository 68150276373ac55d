"""Expert parallelism: routed experts split over the `ep` mesh dimension, tokens sent to the ranks that own them.

Legend: N tokens on this rank, k experts per token, D hidden, E routed experts, P = ep ranks, El = E / P experts per
rank, R rows this rank receives. Expert e lives on ep rank e // El (contiguous blocks, `Shard(0)` of the fused
[E, ·, ·] weights).

One MoE call (`dispatch_combine`), in the order DeepSeek's and torchtitan's EP use:
  1. sort the N·k (token, slot) pairs by expert (stable), count them per expert                 counts [E]
  2. exchange the counts with all_to_all_single (El per peer)            recv [P, El] rows from peer p for expert e
  3. send the sorted token rows, split by destination rank (all_to_all_single, variable splits)    → [R, D]
  4. regroup the received rows by local expert (source ranks in order inside each expert), run each expert once
  5. undo the regrouping, send the rows back (the reverse all_to_all_single), weight them by the router and sum
     the k slots of every token.
The received rows of expert e are ordered by source rank, then by token: with rank r holding rows
[r·B/P, (r+1)·B/P) of the global batch this is exactly the order a single process feeds expert e, so each expert
runs the same matrix product as in one process and the output equals `Experts.forward` bit for bit (tested).

Applied from outside (`apply_expert_parallel`): each `Experts` module's weights become DTensors sharded over the ep
mesh and its `forward` is replaced by `dispatch_combine` on the local shard; the model code stays free of
torch.distributed. The router, the shared expert and everything else stay replicated (then FSDP-sharded as usual).
Both all-to-alls are autograd functions whose backward is the reverse exchange, so activation recompute (which
re-runs the forward inside backward) works unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from dsalite.layers.linear import dense
from dsalite.layers.moe import Experts, swiglu


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits along dim 0; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits), *g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [E] (rows this rank sends to each expert) → [P, El]: rows each peer sends to each local expert."""
    P = dist.get_world_size(group)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)
    return recv.view(P, -1)


def local_weights(experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's [El, 2I, D] and [El, D, I] expert weights (the local shards of the ep-sharded DTensors)."""
    w1, w2 = experts.gate_up_proj, experts.down_proj
    return (w1.to_local() if hasattr(w1, "to_local") else w1), (w2.to_local() if hasattr(w2, "to_local") else w2)


def dispatch_combine(experts: Experts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, group) -> torch.Tensor:
    """`Experts.forward` across the ep group: x [N, D], ids/w [N, k] (global expert ids) → [N, D]."""
    N, k = ids.shape
    gate_up, down = local_weights(experts)
    El = gate_up.shape[0]
    P = dist.get_world_size(group)
    E = El * P
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, hence by destination rank
    counts = torch.bincount(flat, minlength=E)
    recv = exchange_counts(counts, group)  # [P, El]
    send_splits = counts.view(P, El).sum(1).tolist()
    recv_splits = recv.sum(1).tolist()
    xr = all_to_all(x.index_select(0, order // k), recv_splits, send_splits, group)  # [R, D] by source, expert

    # regroup by local expert: a stable sort of the received rows by their expert keeps the source order inside it
    expert_of_row = torch.arange(El, device=x.device).repeat(P).repeat_interleave(recv.reshape(-1))
    perm = torch.argsort(expert_of_row, stable=True)
    per_expert = recv.sum(0).tolist()
    xs = xr.index_select(0, perm).split(per_expert)
    ys = [dense(swiglu(*dense(xs[e], gate_up[e]).chunk(2, dim=-1), limit=experts.limit), down[e])
          for e, cnt in enumerate(per_expert) if cnt]
    if ys:
        ye = torch.cat(ys)
    else:  # no row came here: stay on the autograd graph, so that this rank's backward still joins the reverse
        # exchange (its peers wait for it) and the expert weights get (zero) gradients like everyone else's
        ye = xr + 0.0 * (gate_up.sum() + down.sum())
    back = torch.empty_like(perm)
    back[perm] = torch.arange(perm.numel(), device=perm.device)
    yb = all_to_all(ye.index_select(0, back), send_splits, recv_splits, group)  # [N·k, D] in `order`

    yb = yb * w.reshape(-1)[order, None].to(yb.dtype)
    slot_of = torch.empty_like(order)
    slot_of[order] = torch.arange(order.numel(), device=order.device)
    return yb.index_select(0, slot_of).view(N, k, -1).sum(1)


def shard_experts(experts: Experts, ep_mesh) -> None:
    """Replace the fused expert weights by DTensors Shard(0) over `ep_mesh` holding this rank's block of experts.
    Every rank built the same full weights (same seed or the same checkpoint), so no data moves."""
    from torch.distributed.tensor import DTensor, Shard

    P, r = ep_mesh.size(), ep_mesh.get_local_rank()
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(experts, name)
        local = p.detach().chunk(P, dim=0)[r].clone()
        d = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
        setattr(experts, name, nn.Parameter(d, requires_grad=p.requires_grad))


def apply_expert_parallel(model: nn.Module, ep_mesh) -> list[str]:
    """Shard every routed-expert module of `model` over `ep_mesh` and route its forward through `dispatch_combine`.
    Returns the names of the modules changed."""
    done = []
    for name, mod in model.named_modules():
        if not isinstance(mod, Experts):
            continue
        E = mod.gate_up_proj.shape[0]
        if E % ep_mesh.size():
            raise ValueError(f"{name}: {E} experts do not split over ep={ep_mesh.size()} ranks")
        shard_experts(mod, ep_mesh)
        mod.forward = functools.partial(dispatch_combine, mod, group=ep_mesh.get_group())
        done.append(name)
    return done
