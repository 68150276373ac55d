"""Muon under a parallel layout (dsalite/parallel/muon.py): the optimizer a sharded run builds steps its FSDP2 shards
exactly as torch.optim.Muon steps the whole parameters in one process, given the same gradients; and a Muon recipe
trains at dp_shard 2 + ep 2."""

import pytest
import torch

from workers import recipe, run_ranks, train_steps, write_documents

LAYOUTS = [{"dp_shard": 2}, {"dp_shard": 2, "ep": 2}]


def _gradients(model) -> dict[str, torch.Tensor]:
    """The same made-up whole gradient for every Muon parameter on every rank (seeded by the parameter's name)."""
    out = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        g = torch.Generator().manual_seed(1000 + i)
        out[n] = torch.randn(p.shape, generator=g)
    return out


def _muon_steps(trainer, steps: int = 3) -> dict[str, torch.Tensor]:
    """Three steps of the trainer's Muon optimizer alone on made-up gradients; the Muon parameters afterwards, whole."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    muon = trainer.optimizers[-1]
    assert isinstance(muon, torch.optim.Muon)
    mine = {id(p) for g in muon.param_groups for p in g["params"]}
    named = [(n, p) for n, p in trainer.model.named_parameters() if id(p) in mine]
    grads = _gradients(trainer.model)
    for s in range(steps):
        for n, p in named:
            g = grads[n] * (s + 1)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) \
                if isinstance(p, DTensor) else g
        muon.step()
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named}


def job_muon_exact(args: dict, par_init) -> dict:
    from dsalite.training.trainer import Trainer

    out = {}
    for lay in args["layouts"]:
        r = recipe("glm-5.2", [], lay, optimizer="muon")
        t = Trainer(r, args["out"], par=par_init(r))
        out[str(lay)] = (type(t.optimizers[-1]).__name__, _muon_steps(t))
    out["uneven"] = _uneven_rows_equal()
    return out


def _uneven_rows_equal() -> bool:
    """A 25 × 16 matrix sharded 13 + 12 rows (FSDP2's split of an odd dimension) against one process's Muon."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dsalite.parallel.muon import ShardedMuon

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    g = torch.Generator().manual_seed(0)
    w, grads = torch.randn(25, 16, generator=g), [torch.randn(25, 16, generator=g) for _ in range(3)]
    whole = torch.nn.Parameter(w.clone())
    shard = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)], src_data_rank=None))
    a, b = torch.optim.Muon([whole], lr=0.02, weight_decay=0.1), ShardedMuon([shard], lr=0.02, weight_decay=0.1)
    for gr in grads:
        whole.grad, shard.grad = gr.clone(), distribute_tensor(gr.clone(), mesh, [Shard(0)], src_data_rank=None)
        a.step()
        b.step()
    return torch.equal(shard.full_tensor(), whole.detach())


JOBS = {"muon_exact": job_muon_exact}


@pytest.mark.timeout(200)
def test_sharded_muon_steps_equal_one_process_muon_bit_for_bit(tmp_path):
    from dsalite.training.trainer import Trainer

    one = Trainer(recipe("glm-5.2", [], optimizer="muon"), str(tmp_path / "one"))
    assert type(one.optimizers[-1]) is torch.optim.Muon  # one process: torch's own
    want = _muon_steps(one)
    got = run_ranks("muon_exact", {"module": "test_muon", "layouts": LAYOUTS, "out": str(tmp_path / "par")}, 2,
                    str(tmp_path), timeout=150)
    assert got["uneven"]  # an odd number of rows, split unevenly, too
    for lay in LAYOUTS:
        kind, params = got[str(lay)]
        assert kind == "ShardedMuon"
        assert params.keys() == want.keys()
        for n, w in want.items():
            assert torch.equal(params[n], w), f"{lay}: {n} differs by {(params[n] - w).abs().max():.3e}"


@pytest.mark.timeout(300)
def test_muon_recipe_trains_under_a_layout(tmp_path):
    """End to end at dp_shard 2 + ep 2. Step 1 equals one process within 1e-5 (same parameters, same gradients up to
    the sum order); afterwards Muon's Newton-Schulz runs in bf16, where a gradient differing in the 7th digit can
    round to another bf16 value, so later steps are compared as a trend (the loss falls), not to 1e-5."""
    files = [write_documents(tmp_path / "docs.jsonl")]
    ref = train_steps(recipe("glm-5.2", files, optimizer="muon"), str(tmp_path / "one"), 3)
    run = {"family": "glm-5.2", "files": files, "parallel": {"dp_shard": 2, "ep": 2}, "out": str(tmp_path / "par"),
           "steps": 3, "train": {"optimizer": "muon"}}
    got = run_ranks("parity", {"runs": [run]}, 2, str(tmp_path), timeout=240)["results"][0]
    a, b = ref["recs"][0], got["recs"][0]
    for key in ("loss", "ce", "mtp", "kl", "grad_norm"):
        assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a[key], b[key])
    assert got["recs"][-1]["loss"] < got["recs"][0]["loss"]
