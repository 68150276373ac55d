"""Data parallelism in the trainer: each rank's slice of the global batch, each rank's share of the global losses,
and the sums that make metrics and router loads global.

The losses are means over the global batch (CE and MTP over tokens with a label, the indexer KL over query rows
that see a key, the balance loss over sequences). A rank's share of such a mean is its own sum divided by the
global count, i.e. its local mean × n_local / n_global; the counts are all-reduced before backward. The shares of
all ranks add up to the one-process loss, so with gradients *summed* across ranks (fsdp.py) the gradient is the
one-process gradient — whatever the number of valid tokens on each rank, which a mean of per-rank means would
get wrong. The counts are not differentiable, so none of this changes what autograd sees except by a constant.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.distributed as dist

from dsalite.training.losses import IGNORE, lm_loss


class OpaqueTerms(MutableMapping):
    """A dict-like holder for `DSATraining.terms` that FSDP2 does not look into.

    FSDP2 rebuilds dataclass and dict arguments of a sharded module's forward that hold tensors needing grad (to hook
    its post-backward on them) or that it casts or moves; `Context.dsa.terms` holds the indexer losses of earlier
    layers, so each block would add its loss to a copy and the trainer would never see it. A mapping that is neither
    a dict nor a dataclass is passed through as is, so every block writes into the one object the trainer reads."""

    def __init__(self):
        self._d = {}

    def __getitem__(self, k):
        return self._d[k]

    def __setitem__(self, k, v):
        self._d[k] = v

    def __delitem__(self, k):
        del self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


class DataParallel:
    def __init__(self, rank: int, size: int, group):
        self.rank, self.size, self.group = rank, size, group

    @staticmethod
    def opaque_terms() -> OpaqueTerms:
        return OpaqueTerms()

    def local(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (rank r takes rows [r·B/P, (r+1)·B/P))."""
        n = indices.shape[0] // self.size
        return indices[self.rank * n:(self.rank + 1) * n]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) over the data-parallel ranks, out of place."""
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t

    def fractions(self, counts: list[torch.Tensor]) -> list[torch.Tensor]:
        """n_local / n_global for each count (0 where the global count is 0), from one all-reduce."""
        local = torch.stack([c.to(torch.float64).cpu() for c in counts])
        total = self.sum(local)
        return [(local[i] / total[i]).float() if total[i] > 0 else torch.zeros((), dtype=torch.float32)
                for i in range(len(counts))]

    def mtp_loss(self, depth_logits: list[torch.Tensor], depth_labels: list[torch.Tensor]) -> torch.Tensor:
        """This rank's share of `losses.mtp_loss` over the global batch (each depth's CE mean is global)."""
        f = self.fractions([(lb != IGNORE).sum() for lb in depth_labels])
        return torch.stack([lm_loss(lg, lb) * fi.to(lg.device) for lg, lb, fi in
                            zip(depth_logits, depth_labels, f)]).mean()

    def shares(self, named: dict, labels: torch.Tensor, dsa, rows: int) -> dict:
        """Rescale the per-rank means in `named` (ce, kl, aux) to this rank's shares of the global means.
        ce: tokens with a label; kl: per indexer layer, query rows that see a key (`DSATraining.terms`); aux: rows."""
        terms = sorted(dsa.terms.items()) if dsa is not None and "kl" in named else []
        counts = [(labels != IGNORE).sum(), torch.tensor(rows)] + [n for _, (_, n) in terms]
        f = self.fractions(counts)
        out = dict(named)
        out["ce"] = named["ce"] * f[0].to(named["ce"].device)
        if "aux" in named:
            out["aux"] = named["aux"] * f[1].to(named["aux"].device)
        if terms:  # Σ over layers of (layer's local mean) × its fraction, as DSATraining.loss sums layer means
            out["kl"] = torch.stack([(s / n.clamp(min=1)) * fi.to(s.device)
                                     for (_, (s, n)), fi in zip(terms, f[2:])]).sum()
        return out

    def reduce_step(self, sums: dict[str, float], loads: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Global step metrics: the shares summed over ranks, router loads (tokens per expert) summed over ranks."""
        keys = sorted(sums)
        vec = self.sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        names = sorted(loads)
        if names:
            flat = self.sum(torch.cat([loads[n].reshape(-1).to(torch.float64).cpu() for n in names]))
            parts = flat.split([loads[n].numel() for n in names])
            loads = {n: p.to(loads[n].dtype).to(loads[n].device).view_as(loads[n]) for n, p in zip(names, parts)}
        return dict(zip(keys, vec.tolist())), loads
