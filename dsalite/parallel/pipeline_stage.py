"""Pipeline-parallel training on torch.distributed.pipelining: a stage is the model with the other layers deleted.

`cut` deletes what a stage does not hold (pipeline.py decides the split); the stage runs `Transformer.forward`
itself (no embeddings: it starts from the received hidden state; no final norm: it returns its last block's output),
so FSDP2's root hooks and activation recompute work as in one process. A rank holds one stage (1F1B, GPipe) or
several (interleaved 1F1B, looped BFS: stage s on rank s mod pp, each its own `stage_model` and FSDP root); each
stage module is wrapped in a `PipelineStage` with static shapes, so no extra forward runs to infer them.

What travels between stages, per micro-batch: the hidden state [b, S, D] (and its gradient back), and with
`pp_carry_topk` the top-k of the last full layer (int32 [b, S, K]) across boundaries that begin with a shared layer.
Everything else a stage needs (token ids for V4's hash routing and MTP, positions, documents, labels) every rank
reads from the batch itself: the schedule hands each stage its micro-batch's index.

Losses are the one-process step's: every term is this micro-batch's share of the global-batch mean (the counts —
labelled tokens per MTP depth, query rows, rows — are known before the schedule runs and summed over the data-
parallel ranks), so the gradients summed over micro-batches and ranks are the one-process gradient. The last stage
returns CE + MTP (+ its own indexer KL and balance terms) as the schedule's loss; an earlier stage's indexer KL and
balance terms never reach the head, so `_AttachLoss` hangs them on the stage's output: its backward returns the
incoming gradient unchanged and starts the local loss's backward too.

Legend: P stages, M micro-batches, b rows per micro-batch, S sequence length, D hidden, K index_topk.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from dsalite.indexshare import NOT_GIVEN, source_layer
from dsalite.layers.mask import Visibility
from dsalite.parallel.mesh import LayoutError
from dsalite.parallel.pipeline import SCHEDULES, PipelineSpec, Split, carried, topk_width
from dsalite.training.losses import IGNORE, DSATraining, head_lm_loss, lm_loss, shifted_labels


def cut(model, split: Split, stages: list[int]) -> list:
    """Delete, in place, every part of `model` that none of this rank's `stages` holds; returns the stage models:
    `model` itself for one stage per rank, else one `stage_model` view per stage (interleaved and looped schedules)."""
    keep = {str(i) for s in stages for i in split.layers(s)}
    last = split.stages - 1
    for i in list(model.model.layers):
        if i not in keep:
            del model.model.layers[i]
    if 0 not in stages:
        model.model.embed_tokens = None
    if last not in stages:
        model.model.norm = None
        if hasattr(model.model, "hc_head"):
            del model.model.hc_head
        if hasattr(model, "lm_head"):
            del model.lm_head
        model.mtp = nn.ModuleList()
    elif any(not hasattr(layer, "embed_tokens") for layer in model.mtp):
        raise LayoutError("parallel.pp > 1: the MTP layers of this checkpoint use the main embeddings, which live on "
                          "the first stage; pipeline training needs MTP layers with their own embed_tokens")
    return [model] if len(stages) == 1 else [stage_model(model, split, s) for s in stages]


def stage_model(model, split: Split, s: int):
    """Stage s of `model` as a model of its own: a Transformer holding (sharing, not copying) only the modules stage
    s runs. Several stages on one rank are each their own FSDP root; `model` keeps owning every parameter (the
    optimizer, checkpoints and the export see it whole)."""
    first, last = s == 0, s == split.stages - 1
    c = type(model).__new__(type(model))
    nn.Module.__init__(c)
    c.cfg, c.tables = model.cfg, model.tables
    c.model = type(model.model).__new__(type(model.model))
    nn.Module.__init__(c.model)
    c.model.embed_tokens = model.model.embed_tokens if first else None
    c.model.layers = nn.ModuleDict({str(i): model.model.layers[str(i)] for i in split.layers(s)})
    if last and hasattr(model.model, "hc_head"):
        c.model.hc_head = model.model.hc_head
    c.model.norm = model.model.norm if last else None
    if last and hasattr(model, "lm_head"):
        c.lm_head = model.lm_head
    c.mtp = model.mtp if last else nn.ModuleList()
    return c


class _AttachLoss(torch.autograd.Function):
    """y = x in forward; in backward x gets y's gradient and `loss` gets 1, so a stage's own loss terms (indexer KL,
    balance) join the backward the schedule runs from the stage's output."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.meta = (loss.shape, loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.meta
        return g, torch.ones(shape, dtype=dtype, device=device)


