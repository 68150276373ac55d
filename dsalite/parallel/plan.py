"""`dsalite train RECIPE --dry-run --nproc N`: a layout planned at the model's real size, without the hardware.

One process stands for rank 0 of N on torch's fake process group (collectives do nothing): the recipe's model is
built on the `meta` device (no memory), expert parallel and FSDP2 are applied exactly as in training, and the
figures are read off the result:
  params / grads / optimizer   bytes of this rank's shards (fp32 master weights and gradients, AdamW's two fp32
                               moments), from the local shapes FSDP2 and EP leave on the rank (padding included)
  gathered                     the largest FSDP unit unsharded in the compute dtype, twice (one unit computes while
                               the next is gathered)
  activations                  an estimate per micro-batch (`activation_bytes`; the formula is there)
  communication per step       FSDP: all-gather in forward and again in backward (the root's only once) and a
                               reduce-scatter of fp32 gradients, each (F-1)/F of the unit's bytes for F sharding
                               ranks, plus (R-1)/R·2 of the shard for dp_replicate = R; EP: four all-to-alls per MoE
                               layer (dispatch and combine, forward and backward) of tokens·k·D values, of which
                               (ep-1)/ep leave the rank with uniform routing; CP: the other cp-1 ranks' latents and
                               indexer keys received per layer in forward (again with recompute) and their gradients
                               sent back in backward (`context_parallel.gather_bytes`).
The only measurement is of shapes; nothing here runs a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsalite.parallel.mesh import Layout, LayoutError


@dataclass
class Plan:
    layout: Layout
    model_type: str
    n_params: int  # whole model (MTP included)
    params: int  # bytes on rank 0
    grads: int
    optimizer: int
    gathered: int
    activations: int
    comm: dict = field(default_factory=dict)  # dimension -> bytes sent or received by rank 0 per optimizer step
    notes: list = field(default_factory=list)
    recompute: bool = False
    in_flight: int = 1  # micro-batches whose activations rank 0 holds at once (pipeline schedules: more than one)

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer

    def table(self) -> str:
        acts = "per micro-batch" if self.in_flight == 1 else f"for {self.in_flight} micro-batches in flight"
        rows = [f"{self.model_type}: {self.n_params / 1e9:.2f}B parameters (MTP included), {self.layout.describe()}",
                f"  per rank: parameters {_size(self.params)}, gradients {_size(self.grads)}, AdamW state "
                f"{_size(self.optimizer)}: {_size(self.state)}",
                f"            + gathered units {_size(self.gathered)} + activations ≈ {_size(self.activations)} "
                f"{acts} ({'with' if self.recompute else 'no'} recompute)"]
        rows += [f"  communication per step, {k}: {_size(v)}" for k, v in self.comm.items()]
        rows += [f"  note: {n}" for n in self.notes]
        return "\n".join(rows)


def _size(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def activation_bytes(cfg, tokens: int, dtype_bytes: int, recompute: bool = False, layers=None) -> int:
    """Saved-for-backward bytes of one micro-batch of `tokens` tokens per rank, estimated per token and layer as
    the tensors an MLA block keeps: 4 normed/residual hidden states (4·D), the query path (q_lora + H·(n+p)), the
    latent (r+p), the attention output (H·v) and the attention probabilities over the top-k selection (H·k_sel);
    for MoE layers the k routed rows through SwiGLU (k·(D + 3·I)) plus the shared expert (3·I_shared), for dense
    layers 3·I. With recompute, a block keeps only its input (D per token) and one block's worth is live at a time.
    DeepSeek-V4's blocks (mHC streams, compressed attention) are counted with the same formula: a rough figure.
    `layers`: the global layer indices counted (a pipeline stage's; default every trunk and MTP layer)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk = (cfg.qk_nope_head_dim or 0) + (cfg.qk_rope_head_dim or 0)
    attn = 4 * D + (cfg.q_lora_rank or 0) + H * qk + (cfg.kv_lora_rank or 0) + (cfg.qk_rope_head_dim or 0) \
        + H * (cfg.v_head_dim or 0) + H * min(cfg.index_topk or 0, 4096)
    per_layer = []
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers) if layers is None else layers:
        if cfg.layer_mlp_type(i) == "sparse":
            mlp = cfg.num_experts_per_tok * (D + 3 * cfg.moe_intermediate_size) \
                + 3 * cfg.moe_intermediate_size * cfg.n_shared_experts
        else:
            mlp = 3 * cfg.intermediate_size
        per_layer.append(attn + mlp)
    per_token = len(per_layer) * D + max(per_layer) if recompute else sum(per_layer)
    return tokens * per_token * dtype_bytes


