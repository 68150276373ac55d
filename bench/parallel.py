"""Parallel training on this machine: per-rank memory, communication per step, step time (not a test).

bench-medium GLM (D 1024, 1 dense + 3 MoE layers of 8 experts top-2, no MTP), fp32, AdamW, the global batch split
over the data-parallel ranks. For each layout (1 process; dp_shard 2; dp_shard 2 + ep 2; dp_shard 4; dp_shard 4 +
ep 2) the ranks are started as subprocesses (gloo, one thread each) and rank 0 reports:
  - its bytes of parameters, gradients and AdamW state (local shards, measured), against the one-process figure
    divided by the world size (the goal: within 5 %);
  - the bytes its collectives moved during one step, counted by wrapping torch.distributed's functions: FSDP's
    all-gathers (output bytes) and reduce-scatters (input bytes), EP's all-to-alls (bytes sent), the small
    all-reduces; against the analytic figures (FSDP: the parameters gathered in forward and again in backward,
    except the root unit's, plus one reduce-scatter of fp32 gradients; EP: 4 exchanges per MoE layer of
    tokens·k·D fp32 values, forward and backward, dispatch and combine);
  - the median wall time of a step. On a 2-core machine more processes cannot be faster: the figure says what the
    parallel machinery costs here, not what it gains on a cluster.

Context parallel (`--cp`, layouts c2 = cp 2 and c2d2 = cp 2 × dp_shard 2; each sequence split zigzag over the cp
ranks): first, analytically at the real GLM-5 widths (recipes/glm5-744b.toml) and S = 128K, the bytes one rank
receives per layer when it gathers the other ranks' compact state (MLA latent r + p, plus the indexer key Di on full
layers) against what gathering expanded keys and values (H·(n + p) + H·v) would take; then, on bench-medium, the
bytes through the cp group's all-gathers and reduce-scatters in one step, counted like the rest, against the
analytic figure (`context_parallel.state_widths`: r + p per token and layer, + Di on full layers).

    .venv/bin/python bench/parallel.py [--seq 512] [--batch 4] [--steps 3] [--layouts 1,2,2e2,4,4e2] [--cp]

`--pipeline` prints the pipeline figures instead (analytic, no processes, seconds): the stage balance of the
automatic split on the real GLM-5.2 config (78 layers + MTP, IndexShare freq 4 offset 3, at S = 4096) at pp = 2, 4,
8 — the most loaded stage's training FLOPs (`Transformer.flops_by_part`) over the mean — for the guarded split, for
the split carried top-k allows, and for the naive even split; and the bytes a carried top-k adds per micro-batch per
boundary against the hidden state that crosses it anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header  # noqa: E402

from dsalite.presets import BENCH_MEDIUM  # noqa: E402

LAYOUTS = {"1": (1, 1), "2": (2, 1), "2e2": (2, 2), "4": (4, 1), "4e2": (4, 2)}  # name -> (dp_shard, ep)
CP_LAYOUTS = {"c2": (1, 2), "c2d2": (2, 2)}  # name -> (dp_shard, cp)


def layout_of(name: str) -> tuple[int, int, int]:
    """(dp_shard, ep, cp) of a layout name."""
    if name in CP_LAYOUTS:
        return CP_LAYOUTS[name][0], 1, CP_LAYOUTS[name][1]
    return LAYOUTS[name][0], LAYOUTS[name][1], 1


class CommCounter:
    """Bytes through torch.distributed's collectives, per kind, while installed (wraps the module functions that
    FSDP2 and dsalite.parallel call through `torch.distributed.<name>`)."""

    KINDS = {"all_gather_into_tensor": "all-gather", "all_gather_single": "all-gather",
             "reduce_scatter_tensor": "reduce-scatter", "reduce_scatter_single": "reduce-scatter",
             "all_to_all_single": "all-to-all", "all_reduce": "all-reduce"}

    def __init__(self, cp_group=None):
        import torch.distributed as dist

        self.dist, self.bytes, self.saved, self.on = dist, {}, {}, False
        # context parallel's gathers: collectives on its group of [rows, tokens, width] tensors (FSDP2's buffers on
        # the same ranks, with dp_shard = 1 the same group, are flat), counted as "cp <kind>"
        self.cp_group = cp_group
        for name, kind in self.KINDS.items():
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn
            setattr(dist, name, self._wrap(fn, kind))

    def _wrap(self, fn, kind):
        def counted(*args, **kwargs):
            if self.on:  # all-gather: the gathered output; reduce-scatter and all-to-all: the input
                key = ("output_tensor", 0) if kind == "all-gather" else (("input", 1) if kind != "all-reduce"
                                                                         else ("tensor", 0))
                t = kwargs.get(key[0], args[key[1]] if len(args) > key[1] else None)
                cp = self.cp_group is not None and kwargs.get("group") is self.cp_group and t.dim() == 3
                name = f"cp {kind}" if cp else kind
                self.bytes[name] = self.bytes.get(name, 0) + t.numel() * t.element_size()
            return fn(*args, **kwargs)
        return counted


def worker(args) -> None:
    import torch.distributed as dist

    from dsalite.config import ModelConfig
    from dsalite.model import Transformer
    from dsalite.parallel import Parallel
    from dsalite.parallel.mesh import Layout, build_meshes
    from dsalite.training.losses import IGNORE, head_lm_loss

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp_shard, ep, cp = layout_of(args.layout)
    cfg = ModelConfig.from_hf(dict(BENCH_MEDIUM))
    model = Transformer(cfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    n_params = model.num_params()
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    rank, dp_rank, dp = 0, 0, 1
    par = counter = None
    if world > 1:
        dist.init_process_group("gloo")
        layout = Layout(dp_shard=dp_shard, ep=ep, cp=cp).check(world, cfg.n_routed_experts, args.batch)
        par = Parallel(layout, build_meshes(layout, "cpu"), torch.device("cpu"), dist.get_rank())
        if cp > 1:
            from dsalite.parallel.context_parallel import ZigzagSplit

            par.cp = ZigzagSplit(args.seq, par.meshes.cp.get_local_rank(), cp, par.meshes.cp.get_group())
        counter = CommCounter(par.meshes.cp.get_group() if cp > 1 else None)
        par.parallelize(model)
        rank, dp_rank, dp = par.rank, par.dp.rank, par.dp.size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    rows = slice(dp_rank * args.batch // dp, (dp_rank + 1) * args.batch // dp)
    x, labels = ids[rows, :-1], ids[rows, 1:]
    pos = torch.arange(args.seq).expand(x.shape[0], -1)
    if par is not None and par.cp is not None:  # this rank's zigzag share of every sequence
        x, labels, pos = par.cp.take(x), par.cp.take(labels), par.cp.take(pos)
    share = (labels != IGNORE).sum() / (args.batch * args.seq)  # this rank's share of the global mean

    def step(measure=None):
        out = model(x, position_ids=pos, compute_logits=False)
        (head_lm_loss(model, out.last_hidden, labels) * share).backward()
        if measure is not None:
            measure["grads"] = sum(local(p.grad) for p in model.parameters() if p.grad is not None)
        if par is not None:
            par.clip_grad_norm_(list(model.parameters()), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    m = {}
    step(m)  # warm-up (and the AdamW state exists afterwards)
    m["params"] = sum(local(p) for p in model.parameters())
    m["optimizer"] = sum(local(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    if counter is not None:
        counter.on = True
        step()
        counter.on = False
        m["comm"] = counter.bytes
    times = []
    for _ in range(args.steps):
        if par is not None:
            par.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    m.update(step_s=statistics.median(times), n_params=n_params, world=world, layout=args.layout, tokens=x.numel(),
             moe_layers=sum(t == "sparse" for t in cfg.mlp_types), root_params=model.model.norm.weight.numel()
             + model.lm_head.weight.numel(), expert_params=expert_params)
    if rank == 0:
        print("RESULT " + json.dumps(m), flush=True)
    if par is not None:
        par.close()


def run(layout: str, args) -> dict:
    dp_shard, _, cp = layout_of(layout)
    world = dp_shard * cp
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS="1",
               WORLD_SIZE=str(world))
    cmd = [sys.executable, __file__, "--worker", "--layout", layout, "--seq", str(args.seq), "--batch",
           str(args.batch), "--steps", str(args.steps)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)) if world > 1 else env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for r in range(world)]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    for p in procs:
        if p.returncode:
            raise RuntimeError(f"layout {layout}: a rank exited with {p.returncode}")
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def pipeline_figures(seq: int) -> None:
    from dsalite.config import ModelConfig
    from dsalite.parallel.pipeline import (Split, allowed_starts, balanced_split, carry_bytes, describe_split,
                                           imbalance, layer_costs, violations)
    from dsalite.training.recipe import load_recipe
    from dsalite.training.trainer import model_config

    r = load_recipe(os.path.join(os.path.dirname(__file__), "..", "recipes", "glm5-744b.toml"))
    r.model.overrides.update(index_topk_freq=4, index_skip_topk_offset=3)  # GLM-5.2's IndexShare schedule
    cfg: ModelConfig = model_config(r)
    costs, tail = layer_costs(cfg, seq)
    L = cfg.num_hidden_layers
    print(f"\nGLM-5.2 at real widths: {L} layers + {cfg.num_nextn_predict_layers} MTP, "
          f"{cfg.indexer_types[:L].count('full')} full indexer layers, S = {seq}; training FLOPs per token: "
          f"MoE layer {costs[-1] / 1e9:.2f} G, dense {costs[0] / 1e9:.2f} G, head + MTP {tail / 1e9:.2f} G")
    print("\n| pp | split | stages (trunk layers) | max / mean | shared layers cut from their source |")
    print("|---|---|---|---|---|")
    for pp in (2, 4, 8):
        naive = Split(tuple(round(L * s / pp) for s in range(pp)), L, cfg.num_nextn_predict_layers)
        for name, split in (("guarded (automatic)", balanced_split(costs, tail, pp, allowed_starts(cfg, False), 1)),
                            ("carried top-k (automatic)", balanced_split(costs, tail, pp, allowed_starts(cfg, True),
                                                                         1)),
                            ("naive even", naive)):
            print(f"| {pp} | {name} | {describe_split(split)} | {imbalance(costs, tail, split):.3f} | "
                  f"{len(violations(cfg.indexer_types, split))} |")
    rows, K = 1, cfg.index_topk
    carried = balanced_split(costs, tail, 8, allowed_starts(cfg, True), 1)
    extra = [b for b in carry_bytes(cfg, carried, rows, seq) if b]
    hidden = rows * seq * cfg.hidden_size * 2
    print(f"\ncarried top-k: int32 [b, S, K = {K}] = {extra[0] / 2**20:.1f} MiB per micro-batch of b = {rows} row per "
          f"boundary that begins with a shared layer ({len(extra)} of the 7 at pp = 8 carried), against "
          f"{hidden / 2**20:.1f} MiB of bf16 hidden state (+{extra[0] / hidden:.0%} on those boundaries, forward only)")


def cp_figures(args, S: int = 128 * 1024) -> None:
    """Context parallel: what one rank receives per layer (GLM-5 widths, S tokens, bf16) and the counted gathers of
    bench-medium at cp 2 and cp 2 × dp_shard 2 against the analytic figure."""
    from dsalite.config import ModelConfig
    from dsalite.parallel.context_parallel import state_widths
    from dsalite.training.recipe import load_recipe
    from dsalite.training.trainer import model_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    glm5 = model_config(load_recipe(os.path.join(root, "recipes", "glm5-744b.toml")))
    compact, _ = state_widths(glm5)
    c = glm5
    print(f"\nGLM-5 (r {c.kv_lora_rank}, p {c.qk_rope_head_dim}, Di {c.index_head_dim}, H {c.num_attention_heads}, "
          f"n {c.qk_nope_head_dim}, v {c.v_head_dim}; {len(compact)} layers incl. MTP), S = {S // 1024}K tokens, bf16: "
          "bytes one rank receives per layer in forward (the other cp - 1 ranks' tokens; backward returns as many)")
    print("\n| cp | latent + indexer key (full layer) | latent only (shared layer) | expanded K + V + indexer key | "
          "expanded / compact | all layers, forward + backward |")
    print("|---|---|---|---|---|---|")
    latent, full = c.kv_lora_rank + c.qk_rope_head_dim, c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim
    kv = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) + c.index_head_dim
    for C in (2, 4, 8, 16):
        tok = S * (C - 1) // C
        print(f"| {C} | {_gib(tok * full * 2)} | {_gib(tok * latent * 2)} | {_gib(tok * kv * 2)} | "
              f"{kv / full:.1f}× | {_gib(2 * tok * sum(compact) * 2)} |")
    cfg = ModelConfig.from_hf(dict(BENCH_MEDIUM))
    trunk, trunk_expanded = state_widths(cfg, mtp=False)  # the bench step runs no MTP layer
    res = {name: run(name, args) for name in ("1", *CP_LAYOUTS)}
    base = res["1"]
    mib = 2**20
    print(f"\nbench-medium ({cfg.num_hidden_layers} layers, r + p = {cfg.kv_lora_rank + cfg.qk_rope_head_dim}, "
          f"Di {cfg.index_head_dim}), one step on rank 0, MiB: the cp group's all-gather outputs (cp × local rows) "
          "and reduce-scatter inputs, counted vs analytic (the indexer keys get no gradient without the KL loss); "
          "expanded = the all-gather if keys and values were gathered instead")
    print("\n| layout | procs | local tokens | cp all-gather | analytic | expanded | cp reduce-scatter | analytic | "
          "step s | vs 1 proc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in CP_LAYOUTS:
        m = res[name]
        dp, _, C = layout_of(name)
        t = m["tokens"]
        ag, rs = C * t * sum(trunk) * 4, C * t * len(trunk) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
        print(f"| cp {C}{f' dp_shard {dp}' if dp > 1 else ''} | {m['world']} | {t} | "
              f"{m['comm'].get('cp all-gather', 0) / mib:.2f} | {ag / mib:.2f} | "
              f"{C * t * sum(trunk_expanded) * 4 / mib:.1f} | {m['comm'].get('cp reduce-scatter', 0) / mib:.2f} | "
              f"{rs / mib:.2f} | {m['step_s']:.2f} | {m['step_s'] / base['step_s']:.2f}× |")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="global batch (divided over the data-parallel ranks)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layouts", default="1,2,2e2,4,4e2")
    ap.add_argument("--pipeline", action="store_true", help="pipeline stage balance and carried top-k figures")
    ap.add_argument("--cp", action="store_true", help="context parallel: gathered bytes (GLM-5 analytic, measured)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="1", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.pipeline:
        header("bench/parallel.py --pipeline: GLM-5.2 stage balance (analytic, the model's own FLOPs per layer)")
        return pipeline_figures(4096 if args.seq == 512 else args.seq)
    if args.cp:
        header(f"bench/parallel.py --cp: context parallel gathers (GLM-5 analytic; bench-medium GLM, global batch "
               f"{args.batch} × {args.seq} tokens, fp32, AdamW)")
        return cp_figures(args)
    header(f"bench/parallel.py: bench-medium GLM, global batch {args.batch} × {args.seq} tokens, fp32, AdamW")
    res = {name: run(name, args) for name in args.layouts.split(",")}
    base = res.get("1") or run("1", args)
    mib = 2**20
    state1 = base["params"] + base["grads"] + base["optimizer"]
    print(f"\n{base['n_params'] / 1e6:.1f}M parameters; one process: parameters + gradients + AdamW = "
          f"{state1 / mib:.1f} MiB, step {base['step_s']:.2f} s")
    print("\n| layout | procs | params MiB | grads MiB | AdamW MiB | total / (1-proc / N) | step s | vs 1 proc |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in res.items():
        dp, ep = LAYOUTS[name]
        total = m["params"] + m["grads"] + m["optimizer"]
        print(f"| dp_shard {dp}{f' ep {ep}' if ep > 1 else ''} | {m['world']} | {m['params'] / mib:.1f} | "
              f"{m['grads'] / mib:.1f} | {m['optimizer'] / mib:.1f} | {total / (state1 / m['world']):.3f} | "
              f"{m['step_s']:.2f} | {m['step_s'] / base['step_s']:.2f}× |")
    print("\ncommunication in one step on rank 0, counted vs analytic (MiB; gradients that do not exist, e.g. the "
          "indexers' without the KL loss, are not reduced):")
    print("| layout | all-gather | analytic | reduce-scatter | analytic | all-to-all | analytic | all-reduce B |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in res.items():
        if m["world"] == 1:
            continue
        dp, ep = LAYOUTS[name]
        c = m["comm"]
        # what rank 0's units gather: everything, but only an ep-th of the routed experts under expert parallel,
        # and none of them when efsdp = dp_shard / ep = 1 (an expert shard then lives whole on its rank)
        efsdp = dp // ep
        P = 4 * (m["n_params"] - m["expert_params"] + (m["expert_params"] // ep if efsdp > 1 else 0))
        ag = 2 * P - m["root_params"] * 4  # every unit gathered in forward and backward, the root once
        rs = P
        tokens = args.batch // dp * args.seq
        a2a = 4 * m["moe_layers"] * tokens * BENCH_MEDIUM["num_experts_per_tok"] * BENCH_MEDIUM["hidden_size"] * 4 \
            if ep > 1 else 0
        print(f"| dp_shard {dp}{f' ep {ep}' if ep > 1 else ''} | {c.get('all-gather', 0) / mib:.1f} | "
              f"{ag / mib:.1f} | {c.get('reduce-scatter', 0) / mib:.1f} | {rs / mib:.1f} | "
              f"{c.get('all-to-all', 0) / mib:.2f} | {a2a / mib:.2f} | {c.get('all-reduce', 0)} |")


if __name__ == "__main__":
    main()