class _StageModule(nn.Module):
    """What `PipelineStage` runs: the cut model, called with the received activations and the micro-batch index."""

    def __init__(self, runner: "Pipeline", k: int):
        super().__init__()
        self.model = runner.roots[k]
        self.runner, self.k = runner, k

    def forward(self, *acts, mb):
        return self.runner.stage_forward(acts, int(mb), self.k)


class Pipeline:
    """This rank's stage of a pipelined run; `train_step` takes one optimizer step's forward and backward."""

    def __init__(self, par, spec: PipelineSpec, split: Split):
        self.par, self.spec, self.split = par, spec, split
        rank = par.meshes.pp.get_local_rank()
        self.local = list(range(rank, split.stages, spec.pp))  # this rank's stages (looped: rank, rank + pp, ...)
        self.roots = None  # their models (`cut`)
        self.schedule = None
        self.sent = {}  # stage -> bytes it sent forward in its latest micro-batch: {"hidden": .., "topk": ..}

    def describe(self, cfg, seq_len: int) -> str:
        """One line for the run's summary: stages, schedule, split and what a carried top-k costs."""
        from dsalite.parallel.pipeline import carry_bytes, describe_split

        line = (f"pipeline: {self.split.stages} stages on {self.spec.pp} ranks ({self.spec.schedule}, "
                f"{self.spec.microbatches} micro-batches), layers {describe_split(self.split)}")
        extra = carry_bytes(cfg, self.split, getattr(self, "rows", 0), seq_len)  # rows: known once a step ran
        if any(extra):
            line += f"; carried top-k per micro-batch per boundary: {extra} bytes"
        return line

    def cut(self, model) -> list:
        self.roots = cut(model, self.split, self.local)
        return self.roots

    # ----- setup -----
    def _carry(self, cfg, s: int) -> tuple[bool, bool]:
        """Whether a top-k arrives at stage s, and whether one leaves it."""
        if not self.spec.carry_topk or not cfg.has_indexer:
            return False, False
        c = carried(cfg.indexer_types, self.split)
        return (s > 0 and c[s - 1]), (s < self.split.stages - 1 and c[s])

    def _build(self, trainer, rows: int, S: int) -> None:
        import torch.distributed.pipelining as pipelining

        cfg, dev, P = trainer.model.cfg, self.par.device, self.split.stages
        self.K = topk_width(cfg, S)
        dt = self.par.param_dtype

        def meta(shape, dtype, grad=False):
            return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)

        x = meta((rows, S, cfg.hidden_size), dt, True)
        topk = meta((rows, S, self.K), torch.int32)
        stages = []
        for k, s in enumerate(self.local):
            carry_in, carry_out = self._carry(cfg, s)
            inputs = (meta((rows, S), torch.long),) if s == 0 else (x,) + ((topk,) if carry_in else ())
            outputs = (meta((), torch.float32, True),) if s == P - 1 else (x,) + ((topk,) if carry_out else ())
            stages.append(pipelining.PipelineStage(_StageModule(self, k), s, P, dev, input_args=inputs,
                                                   output_args=outputs, group=self.par.meshes.pp.get_group()))
        kind = getattr(pipelining, SCHEDULES[self.spec.schedule])
        self.schedule = kind(stages[0] if len(stages) == 1 else stages, self.spec.microbatches,
                             loss_fn=lambda out, target: out, scale_grads=False)
        self.trainer = trainer

    # ----- one step -----
    def _counts(self, b, S: int, n_mtp: int) -> None:
        """Labels of the whole local batch and, per micro-batch, its fraction of each global count."""
        M, dev = self.spec.microbatches, self.par.device
        self.ids, self.seg, self.pos = b.tokens[:, :S], b.segments[:, :S], b.positions[:, :S]
        self.nxt = b.tokens[:, 1:S + 1]
        self.ce_labels = shifted_labels(b.tokens, b.segments, b.loss_mask, S, 1)
        self.mtp_labels = [shifted_labels(b.tokens, b.segments, b.loss_mask, S, 2 + d) for d in range(n_mtp)]
        for d, lab in enumerate(self.mtp_labels):  # the last d positions read a padded input id (mtp_forward)
            if d:
                lab[:, S - d:] = IGNORE
        rows = self.ids.shape[0] // M
        self.rows = rows
        per_mb = []  # [M, kinds]: labelled tokens (CE, MTP depths), query rows that see a key
        self.visible = []
        for m in range(M):
            sl = slice(m * rows, (m + 1) * rows)
            vis = Visibility(S, S, 0, None, self.seg[sl], dev)
            seen = sum(int(vis.block(s0, min(S, s0 + 256)).any(-1).sum()) for s0 in range(0, S, 256))
            self.visible.append(seen)
            per_mb.append([(self.ce_labels[sl] != IGNORE).sum().item()] +
                          [(lab[sl] != IGNORE).sum().item() for lab in self.mtp_labels] + [seen])
        local = torch.tensor(per_mb, dtype=torch.float64)
        total = self.par.dp.sum(local.sum(0))
        frac = torch.where(total > 0, local / total.clamp(min=1), torch.zeros_like(local)).float()
        self.f_ce, self.f_mtp = frac[:, 0], frac[:, 1:1 + n_mtp]
        self.n_rows = total[-1]  # query rows of the global batch: each indexer layer's KL is a mean over them

    def stage_forward(self, acts, m: int, k: int):
        t, model, s = self.trainer, self.roots[k], self.local[k]
        first, last = s == 0, s == self.split.stages - 1
        carry_in, carry_out = self._carry(model.cfg, s)
        r, tr = t.recipe, t.recipe.train
        sl = slice(m * self.rows, (m + 1) * self.rows)
        ids, seg, pos = self.ids[sl], self.seg[sl], self.pos[sl]
        dsa = None
        if t.use_kl:
            dsa = DSATraining(dense_attention=r.dense_attention, sparse_target=not r.dense_attention)
            dsa.terms = self.par.dp.opaque_terms()
        t.stats.begin(self.rows)
        kw = dict(position_ids=pos, segment_ids=seg, dsa=dsa, compute_logits=False)
        carried_in = NOT_GIVEN
        if not first:
            kw["hidden_in"] = acts[0]
            if carry_in:
                carried_in = acts[1].long() if self.K else None
                kw["topk_in"] = carried_in
        amp = torch.autocast(self.par.device.type, dtype=torch.bfloat16) if tr.bf16 else nullcontext()
        named = {}
        with amp:
            out = model(ids, **kw)
            if last:
                named["ce"] = head_lm_loss(model, out.last_hidden, self.ce_labels[sl]) * self.f_ce[m]
                if t.n_mtp:
                    layers = list(self.split.layers(s))
                    trunk = dict(zip(layers, out.topk))
                    if carried_in is not NOT_GIVEN:  # the top-k of the last full layer before this stage
                        trunk[source_layer(model.cfg.indexer_types, layers[0])] = carried_in
                    logits = model.mtp_forward(out.mtp_input, self.nxt[sl], pos, segment_ids=seg, dsa=dsa, topk=trunk)
                    named["mtp"] = torch.stack([lm_loss(lg, lab[sl]) * self.f_mtp[m, d] for d, (lg, lab) in
                                                enumerate(zip(logits, self.mtp_labels))]).mean()
        if dsa is not None and dsa.terms:
            for layer, (_, n) in dsa.terms.items():
                if int(n) != self.visible[m]:
                    raise RuntimeError(f"pipeline: layer {layer}'s indexer loss counted {int(n)} query rows, expected "
                                       f"{self.visible[m]} (rows that see a key); the global KL mean would be wrong")
            named["kl"] = torch.stack([s for s, _ in dsa.terms.values()]).sum() / self.n_rows.float()
        bal = t.stats.balance_loss()
        if bal is not None:
            named["aux"] = bal * (self.rows / r.data.batch_size)
        for name, load in t.stats.load.items():
            self.loads[name] = self.loads.get(name, 0) + load
        loss = named.get("ce", 0.0) + tr.mtp_coeff * named.get("mtp", 0.0) + tr.indexer_coeff * named.get("kl", 0.0) \
            + tr.aux_loss_coeff * named.get("aux", 0.0)
        named["loss"] = loss
        for k, v in named.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / tr.accum_steps
        loss = loss / tr.accum_steps
        if last:
            return loss
        y = out.last_hidden
        if torch.is_tensor(loss) and loss.requires_grad:
            y = _AttachLoss.apply(y, loss)
        self.sent[s] = {"hidden": y.numel() * y.element_size(), "topk": 0}
        if not carry_out:
            return y
        topk = out.topk[-1] if out.topk else carried_in
        if topk is None:
            topk = torch.empty(*y.shape[:2], 0, dtype=torch.long, device=y.device)
        topk = topk.to(torch.int32)
        self.sent[s]["topk"] = topk.numel() * topk.element_size()
        return y, topk

    def train_step(self, trainer) -> tuple[dict, dict]:
        """Forward and backward of one optimizer step (every accumulation step one schedule run of M micro-batches);
        returns the step's global metrics (summed over every rank) and router loads (every layer's, summed over the
        data-parallel ranks), as `DataParallel.reduce_step` does for a one-stage run."""
        r, tr = trainer.recipe, trainer.recipe.train
        S, M = r.data.seq_len, self.spec.microbatches
        self.sums, self.loads = {}, {}
        for micro in range(tr.accum_steps):
            idx = trainer.order.indices(trainer.step * tr.accum_steps + micro)
            b = trainer.data.batch(self.par.dp.local(idx)).to(self.par.device)
            self._counts(b, S, trainer.n_mtp)
            if self.schedule is None:
                self._build(trainer, self.rows, S)
            args = (self.ids,) if 0 in self.local else ()  # the first stage reads the tokens
            last = dict(target=torch.zeros(M), return_outputs=False) if self.split.stages - 1 in self.local else {}
            self.schedule.step(*args, mb=torch.arange(M), **last)
        return self._reduce(trainer)

    def _reduce(self, trainer) -> tuple[dict, dict]:
        keys = ["loss", "ce"] + (["mtp"] if trainer.n_mtp else []) + (["kl"] if trainer.use_kl else []) + \
            (["aux"] if trainer.stats.aux and trainer.stats.routers else [])
        vec = torch.tensor([self.sums.get(k, 0.0) for k in keys], dtype=torch.float64)
        dist.all_reduce(vec, group=self.par.meshes.world.get_group())
        sums = dict(zip(keys, vec.tolist()))
        _, loads = self.par.dp.reduce_step({}, self.loads)  # this stage's routers, over the data-parallel ranks
        every: list = [None] * self.spec.pp
        dist.all_gather_object(every, {k: v.cpu() for k, v in loads.items()}, group=self.par.meshes.pp.get_group())
        merged = {}
        for part in every:
            merged.update(part)
        order = sorted(merged, key=_router_order)
        return sums, {k: merged[k].to(self.par.device) for k in order}


