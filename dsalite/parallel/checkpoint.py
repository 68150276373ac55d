"""Training state under a parallel layout with Distributed Checkpoint, and the HF export streamed from the shards.

`DIR/checkpoints/step-NNNNNNNN/` holds DCP's files (`.metadata` plus one `__{rank}_0.distcp` per rank: every rank
writes its own shards) and `trainer.json` (step, data position, layout). The model and optimizer states are taken
with `get_state_dict`, keyed by parameter name (FSDP2 and expert parallel keep the names), so DCP reshards on load:
a checkpoint written at one layout resumes at another, or in one process (no process group), where it loads into
the plain model. Router biases are buffers of the model state; the RNG state rides along.

Atomic like every writer in dsalite (`checkpoint.io.atomic_dir`): rank 0 makes the temporary folder and tells the
others its name, all ranks write into it, and rank 0 renames it once DCP has finished (DCP's own closing collective
means every rank's files are complete); a crash or SIGKILL leaves a `step-N.tmp-*` folder beside the previous
checkpoint, which is removed by the next save or resume.

The export (`export_hf`) writes the same HF checkpoint as a one-process run, without holding the model anywhere:
parameters are gathered one at a time (`DTensor.full_tensor()`, a collective every rank joins in the same order)
and rank 0 writes each shard file once its tensors are in, so a rank holds one full parameter plus at most one
shard file of tensors.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from dsalite.checkpoint.io import CONFIG_NAME, TEMP_MARK, atomic_dir, plan_shards, write_json, write_shards
from dsalite.checkpoint.names import FUSED_PARTS, dsalite_to_disk_name, dsalite_to_disk_names, fused_kind
from dsalite.training import checkpointing

META = ".metadata"  # written by DCP last: its presence marks a complete DCP folder
TRAINER = "trainer.json"
_NAME = re.compile(r"^step-(\d{8})$")


# ----- finding checkpoints (both kinds: one-process state.pt and DCP folders) -----


def list_dcp(out: str) -> list[tuple[int, str]]:
    """Complete DCP checkpoints under DIR/checkpoints, oldest first."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(root, name, META)) and os.path.isfile(os.path.join(root, name, TRAINER)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest(out: str) -> tuple[int, str, str] | None:
    """(step, folder, "dcp" | "torch") of the newest complete checkpoint of either kind, or None."""
    every = [(s, p, "dcp") for s, p in list_dcp(out)]
    every += [(s, p, "torch") for s, p in checkpointing.list_checkpoints(out)]
    return max(every) if every else None


def remove_stale_temps(out: str) -> None:
    for d in glob.glob(os.path.join(out, "checkpoints", f"step-*{TEMP_MARK}*")):
        shutil.rmtree(d, ignore_errors=True)


# ----- the state -----


