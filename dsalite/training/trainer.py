"""The trainer: setup (model, stage freezing, LoRA, optimizers, schedule, data) once, then one `train_step` per step.

train_step = micro-batches → forward (LM + MTP + indexer KL + optional balance loss) → backward → clip → optimizer →
router bias nudge → metrics. No callbacks. Metrics go to DIR/metrics.jsonl (one object per step) and TensorBoard;
checkpoints to DIR/checkpoints (atomic, last N kept); the final model to DIR/hf as an HF checkpoint (MTP included,
LoRA merged) with the tokenizer beside it, and the loss curves to DIR/loss.png.

Under a parallel layout (`dsalite.parallel`, several processes) the same step runs on every rank: the model is
sharded from outside after it is built (expert parallel, then FSDP2), each data-parallel rank reads its slice of the
global batch and scales its losses to its share of the global means, metrics and router loads are summed over the
ranks, and rank 0 alone writes metrics, plots and the progress bar. One process takes none of those branches.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from dsalite import presets
from dsalite.config import ModelConfig
from dsalite.indexshare import NOT_GIVEN
from dsalite.layers.moe import Router, SqrtSoftplusRouter
from dsalite.model import Transformer
from dsalite.training import checkpointing, data as D
from dsalite.training.losses import DSATraining, head_lm_loss, mtp_loss, shifted_labels
from dsalite.training.recipe import Recipe

# ----- model setup -----


def model_config(r: Recipe) -> ModelConfig:
    """The config the recipe builds (read from init_from's config.json, or the preset with its overrides)."""
    if r.model.init_from:
        return ModelConfig.from_file(r.model.init_from)
    if r.model.preset not in presets.PRESETS:
        raise ValueError(f"recipe key model.preset={r.model.preset!r} is unknown; expected one of "
                         f"{sorted(presets.PRESETS)}")
    hf = dict(presets.PRESETS[r.model.preset], vocab_size=r.data.vocab_size)
    hf.update(r.model.overrides)
    return ModelConfig.from_hf(hf)


def build_model(r: Recipe) -> Transformer:
    if r.model.init_from:
        from dsalite.checkpoint.pretrained import from_pretrained

        return from_pretrained(r.model.init_from, dtype=torch.float32)
    model = Transformer(model_config(r))
    model.init_weights(std=r.model.init_std, generator=torch.Generator().manual_seed(r.model.seed))
    return model


def is_indexer_param(name: str) -> bool:
    return ".indexer." in name


def freeze_for_stage(model: nn.Module, r: Recipe) -> None:
    """dsa_warmup trains only the indexers; lora freezes everything but the adapters (done by apply_lora)."""
    if r.train.stage == "dsa_warmup":
        names = [n for n, _ in model.named_parameters() if is_indexer_param(n)]
        if not names:
            raise ValueError("train.stage = 'dsa_warmup' needs a model with DSA indexers (this one has none)")
        for n, p in model.named_parameters():
            p.requires_grad_(is_indexer_param(n))
    elif r.train.stage == "lora":
        from dsalite.training.lora import apply_lora

        apply_lora(model, r.lora.rank, r.lora.alpha, r.lora.targets, seed=r.model.seed)


def enable_recompute(model: Transformer) -> None:
    """Per-block activation recompute. The block's top-k input is a checkpoint input, so a shared IndexShare layer
    recomputes with exactly the indices it first used; the block re-selects its own top-k from identical inputs."""
    for block in model.model.layers.values():
        plain = block.forward

        def forward(x, ctx, topk_in=NOT_GIVEN, _plain=plain):
            if not torch.is_grad_enabled():
                return _plain(x, ctx, topk_in)
            return checkpoint(_plain, x, ctx, topk_in, use_reentrant=False)

        block.forward = forward


def build_optimizers(model: nn.Module, r: Recipe) -> list[torch.optim.Optimizer]:
    """AdamW with decay on ≥2-D weights only; with `muon`, Muon takes the 2-D hidden weights (not embeddings/heads)."""
    t = r.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"train.stage = {t.stage!r} left no trainable parameter")

    def is_muon(n, p):
        return t.optimizer == "muon" and p.dim() == 2 and "embed_tokens" not in n and not n.endswith(
            ("lm_head.weight", "shared_head.head.weight"))

    muon = [p for n, p in named if is_muon(n, p)]
    decay = [p for n, p in named if not is_muon(n, p) and p.dim() >= 2 and "lora_" not in n]
    no_decay = [p for n, p in named if not is_muon(n, p) and (p.dim() < 2 or "lora_" in n)]
    groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # fused: one pass per tensor instead of a dozen element-wise kernels (a tenth of the time on CPU)
    fused = all(p.device.type in ("cpu", "cuda") for _, p in named)
    opts = [torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=1e-8, fused=fused)] if groups else []
    if muon:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in muon):  # sharded (FSDP2): orthogonalise whole matrices
            from dsalite.parallel.muon import ShardedMuon as Muon
        else:
            Muon = torch.optim.Muon
        opts.append(Muon(muon, lr=t.muon_lr, weight_decay=t.weight_decay))
    return opts


