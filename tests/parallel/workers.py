"""What the ranks of the multi-process tests run, and the harness that starts them (plain subprocesses with
torchrun's environment, a hard timeout, and the whole process group killed on failure or timeout)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# Tiny models of the three trainable families: GLM-5.2 (IndexShare schedule FFSF + MTP), DeepSeek-V3.2 (group
# routing, indexer everywhere), DeepSeek-V3 (no indexer). 4 layers, the first dense; seq_len 32 > index_topk 8, so
# the selection is sparse.
_SMALL = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
              num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=16)
FAMILIES = {
    "glm-5.2": ("glm-5.2-tiny", dict(_SMALL, index_topk=8, index_n_heads=4, index_head_dim=16,
                                     index_topk_pattern="FFSF")),
    "deepseek-v3.2": ("deepseek-v3.2-tiny", dict(_SMALL, index_topk=8, index_n_heads=4, index_head_dim=16)),
    "deepseek-v3": ("deepseek-v3-tiny", dict(_SMALL)),
}
# DeepSeek-V4 (trained by its own parity test): 2 mHC streams, hash-routed layers 0-1, a CSA layer whose 8 entries
# of a 32-token window the indexer cuts to 3, an HCA layer, an MTP layer; the preset as it is.
V4 = ("deepseek-v4-tiny", {})


def write_documents(path, n_docs: int = 400, seed: int = 0) -> str:
    """A JSONL corpus of short documents of uneven length: most windows hold several documents, so the number of
    tokens with a label (none across a document boundary) differs from row to row and from rank to rank."""
    import random

    from train_fixtures import WORDS

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))}) + "\n")
    return str(path)


def recipe(family: str, files: list[str], parallel: dict | None = None, **train):
    from dsalite.training.recipe import parse_recipe

    preset, overrides = V4 if family == "deepseek-v4" else FAMILIES[family]
    t = dict(stage="pretrain", max_steps=5, lr=3e-3, warmup_steps=2, save_every=100, threads=1)
    t.update(train)
    return parse_recipe({
        "model": {"preset": preset, "overrides": dict(overrides), "init_std": 0.05},
        "data": {"files": files, "vocab_size": 300, "seq_len": 32, "batch_size": 4},
        "train": t,
        "parallel": dict(parallel or {}),
    })


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full tensor (a collective under FSDP: every rank calls it)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


def train_steps(r, out: str, steps: int, par=None, first_grads: bool = False) -> dict:
    """`steps` optimizer steps of recipe r; per-step records and the final full state (and with `first_grads` every
    parameter's full gradient of step 1, after clipping, as the optimizer received it)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from dsalite.training.trainer import Trainer, _main_first, prepare_data

    t = Trainer(r, out, par=par)
    t.set_data(_main_first(par, lambda: prepare_data(r, out, t.n_mtp))[0])
    grads: dict[str, torch.Tensor] = {}

    def capture(opt, args, kwargs):  # every rank runs it at the same point: full_tensor() is a collective
        if first_grads and not grads:
            for k, p in t.model.named_parameters():
                if p.grad is not None:
                    g = p.grad.detach()
                    grads[k] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()

    handle = register_optimizer_step_pre_hook(capture)
    try:
        recs = [t.train_step() for _ in range(steps)]
    finally:
        handle.remove()
    return {"recs": recs, "state": full_state(t.model), "grads": grads}


# ----- worker side -----


def job_parity(args: dict, par_init) -> dict:
    """args: {"runs": [{"family", "files", "parallel", "train", "out", "steps"}]} → results per run (rank 0)."""
    results = []
    for run in args["runs"]:
        r = recipe(run["family"], run["files"], run.get("parallel"), **run.get("train", {}))
        par = par_init(r)
        results.append(train_steps(r, run["out"], run["steps"], par, run.get("first_grads", False)))
    return {"results": results}


def job_ep_exact(args: dict, par_init) -> dict:
    """`dispatch_combine` over all ranks (ep = world) against one process's `Experts.forward` on the global batch,
    outputs and gradients, for each case in args["cases"]: "random", "sparse" (an expert no token picks, and
    experts that get tokens from one rank only), "one_expert" (every token's first choice is expert 0), "idle_rank"
    (no token picks an expert of ranks > 0).
    Returns, per case, the largest absolute difference over all ranks (0.0 = bit-identical)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dsalite.layers.moe import Experts
    from dsalite.parallel.expert_parallel import apply_expert_parallel

    dist.init_process_group("gloo")
    P, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (P,), mesh_dim_names=("ep",))
    E, D, I, k, N = 4 * P, 16, 8, 2, 24  # N tokens per rank
    out = {}
    for case in args["cases"]:
        g = torch.Generator().manual_seed(1)
        ref = Experts(E, D, I)
        with torch.no_grad():
            ref.gate_up_proj.normal_(0, 0.3, generator=g)
            ref.down_proj.normal_(0, 0.3, generator=g)
        x = torch.randn(P * N, D, generator=g)
        w = torch.rand(P * N, k, generator=g)
        scores = torch.rand(P * N, E, generator=g)
        if case == "sparse":  # expert E-1 gets nothing; experts 1 and 2 get tokens from rank 0's rows only
            scores[:, E - 1] = -1
            scores[N:, 1:3] = -1
        if case == "one_expert":
            scores[:, 0] = 2
        if case == "idle_rank":  # every token picks experts of rank 0: the other ranks receive no row at all
            scores[:, E // P:] = -1
        ids = scores.topk(k, dim=-1).indices
        ep = Experts(E, D, I)
        ep.load_state_dict(ref.state_dict())
        apply_expert_parallel(ep, mesh)
        rows = slice(rank * N, (rank + 1) * N)
        xr = x.clone().requires_grad_()
        y_ref = ref(xr, ids, w)
        gy = torch.randn(y_ref.shape, generator=g)
        (y_ref * gy).sum().backward()
        xl = x[rows].clone().requires_grad_()
        y = ep(xl, ids[rows], w[rows])
        (y * gy[rows]).sum().backward()
        El = E // P
        own = slice(rank * El, (rank + 1) * El)
        diffs = [(y - y_ref[rows]).abs().max(), (xl.grad - xr.grad[rows]).abs().max(),
                 (ep.gate_up_proj.grad.to_local() - ref.gate_up_proj.grad[own]).abs().max(),
                 (ep.down_proj.grad.to_local() - ref.down_proj.grad[own]).abs().max()]
        d = torch.stack(diffs)
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        out[case] = {"max_diff": d.tolist(), "tokens_per_expert": counts.tolist()}
    return out


def job_kill_during_save(args: dict, par_init) -> dict:
    """Save step 1 with Distributed Checkpoint, then die by SIGKILL on rank 1 in the middle of saving step 2 (after
    writing part of its file into the temporary folder)."""
    import torch.distributed.checkpoint as dcp

    from dsalite.training.trainer import Trainer, _main_first, prepare_data

    r = recipe(args["family"], args["files"], {"dp_shard": 2})
    par = par_init(r)
    t = Trainer(r, args["out"], par=par)
    t.set_data(_main_first(par, lambda: prepare_data(r, args["out"], t.n_mtp))[0])
    t.train_step()
    par.checkpoint.save_state(args["out"], t, keep_last=2)
    t.train_step()
    if par.rank == 1:
        def dying_save(state, checkpoint_id):
            with open(os.path.join(checkpoint_id, "__1_0.distcp"), "wb") as f:
                f.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)

        dcp.save = dying_save
    par.checkpoint.save_state(args["out"], t, keep_last=2)
    return {}


class PeakRSS:
    """The largest resident set size seen while the block runs, sampled from /proc/self/statm every millisecond
    (ru_maxrss cannot see a peak below the one `import torch` left)."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def job_sharded_load(args: dict, par_init) -> dict:
    """--init-from under a layout, for each of args["ckpts"]: each rank's peak RSS growth while building on meta,
    sharding and reading its slices (after loading the small args["warmup"] checkpoint the same way, so that imports
    and first collectives are not counted); then (rank 0) the largest difference between the loaded model and a
    one-process `from_pretrained` of the same checkpoint."""
    import gc

    import torch.distributed as dist

    from dsalite.checkpoint.pretrained import from_pretrained
    from dsalite.training.recipe import parse_recipe

    def recipe_for(path):
        return parse_recipe({"model": {"init_from": path}, "data": {"batch_size": 4}, "parallel": args["parallel"]})

    par = par_init(recipe_for(args["warmup"]))
    m = par.model_on_meta(recipe_for(args["warmup"]))  # first use of every code path before measuring
    par.parallelize(m)
    par.load_pretrained(m, args["warmup"])
    del m
    results = []
    for path in args["ckpts"]:
        r = recipe_for(path)
        gc.collect()
        with PeakRSS() as rss:
            model = par.model_on_meta(r)
            par.parallelize(model)
            par.load_pretrained(model, path)
        peaks = [torch.zeros(1) for _ in range(dist.get_world_size())]
        dist.all_gather(peaks, torch.tensor([float(rss.growth)]))
        full = full_state(model)
        out = {"rss_growth": [float(p) for p in peaks]}
        if par.is_main:
            ref = from_pretrained(path).state_dict()
            assert ref.keys() == full.keys(), set(ref) ^ set(full)
            out["max_diff"] = max(float((ref[k] - full[k]).abs().max()) for k in ref)
            out["model_bytes"] = sum(v.numel() * v.element_size() for v in ref.values())
        results.append(out)
        del model, full
    return {"results": results}


JOBS = {"parity": job_parity, "sharded_load": job_sharded_load, "ep_exact": job_ep_exact,
        "kill_during_save": job_kill_during_save}


def worker_main(job: str, args_file: str, result_file: str) -> None:
    import faulthandler

    import torch.distributed as dist

    from dsalite import parallel

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the harness asks for stacks before a timeout kill
    torch.set_num_threads(1)
    with open(args_file) as f:
        args = json.load(f)
    extra = __import__(args["module"], fromlist=["JOBS"]).JOBS if "module" in args else {}
    res = {**JOBS, **extra}[job](args, parallel.init)
    if dist.get_rank() == 0:
        torch.save(res, result_file + ".tmp")
        os.replace(result_file + ".tmp", result_file)
    dist.barrier()
    dist.destroy_process_group()


# ----- harness side -----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(job: str, args: dict, nproc: int, tmp, timeout: float = 240.0) -> dict:
    """Start `nproc` ranks of `job` and return rank 0's result. A rank that fails, or a run that outlives
    `timeout` seconds (a hung collective), kills every rank and fails with their output."""
    args_file, result_file = os.path.join(tmp, f"{job}-args.json"), os.path.join(tmp, f"{job}-result.pt")
    with open(args_file, "w") as f:
        json.dump(args, f)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), *sys.path]))
    procs, logs = [], []
    for rank in range(nproc):
        log = open(os.path.join(tmp, f"{job}-rank{rank}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", f"import workers; workers.worker_main({job!r}, {args_file!r}, {result_file!r})"],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f} s (a hung collective?)"
                for p in procs:  # each rank's Python stacks into its log
                    if p.poll() is None:
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(1.0)
                break
            time.sleep(0.05)
        if failed is None and any(p.returncode for p in procs):
            failed = "a rank failed: " + ", ".join(f"rank {i} -> {p.returncode}" for i, p in enumerate(procs))
    finally:
        for p in procs:  # every rank's whole session: nothing outlives the test
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if failed:
        text = []
        for i, log in enumerate(logs):
            log.seek(0)
            text.append(f"--- rank {i} ---\n" + log.read()[-4000:])
        raise AssertionError(f"{job} on {nproc} ranks: {failed}\n" + "\n".join(text))
    for log in logs:
        log.close()
    return torch.load(result_file, weights_only=False)