def _app_state(trainer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(trainer.model, trainer.optimizers)
    return {"model": model, "optim": optim, "rng": torch.get_rng_state()}


def _data_position(trainer) -> dict:
    r = trainer.recipe
    return {"seed": r.data.seed, "global_batch": r.data.batch_size, "accum_steps": r.train.accum_steps,
            "seq_len": r.data.seq_len, "batches_read": trainer.step * r.train.accum_steps}


def save_state(out: str, trainer, keep_last: int) -> str:
    """Every rank writes its shards of the full training state for `trainer.step`; then all but the newest
    `keep_last` checkpoints are deleted (by rank 0)."""
    import torch.distributed.checkpoint as dcp

    par = trainer.par
    path = checkpointing.checkpoint_dir(out, trainer.step)
    state = _app_state(trainer)
    if par.is_main:
        remove_stale_temps(out)
        with atomic_dir(path) as tmp:
            dist.broadcast_object_list([tmp], src=0)
            dcp.save(state, checkpoint_id=tmp)
            info = {"step": trainer.step, "data": _data_position(trainer), "layout": vars(par.layout),
                    "world": par.layout.world}
            write_json(os.path.join(tmp, TRAINER), info)
    else:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        dcp.save(state, checkpoint_id=box[0])
    par.barrier()  # the folder is renamed into place before anyone goes on
    if par.is_main:
        done = sorted(set(list_dcp(out)) | set(checkpointing.list_checkpoints(out)))
        for _, old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: str, trainer) -> None:
    """Load a DCP checkpoint folder into `trainer` (any layout, or one process without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    with open(os.path.join(path, TRAINER)) as f:
        info = json.load(f)
    want, got = _data_position(trainer), info["data"]
    for key in ("seed", "global_batch", "accum_steps", "seq_len"):
        if want[key] != got[key]:
            raise ValueError(f"{path}: checkpoint was written with {key}={got[key]}, this run has {want[key]}; "
                             "resuming would read other batches than the interrupted run (the global batch, seed "
                             "and sequence length must stay the same; the parallel layout may change)")
    state = _app_state(trainer)
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())  # one process: no group
    set_state_dict(trainer.model, trainer.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"])
    trainer.step = info["step"]


def load_latest(out: str, trainer) -> bool:
    """Resume `trainer` from the newest checkpoint in DIR; False when there is none."""
    if trainer.par is None or trainer.par.is_main:
        remove_stale_temps(out)
    if trainer.par is not None:
        trainer.par.barrier()
    found = latest(out)
    if found is None:
        return False
    step, path, kind = found
    if kind == "torch":
        load_one_process_state(path, trainer)
        return True
    load(path, trainer)
    if trainer.step != step:
        raise ValueError(f"{path}/{TRAINER} records step {trainer.step}, expected {step}")
    return True


def load_one_process_state(path: str, trainer) -> None:
    """Load a one-process `state.pt` under a layout: every rank reads the file (it fit one process) and keeps its
    shards. The optimizers' states are keyed by position in the one-process run; this run's optimizers hold the same
    parameters in the same order (build_optimizers over the same names: FSDP2 and expert parallel keep them), so
    positions map to parameter names, and torch's set_state_dict shards the full tensors like the parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if trainer.par.pipeline is not None:
        raise ValueError(f"{path} was written by a one-process run (state.pt); resuming it under pipeline "
                         "parallelism is not supported: resume it in one process or at a layout without pp")
    s = torch.load(os.path.join(path, checkpointing.STATE), map_location="cpu", weights_only=False)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    optim: dict = {"state": {}, "param_groups": []}
    if len(s["optimizers"]) != len(trainer.optimizers):
        raise ValueError(f"{path}/state.pt holds {len(s['optimizers'])} optimizer states, this run builds "
                         f"{len(trainer.optimizers)} (was train.optimizer changed?)")
    for o, st in zip(trainer.optimizers, s["optimizers"]):
        if len(o.param_groups) != len(st["param_groups"]):
            raise ValueError(f"{path}/state.pt: an optimizer has {len(st['param_groups'])} parameter groups, this "
                             f"run's has {len(o.param_groups)}")
        for g, sg in zip(o.param_groups, st["param_groups"]):
            fqns = [names[id(p)] for p in g["params"]]
            if len(fqns) != len(sg["params"]):
                raise ValueError(f"{path}/state.pt: a parameter group holds {len(sg['params'])} parameters, this "
                                 f"run's holds {len(fqns)} (another model or stage?)")
            optim["state"].update({f: st["state"][i] for f, i in zip(fqns, sg["params"]) if i in st["state"]})
            optim["param_groups"].append({**{k: v for k, v in sg.items() if k != "params"}, "params": fqns})
    set_state_dict(trainer.model, trainer.optimizers, model_state_dict=s["model"], optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(s["rng"])
    trainer.step = s["step"]


# ----- the HF export, streamed -----


class _Gather:
    """Full tensors of a (possibly sharded) state dict, one at a time: the last one gathered is kept for the items
    that slice it (per-expert tensors), so every parameter is gathered exactly once, in state-dict order."""

    def __init__(self, sd: dict):
        self.sd, self.name, self.full = sd, None, None

    def __call__(self, name: str) -> torch.Tensor:
        if name != self.name:
            t = self.sd[name].detach()
            self.full = None
            self.full = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
            self.name = name
        return self.full


def export_items(sd: dict, cfg, gather: _Gather) -> list:
    """(disk name, producer, nbytes) for every tensor of the HF checkpoint, in state-dict order; shapes come from
    the (global) DTensor shapes, data from `gather` when a producer runs. Same names and per-expert split as
    `checkpoint.save.disk_items`."""
    items = []
    for name, t in sd.items():
        kind = fused_kind(name)
        if kind is None:
            items.append((dsalite_to_disk_name(name, cfg), lambda n=name: gather(n), t.numel() * t.element_size()))
            continue
        parts = FUSED_PARTS[kind]
        E, rows, cols = t.shape[0], t.shape[1] // len(parts), t.shape[2]
        for j, dk in enumerate(dsalite_to_disk_names(name, cfg, E)):
            e, p = divmod(j, len(parts))
            items.append((dk, lambda n=name, e=e, a=p * rows, b=(p + 1) * rows: gather(n)[e, a:b].clone(),
                          rows * cols * t.element_size()))
    return items


def export_hf(trainer, tok_dir: str, out: str, max_shard_bytes: int = 5 * 2**30) -> str:
    """The trained model as an HF checkpoint in DIR/hf (MTP included) with the tokenizer beside it; every rank
    calls this, rank 0 writes."""
    par, model = trainer.par, trainer.model
    cfg = model.cfg
    path = os.path.join(out, "hf")
    sd = model.state_dict()
    gather = _Gather(sd)
    items = export_items(sd, cfg, gather)
    if par.is_main:
        write_hf(cfg, items, tok_dir, path, max_shard_bytes)
    else:
        for _, produce, _ in items:  # the same gathers in the same order as rank 0's writer
            produce()
    gather.full = None
    par.barrier()
    return path


def write_hf(cfg, items: list, tok_dir: str, path: str, max_shard_bytes: int) -> None:
    """Write `export_items` (produced one at a time, in order) as an HF checkpoint folder, atomically, with the
    config and the tokenizer beside them."""
    shards, names = plan_shards(items, lambda item: item[2], max_shard_bytes)
    config = cfg.to_hf()
    config.pop("quantization_config", None)  # a trained model is written in its training dtype
    with atomic_dir(path) as tmp:
        write_json(os.path.join(tmp, CONFIG_NAME), config)
        write_shards(tmp, shards, names, "exporting")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copyfile(os.path.join(tok_dir, name), os.path.join(tmp, name))