def lr_factor(step: int, r: Recipe) -> float:
    """Linear warm-up to 1, then cosine down to min_lr_ratio at max_steps."""
    t = r.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    prog = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


# ----- routers: load statistics, balance loss, bias update -----


ROUTERS = (Router, SqrtSoftplusRouter)  # sigmoid group routing (MLA families); sqrtsoftplus and hash routing (V4)


class RouterStats:
    """Forward hooks on every router (applied from outside): per-layer expert load and the sequence-level balance
    loss of the latest forward. Keyed by module name, so a recomputed forward overwrites instead of double-counting.
    Under context parallel (`split`, a `parallel.context_parallel.ZigzagSplit`) a rank routes only its tokens of each
    sequence: the balance loss's per-sequence sums then run over the split's ranks (`split.sequence_sum`)."""

    def __init__(self, model: nn.Module, aux: bool, split=None):
        self.routers = {n: m for n, m in model.named_modules() if isinstance(m, ROUTERS)}
        self.aux, self.rows, self.split = aux, 1, split
        self.load: dict[str, torch.Tensor] = {}
        self.balance: dict[str, torch.Tensor] = {}
        for name, m in self.routers.items():
            m.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(mod, inp, out):
            _, ids, s = out  # ids [N, k], s [N, E]
            E = s.shape[-1]
            self.load[name] = torch.bincount(ids.reshape(-1), minlength=E).float()
            if self.aux and self.split is not None:
                self.balance[name] = self._split_balance(ids, s, E)
            elif self.aux:
                k = ids.shape[-1]
                s = s.view(self.rows, -1, E)  # [B, S, E]
                P = (s / s.sum(-1, keepdim=True)).mean(1)  # [B, E]
                f = torch.zeros_like(P).scatter_add_(1, ids.view(self.rows, -1), torch.ones_like(
                    ids.view(self.rows, -1), dtype=P.dtype)) * (E / (k * s.shape[1]))
                self.balance[name] = (f * P).sum(-1).mean()
        return hook

    def _split_balance(self, ids, s, E: int) -> torch.Tensor:
        """The balance loss of whole sequences from this rank's part of each: the score sums (differentiably) and the
        expert counts over the split's ranks; every rank gets the same value (its share is taken by the trainer)."""
        k = ids.shape[-1]
        s = s.view(self.rows, -1, E)  # [B, S_local, E]
        S = s.shape[1] * self.split.size
        P = self.split.sequence_sum((s / s.sum(-1, keepdim=True)).sum(1)) / S  # [B, E]
        counts = torch.zeros_like(P).scatter_add_(1, ids.view(self.rows, -1), torch.ones_like(
            ids.view(self.rows, -1), dtype=P.dtype))
        f = self.split.sequence_sum(counts.detach()) * (E / (k * S))
        return (f * P).sum(-1).mean()

    def begin(self, rows: int) -> None:
        self.rows = rows
        self.load.clear()
        self.balance.clear()

    def balance_loss(self) -> torch.Tensor | None:
        return torch.stack(list(self.balance.values())).sum() if self.balance else None

    @torch.no_grad()
    def update_bias(self, loads: dict[str, torch.Tensor], rate: float) -> None:
        """DeepSeek-V3 aux-loss-free balancing: bias += rate · sign(mean load − load) per expert."""
        for name, load in loads.items():
            b = getattr(self.routers[name], "e_score_correction_bias", None)
            if b is None:  # hash routing (V4's first layers): experts fixed by token id, no bias to steer
                continue
            b.add_(rate * torch.sign(load.mean() - load).to(b.dtype))


# ----- the step -----


