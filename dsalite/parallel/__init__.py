"""Parallel training on torch.distributed, applied to a built model from outside (torchtitan's rule: the model and
its layers contain no torch.distributed).

  mesh.py             the [parallel] layout → checks with named errors → DeviceMeshes
  expert_parallel.py  routed experts split over the ep mesh, tokens dispatched with all_to_all_single
  context_parallel.py sequences split over the cp mesh (zigzag); latents and indexer keys gathered, nothing else
  fsdp.py             FSDP2 units (experts, blocks, MTP layers, embeddings, root) and the global gradient norm
  data_parallel.py    each rank's slice of the global batch and share of the global losses; global metrics
  checkpoint.py       training state with Distributed Checkpoint (any layout → any layout), streamed HF export
  launch.py           `dsalite train --nproc N` (torch.distributed.run's elastic launcher) and worker setup
  pipeline.py         where pipeline stages cut the model (IndexShare guard, FLOPs balance); pipeline_stage.py
                      runs them (a stage = the model with the other layers deleted; torch.distributed.pipelining)

`Parallel.parallelize(model)` applies, in this fixed order: the pipeline cut (pp > 1), context parallel (cp > 1: the
model's per-call Context gets the split's visibility and gather), expert parallel (experts become ep-sharded
DTensors), then FSDP2 (activation recompute, when on, was applied by the trainer before: it wraps block forwards,
which FSDP's hooks then surround).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dsalite.parallel.mesh import Layout, LayoutError, Meshes


def check_recipe(r, world: int, cfg=None) -> Layout:
    """The recipe's resolved layout for `world` processes, or a named error; runs before any process group exists.
    `cfg` is the model config (built from the recipe when not given)."""
    if cfg is None:
        from dsalite.training.trainer import model_config

        cfg = model_config(r)
    layout = Layout.from_recipe(r.parallel).check(world, cfg.n_routed_experts, r.data.batch_size)
    if layout.world == 1:
        return layout
    if layout.pp > 1:
        from dsalite.parallel import pipeline

        pipeline.check(r, cfg, layout)
    if layout.cp > 1:  # before the families' own refusals: cp names what it cannot split (DeepSeek-V4 among them)
        from dsalite.parallel import context_parallel

        context_parallel.check(r, cfg, layout)
    if r.train.stage == "lora":
        raise LayoutError("train.stage='lora' is not supported under a parallel layout yet; run it in one process")
    return layout


def in_worker() -> bool:
    """Whether this process was started by torchrun / `--nproc` (torch.distributed's environment variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


@dataclass
class Parallel:
    layout: Layout
    meshes: Meshes
    device: torch.device
    rank: int
    param_dtype: torch.dtype = torch.float32  # FSDP's gathered-parameter dtype ([parallel] param_dtype)
    pipeline: object = None  # pipeline_stage.Pipeline: this rank's stage (None when pp = 1)
    cp: object = None  # context_parallel.ZigzagSplit: this rank's share of every sequence (None when cp = 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self):
        return self._dp

    def __post_init__(self):
        from dsalite.parallel.data_parallel import DataParallel

        m = self.meshes
        # batch rows by data-parallel rank; losses, loads and metrics summed over every rank holding other tokens
        self._dp = DataParallel(m.dp_rank, m.dp_size, m.tokens.get_group())

    def parallelize(self, model) -> None:
        """The pipeline cut (pp > 1), context parallel (cp > 1), expert parallel (ep > 1), then FSDP2, in place."""
        from dsalite.parallel.expert_parallel import apply_expert_parallel
        from dsalite.parallel.fsdp import apply_fsdp

        roots = [model]  # FSDP roots: the model, or each of this rank's pipeline stages
        if self.pipeline is not None:  # delete the layers other stages hold
            roots = self.pipeline.cut(model)
        if self.cp is not None:
            from dsalite.parallel.context_parallel import apply_context_parallel

            apply_context_parallel(model, self.cp)
        if self.layout.ep > 1:
            apply_expert_parallel(model, self.meshes.ep)
        for root in roots:
            apply_fsdp(root, self.meshes.dense, self.meshes.experts, param_dtype=self.param_dtype)

    def model_on_meta(self, r):
        """The recipe's init_from model on the meta device (see load.py)."""
        from dsalite.parallel.load import model_on_meta

        return model_on_meta(r.model.init_from)

    def load_pretrained(self, model, path: str) -> None:
        """Storage for this rank's shards of the parallelized meta `model`, filled with its slices of `path`."""
        from dsalite.parallel.load import load_sharded

        load_sharded(model, path, self.device)

    @property
    def checkpoint(self):
        """dsalite.parallel.checkpoint: save_state / load_latest / export_hf for this run."""
        from dsalite.parallel import checkpoint

        if self.pipeline is not None:  # the export reads the final checkpoint back (pipeline_stage.export_hf)
            from types import SimpleNamespace

            from dsalite.parallel.pipeline_stage import export_hf

            return SimpleNamespace(**{**vars(checkpoint), "export_hf": export_hf})
        return checkpoint

    def clip_grad_norm_(self, params, max_norm: float) -> float:
        from dsalite.parallel.fsdp import clip_grad_norm_

        stage = None if self.pipeline is None else self.meshes.stage.get_group()  # stages hold other parameters
        return clip_grad_norm_(params, max_norm, self.meshes.world.get_group(), stage)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.meshes.world.get_group())

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def init(r) -> Parallel:
    """Join (or start) the default process group this worker's environment describes, check the layout and build the
    meshes. NCCL for CUDA devices (with gloo for CPU tensors), gloo on CPU."""
    import torch.distributed as dist

    cuda = r.train.device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    world = dist.get_world_size()
    layout = check_recipe(r, world)
    from dsalite.parallel.mesh import build_meshes

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[r.parallel.param_dtype]
    meshes = build_meshes(layout, device.type)
    par = Parallel(layout, meshes, device, dist.get_rank(), dtype)
    if layout.cp > 1:
        from dsalite.parallel.context_parallel import ZigzagSplit

        par.cp = ZigzagSplit(r.data.seq_len, meshes.cp.get_local_rank(), layout.cp, meshes.cp.get_group())
    if layout.pp > 1:
        from dsalite.parallel.pipeline import PipelineSpec, check
        from dsalite.parallel.pipeline_stage import Pipeline
        from dsalite.training.trainer import model_config

        par.pipeline = Pipeline(par, PipelineSpec.from_recipe(r.parallel), check(r, model_config(r), layout))
    return par
