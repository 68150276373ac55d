"""Muon for parameters sharded as DTensors (FSDP2, HSDP): the orthogonalisation sees whole matrices.

Muon's update is a Newton-Schulz orthogonalisation of the momentum, a function of the whole matrix (its norm and
X·Xᵀ products, in bf16): run on a rank's rows it would orthogonalise the wrong matrix, and through DTensor's
sharded matmuls the bf16 products would be summed in another order. So each step, per parameter: the momentum is
updated on the local shard (element-wise, as torch.optim.Muon does), the update is gathered whole (`full_tensor`,
every rank in the same order), orthogonalised with torch's own function on every rank alike, and each rank applies
its own rows. Given the same gradients the parameters equal torch.optim.Muon's in one process bit for bit (tested).
The cost is one all-gather of each 2-D hidden matrix per step, as the FSDP2 forward already does, plus the
Newton-Schulz work on every rank (the simple layout; distributing whole matrices round-robin would divide it).
Parameters that are plain tensors take torch.optim.Muon's own step.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


class ShardedMuon(torch.optim.Muon):
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not any(isinstance(p, DTensor) for p in group["params"]):
                self._plain_step(group)
                continue
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                whole = update.full_tensor() if isinstance(update, DTensor) else update
                ortho = _zeropower_via_newtonschulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if isinstance(p, DTensor):  # every rank holds the same `ortho`: each keeps its rows, no traffic
                    ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss

    def _plain_step(self, group) -> None:
        """torch.optim.Muon's step for one group of plain tensors."""
        saved = self.param_groups
        self.param_groups = [group]
        try:
            super().step()
        finally:
            self.param_groups = saved