@dataclass
class Trainer:
    recipe: Recipe
    out: str
    model: Transformer = None
    optimizers: list = field(default_factory=list)
    step: int = 0
    par: object = None  # dsalite.parallel.Parallel under a parallel layout; None in one process

    def __post_init__(self):
        r = self.recipe
        if r.train.threads:
            torch.set_num_threads(r.train.threads)
        self.device = torch.device(r.train.device) if self.par is None else self.par.device
        sharded_load = self.par is not None and bool(r.model.init_from)
        # parallel --init-from: built on meta, each rank later reads only its slices (parallel/load.py)
        self.model = self.par.model_on_meta(r) if sharded_load else build_model(r).to(self.device)
        self.n_mtp = self.model.cfg.num_nextn_predict_layers if r.train.mtp_coeff > 0 else 0
        freeze_for_stage(self.model, r)
        if r.train.recompute:
            enable_recompute(self.model)
        self.stats = RouterStats(self.model, r.train.aux_loss_coeff > 0, None if self.par is None else self.par.cp)
        if self.par is not None:
            self.par.parallelize(self.model)  # expert parallel, then FSDP2: parameters become DTensor shards
            if sharded_load:
                self.par.load_pretrained(self.model, r.model.init_from)
        self.optimizers = build_optimizers(self.model, r)
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        # MLA lightning indexers and DeepSeek-V4's CSA indexers alike
        self.use_kl = r.train.indexer_coeff > 0 and any(is_indexer_param(n) for n, _ in self.model.named_parameters())
        if r.dense_attention and not self.use_kl:
            raise ValueError("train.stage = 'dsa_warmup' trains only the indexers: train.indexer_coeff must be > 0")
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def set_data(self, tokens: D.PackedTokens) -> None:
        self.data = tokens
        self.order = D.BatchOrder(tokens.n_windows, self.recipe.data.batch_size, self.recipe.data.seed)

    def losses(self, b: D.Batch) -> dict[str, torch.Tensor]:
        """Named losses for one micro-batch; `loss` is the weighted total that backward runs on."""
        r, m = self.recipe, self.model
        S = r.data.seq_len
        t = r.train
        b = b.to(self.device)
        ids, seg, pos = b.tokens[:, :S], b.segments[:, :S], b.positions[:, :S]
        cp = None if self.par is None else self.par.cp  # context parallel: this rank's tokens of each sequence
        if cp is not None:  # queries, positions and labels split; `seg` stays whole: the keys' documents
            ids, pos = cp.take(ids), cp.take(pos)
        dsa = DSATraining(dense_attention=r.dense_attention, sparse_target=not r.dense_attention) if self.use_kl \
            else None
        if dsa is not None and self.par is not None:  # FSDP2 would copy a plain dict (data_parallel.OpaqueTerms)
            dsa.terms = self.par.dp.opaque_terms()
        self.stats.begin(ids.shape[0])
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if t.bf16 else nullcontext()
        cached = parametrize.cached() if any(parametrize.is_parametrized(x) for x in m.modules()) else nullcontext()
        with amp, cached:
            out = m(ids, position_ids=pos, segment_ids=seg, dsa=dsa, compute_logits=False)
            ce_labels = shifted_labels(b.tokens, b.segments, b.loss_mask, S, 1)
            if cp is not None:
                ce_labels = cp.take(ce_labels)
            named = {"ce": head_lm_loss(m, out.last_hidden, ce_labels)}  # no [B, S, V] logits kept
            if self.n_mtp:
                nxt = b.tokens[:, 1:S + 1]
                mtp_logits = m.mtp_forward(out.mtp_input, nxt if cp is None else cp.take(nxt), pos, segment_ids=seg,
                                           dsa=dsa, topk=out.topk)
                labels = [shifted_labels(b.tokens, b.segments, b.loss_mask, S, 2 + d) for d in range(self.n_mtp)]
                for d, lab in enumerate(labels):  # the last d positions read a padded input id (mtp_forward)
                    if d:
                        lab[:, S - d:] = -100
                if cp is not None:
                    labels = [cp.take(lab) for lab in labels]
                named["mtp"] = (mtp_loss if self.par is None else self.par.dp.mtp_loss)(mtp_logits, labels)
        kl = dsa.loss() if dsa is not None else None
        if kl is not None:
            named["kl"] = kl
        bal = self.stats.balance_loss()
        if bal is not None:
            named["aux"] = bal
        if self.par is not None:  # this rank's shares of the global-batch means (parallel/data_parallel.py)
            named = self.par.dp.shares(named, ce_labels, dsa, ids.shape[0])
        if r.dense_attention:  # warm-up: the LM losses are reported but only the indexer loss trains
            total = t.indexer_coeff * named["kl"]
        else:
            total = named["ce"] + t.mtp_coeff * named.get("mtp", 0.0) + t.indexer_coeff * named.get("kl", 0.0) \
                + t.aux_loss_coeff * named.get("aux", 0.0)
        named["loss"] = total
        return named

    def train_step(self) -> dict:
        r, t = self.recipe, self.recipe.train
        t0 = time.perf_counter()
        f = lr_factor(self.step, r)
        for o, base in zip(self.optimizers, self.base_lrs):
            for g, lr in zip(o.param_groups, base):
                g["lr"] = lr * f
        sums: dict[str, float] = {}
        loads: dict[str, torch.Tensor] = {}
        pipe = None if self.par is None else self.par.pipeline
        if pipe is not None:  # pipeline parallel: the schedule runs every micro-batch's forward and backward
            sums, loads = pipe.train_step(self)
        for micro in range(0 if pipe is not None else t.accum_steps):
            idx = self.order.indices(self.step * t.accum_steps + micro)
            b = self.data.batch(idx if self.par is None else self.par.dp.local(idx))
            named = self.losses(b)
            for name, load in self.stats.load.items():
                loads[name] = loads.get(name, 0) + load
            (named["loss"] / t.accum_steps).backward()
            for k, v in named.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / t.accum_steps
        if self.par is not None and pipe is None:
            sums, loads = self.par.dp.reduce_step(sums, loads)
        clip = torch.nn.utils.clip_grad_norm_ if self.par is None else self.par.clip_grad_norm_
        gnorm = float(clip(self.params, t.grad_clip)) if t.grad_clip > 0 else float("nan")
        for o in self.optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        if t.bias_update_rate > 0 and r.train.stage not in ("dsa_warmup", "lora"):
            self.stats.update_bias(loads, t.bias_update_rate)
        self.step += 1
        tokens = t.accum_steps * r.data.batch_size * r.data.seq_len
        dt = time.perf_counter() - t0
        rec = {"step": self.step, **sums, "lr": self.optimizers[0].param_groups[0]["lr"], "grad_norm": gnorm,
               "tokens": tokens * self.step, "tok_s": tokens / dt}
        if loads:
            imb = {n: float(l.max() / l.mean().clamp(min=1e-9)) for n, l in loads.items()}
            rec["expert_load_max_over_mean"] = max(imb.values())
            rec["expert_load"] = {n.replace(".mlp.gate", ""): [int(x) for x in l.tolist()] for n, l in loads.items()}
        return rec

    # ----- state -----
    def state(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers], "rng": torch.get_rng_state()}

    def load_state(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        for o, st in zip(self.optimizers, s["optimizers"]):
            o.load_state_dict(st)
        torch.set_rng_state(s["rng"])
        self.step = s["step"]


# ----- the run -----


def prepare_data(r: Recipe, out: str, n_mtp: int) -> tuple[D.PackedTokens, str]:
    """Tokenizer (trained once, or the recipe's) and the token file under DIR/data; reused on resume."""
    tok_dir = r.data.tokenizer or os.path.join(out, "tokenizer")
    prefix = os.path.join(out, "data", "train")
    files = r.data.files or D.builtin_corpus()
    source = {"files": files, "tokenizer": r.data.tokenizer, "vocab_size": r.data.vocab_size}
    stamp = prefix + ".source.json"
    fresh = False
    if os.path.isfile(stamp):
        with open(stamp) as f:
            fresh = json.load(f) == source
    if not fresh:
        docs = D.read_documents(files)
        tok = D.load_tokenizer(tok_dir) if r.data.tokenizer else D.train_tokenizer(docs, r.data.vocab_size, tok_dir)
        D.write_token_file(docs, tok, prefix)
        with open(stamp, "w") as f:
            json.dump(source, f)
    return D.PackedTokens(prefix, r.data.seq_len, n_mtp), tok_dir


def train(r: Recipe, out: str, max_steps: int | None = None, resume: bool = False, progress: bool = True,
          export: bool = True, par=None) -> list[dict]:
    """Run (or continue) a recipe into `out`; returns the metrics of every step taken in this call.

    par: a `dsalite.parallel.Parallel` when this is one rank of a parallel run (every rank calls `train`); rank 0
    alone writes metrics, TensorBoard, the plot and the progress bar, checkpoints go through Distributed Checkpoint."""
    if max_steps is not None:
        r.train.max_steps = max_steps
    main = par is None or par.is_main
    os.makedirs(out, exist_ok=True)
    trainer = Trainer(r, out, par=par)
    tokens, tok_dir = _main_first(par, lambda: prepare_data(r, out, trainer.n_mtp))
    if trainer.model.cfg.vocab_size < int(tokens.tokens.max()) + 1:
        raise ValueError(f"model vocab_size={trainer.model.cfg.vocab_size} is smaller than the tokenizer's ids "
                         f"(max {int(tokens.tokens.max())}); set data.vocab_size or model.overrides.vocab_size")
    trainer.set_data(tokens)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if resume:
        if not _resume(trainer, out):
            raise FileNotFoundError(f"--resume: no checkpoint under {out}/checkpoints")
    elif main:  # a fresh run: an earlier run's checkpoints and curves in DIR would otherwise mix with the new ones
        for old in ("checkpoints", "tensorboard"):
            shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    if par is not None:
        par.barrier()
    if main:
        _truncate_metrics(metrics_path, trainer.step)
    tb = _tensorboard(os.path.join(out, "tensorboard")) if main else None
    from tqdm import tqdm

    bar = tqdm(total=r.train.max_steps, initial=trainer.step, desc=f"train {r.train.stage}",
               disable=not (progress and main), dynamic_ncols=True)
    taken = []
    with open(metrics_path, "a") if main else nullcontext() as mf:
        while trainer.step < r.train.max_steps:
            rec = trainer.train_step()
            taken.append(rec)
            if main and (trainer.step % r.train.log_every == 0 or trainer.step == r.train.max_steps):
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                if tb is not None:
                    for k, v in rec.items():
                        if isinstance(v, float) and k != "step":
                            tb.add_scalar(k, v, rec["step"])
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_s']:.0f}")
            bar.update(1)
            if trainer.step % r.train.save_every == 0 or trainer.step == r.train.max_steps:
                if par is None:
                    checkpointing.save_state(out, trainer.step, trainer.state(), r.train.keep_last)
                else:  # Distributed Checkpoint: every rank writes its shards
                    par.checkpoint.save_state(out, trainer, r.train.keep_last)
    bar.close()
    if tb is not None:
        tb.close()
    if main:
        plot_metrics(metrics_path, os.path.join(out, "loss.png"))
    if export:
        if par is None:
            export_model(trainer, tok_dir, out)
        else:  # streamed from the shards, one parameter at a time
            par.checkpoint.export_hf(trainer, tok_dir, out)
    return taken


def _resume(trainer: Trainer, out: str) -> bool:
    """Load the newest checkpoint in DIR into `trainer`; False when there is none. A Distributed Checkpoint (written
    by a parallel run) loads at any layout, in one process too; a one-process state.pt loads in one process."""
    if trainer.par is not None:
        return trainer.par.checkpoint.load_latest(out, trainer)
    from dsalite.parallel import checkpoint as dcp_checkpoint

    found = dcp_checkpoint.latest(out)
    if found is not None and found[2] == "dcp":
        dcp_checkpoint.load(found[1], trainer)
        return True
    s = checkpointing.load_latest(out)
    if s is None:
        return False
    trainer.load_state(s)
    return True


def _main_first(par, fn):
    """fn() on rank 0, then on the other ranks (which find rank 0's files); fn() alone in one process."""
    if par is None:
        return fn()
    if par.is_main:
        res = fn()
    par.barrier()
    if not par.is_main:
        res = fn()
    return res


def export_model(trainer: Trainer, tok_dir: str, out: str) -> str:
    """LoRA adapters to DIR/lora (unmerged), then the merged model + tokenizer to DIR/hf."""
    from dsalite.training.lora import merge_lora, save_adapters

    r = trainer.recipe
    model = trainer.model
    if r.train.stage == "lora":
        save_adapters(model, os.path.join(out, "lora"), r.lora.rank, r.lora.alpha, r.lora.targets)
        merge_lora(model)
    for block in model.model.layers.values():
        block.__dict__.pop("forward", None)  # drop the recompute wrapper
    path = os.path.join(out, "hf")
    layout = getattr(model, "checkpoint_layout", None)  # V4: the on-disk layout it was loaded from
    model.save_pretrained(path, **({"layout": layout} if layout else {}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(tok_dir, name)):
            shutil.copyfile(os.path.join(tok_dir, name), os.path.join(path, name))
    return path


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the records of steps <= `step` (a resumed run rewrites what came after its checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def _tensorboard(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(path)


def plot_metrics(jsonl: str, png: str) -> None:
    """Loss curves (total, CE, MTP, indexer KL) against step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(jsonl) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    if not recs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [x["step"] for x in recs]
    for key in ("loss", "ce", "mtp"):
        if key in recs[0]:
            axes[0].plot(steps, [x[key] for x in recs], label=key)
    axes[0].set(xlabel="step", ylabel="cross-entropy (nats)", title="language-model losses")
    axes[0].legend()
    if "kl" in recs[0]:
        axes[1].plot(steps, [x["kl"] for x in recs], color="tab:red", label="indexer KL (sum over layers)")
        axes[1].set(xlabel="step", ylabel="KL (nats)", title="DSA indexer loss")
        axes[1].legend()
    else:
        axes[1].set_axis_off()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