def _router_order(name: str):
    """Router names in the order a one-process model lists them: trunk layers by index, then MTP layers."""
    parts = name.split(".")
    return (0, int(parts[2])) if name.startswith("model.layers.") else (1, int(parts[1]))


# ----- the HF export, read back from the final distributed checkpoint -----


class _FromDCP:
    """Full tensors of a model state read one at a time from a DCP checkpoint folder (rank 0, no collective)."""

    def __init__(self, path: str, sd: dict):
        self.path, self.sd, self.name, self.full = path, sd, None, None

    def __call__(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        if name != self.name:
            ref = self.sd[name]
            t = torch.empty(ref.shape, dtype=ref.dtype)
            self.full = None
            dcp.load({"model": {name: t}}, checkpoint_id=self.path, no_dist=True)
            self.name, self.full = name, t
        return self.full


def export_hf(trainer, tok_dir: str, out: str, max_shard_bytes: int = 5 * 2**30) -> str:
    """The trained model as the HF checkpoint a one-process run writes (DIR/hf), read one tensor at a time by rank 0
    from the final distributed checkpoint (which every stage has just written: no rank holds the whole model)."""
    import os

    from dsalite.model import Transformer
    from dsalite.parallel import checkpoint as pc

    par = trainer.par
    path = os.path.join(out, "hf")
    par.barrier()
    if par.is_main:
        found = pc.latest(out)
        if found is None or found[2] != "dcp" or found[0] != trainer.step:
            raise RuntimeError(f"pipeline export: expected the distributed checkpoint of step {trainer.step} under "
                               f"{out}/checkpoints, found {found}")
        with torch.device("meta"):
            full = Transformer(trainer.model.cfg)
        sd = full.state_dict()
        pc.write_hf(trainer.model.cfg, pc.export_items(sd, trainer.model.cfg, _FromDCP(found[1], sd)), tok_dir, path,
                    max_shard_bytes)
    par.barrier()
    return path