def plan(r, nproc: int, cfg=None) -> Plan:
    """Plan recipe `r` at `nproc` processes (rank 0's view) on the fake process group; see the module docstring."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dsalite import parallel
    from dsalite.layers.moe import Experts
    from dsalite.model import Transformer
    from dsalite.parallel.expert_parallel import apply_expert_parallel
    from dsalite.parallel.fsdp import apply_fsdp
    from dsalite.parallel.mesh import build_meshes

    if cfg is None:
        from dsalite.training.trainer import model_config

        cfg = model_config(r)
    layout = Layout.from_recipe(r.parallel).check(nproc, cfg.n_routed_experts, r.data.batch_size)
    notes = []
    try:
        parallel.check_recipe(r, nproc, cfg)
    except LayoutError as e:
        notes.append(f"training this recipe at this layout is refused today: {e}")
    if cfg.model_type == "deepseek_v4":
        notes.append("DeepSeek-V4: the activation figure counts its blocks with the MLA formula (mHC streams and "
                     "compressed attention not modelled): a rough figure")
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[r.parallel.param_dtype]
    cb = torch.empty((), dtype=compute).element_size()
    if dist.is_initialized():
        raise RuntimeError("--dry-run plans on a fake process group of its own; a process group already exists")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=nproc)
    try:
        meshes = build_meshes(layout, "cpu")
        with torch.device("meta"):
            model = Transformer(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        stage, roots = None, [model]  # pipeline: rank 0 holds stage 0 (and pp, 2·pp, ... when looped)
        if layout.pp > 1:
            from dsalite.parallel.pipeline import plan_for
            from dsalite.parallel.pipeline_stage import cut

            split, spec, lines = plan_for(r, cfg, layout)
            notes[:0] = lines
            roots = cut(model, split, list(range(0, spec.stages, spec.pp)))
            stage = [i for s in range(0, spec.stages, spec.pp) for i in split.layers(s)]
        if layout.ep > 1:
            apply_expert_parallel(model, meshes.ep)
        units = [u for root in roots for u in apply_fsdp(root, meshes.dense, meshes.experts, param_dtype=compute)] \
            if nproc > 1 else [model]
        params = sum(_local_bytes(p) for p in model.parameters())
        comm, gathered = {}, []
        own = {}  # unit -> its own parameters (not those of units inside it)
        claimed = set()
        for u in units:
            mine = [p for p in u.parameters() if id(p) not in claimed]
            claimed |= {id(p) for p in mine}
            own[u] = mine
        for u, ps in own.items():
            mesh = meshes.experts if isinstance(u, Experts) and meshes.experts is not None else meshes.dense
            full = sum(p.numel() for p in ps)  # as seen by FSDP: the ep shard for experts
            if mesh is meshes.experts:
                full //= layout.ep
            F = layout.dp_shard * layout.cp if mesh is meshes.dense else layout.efsdp  # FSDP spans dp_shard × cp
            gathered.append(full * cb)
            ag = (1 if u is model else 2) * full * cb * (F - 1) / F
            rs = full * 4 * (F - 1) / F
            key = "FSDP (experts)" if mesh is meshes.experts else "FSDP"
            comm[key] = comm.get(key, 0) + ag + rs
            if layout.dp_replicate > 1:
                comm["HSDP all-reduce"] = comm.get("HSDP all-reduce", 0) + 2 * (full / F) * 4 * \
                    (layout.dp_replicate - 1) / layout.dp_replicate
        tokens = r.data.batch_size // layout.dp * r.data.seq_len // layout.cp  # this rank's, per micro-batch
        held = range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers) if stage is None else stage
        if layout.ep > 1:
            moe = sum(1 for i in held if cfg.layer_mlp_type(i) == "sparse")
            comm["EP all-to-all"] = 4 * moe * tokens * cfg.num_experts_per_tok * cfg.hidden_size * cb * \
                (layout.ep - 1) / layout.ep * r.train.accum_steps
        acts, live = activation_bytes(cfg, tokens, cb, r.train.recompute), 1
        if layout.cp > 1:
            from dsalite.parallel.context_parallel import gather_bytes, state_widths

            comm["CP gathers (latents, indexer keys)"] = gather_bytes(cfg, tokens, layout.cp, cb, r.train.recompute) \
                * r.train.accum_steps
            # the other ranks' latents and indexer keys, gathered and kept for backward (with recompute one layer's)
            compact, _ = state_widths(cfg)
            acts += tokens * (layout.cp - 1) * cb * (max(compact) if r.train.recompute else sum(compact))
        if stage is not None:  # per micro-batch, times the micro-batches stage 0 holds at once
            mb, M, P, v = tokens // spec.microbatches, spec.microbatches, layout.pp, spec.per_rank
            # forwards of one stage's worth (1/v of rank 0's layers) held before the first backward frees one
            chunks = {"1f1b": min(P, M), "gpipe": M, "looped-bfs": M * v,
                      "interleaved-1f1b": min(M * v, (v - 1) * P + 2 * P - 1)}[spec.schedule]
            live = max(1, round(chunks / v))
            acts = activation_bytes(cfg, mb, cb, r.train.recompute, stage) * chunks // v
            for key in [k for k in comm if k.startswith("FSDP")]:  # gathers and reduce-scatters every micro-batch
                comm[key] *= M
            comm["PP send/recv"] = 2 * tokens * cfg.hidden_size * cb * r.train.accum_steps
        gathered.sort()
        return Plan(layout, cfg.model_type, n_params, params, params, 2 * params,
                    sum(gathered[-2:]) if nproc > 1 else 0, acts,
                    {k: int(v) for k, v in comm.items()}, notes, r.train.recompute, live)
    finally:
        dist.destroy_process_group()


def ideal_shard_bytes(cfg, layout: Layout) -> float:
    """Analytic fp32 parameter bytes per rank without padding: every tensor split evenly over the ranks sharding
    it (dp_shard × cp for the dense part, ep × efsdp for routed experts; dp_replicate holds copies)."""
    from dsalite.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj",
                                                                                 "experts.down_proj")))
    dense = sum(p.numel() for p in model.parameters()) - experts
    return 4 * (dense / (layout.dp_shard * layout.cp) + experts / (layout.dp_shard * layout.cp))


def describe_ratio(p: Plan, cfg) -> str:
    ideal = ideal_shard_bytes(cfg, p.layout)
    return f"per-rank parameters / even split = {p.params / ideal:.4f}"



