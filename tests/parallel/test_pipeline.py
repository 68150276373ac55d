"""Pipeline parallel: the IndexShare-guarded split, its refusals, and training at pp = 2 (alone, with dp_shard and ep)
equal to one process; carried top-k equal to the guarded split; recompute bit-identical; resume in one process.

The model is workers' tiny GLM-5.2 (4 layers FFSF, the first dense) whose MTP layer (global index 4) is shared too
(freq 4, offset 3 rule), with source layer 3: the naive even split [0, 1 | 2, 3] cuts layer 2 from its source 1."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dsalite.cli import main
from dsalite.config import ModelConfig
from dsalite.parallel import check_recipe
from dsalite.parallel.mesh import Layout, LayoutError
from dsalite.parallel.pipeline import (PipelineSpec, Split, SplitError, allowed_starts, balanced_split, carry_bytes,
                                       imbalance, layer_costs, plan_split, violations)
from dsalite.training.trainer import model_config
from test_launch_checkpoint import RECIPE, dsalite, losses
from workers import full_state, recipe, run_ranks, write_documents

STEPS = 5
TOL = 1e-5


def _cfg(**parallel):
    return model_config(recipe("glm-5.2", [], parallel))


def test_test_model_is_the_case_the_guard_is_for():
    cfg = _cfg()
    assert cfg.indexer_types == ["full", "full", "shared", "full", "shared"]  # MTP layer 4 shares layer 3's top-k
    naive = Split((0, 2), 4, 1)
    assert violations(cfg.indexer_types, naive) == [(2, 1, 1, 0)]
    auto = plan_split(cfg, PipelineSpec(2, 2, "1f1b", (), False), 32)
    assert auto.starts != naive.starts and violations(cfg.indexer_types, auto) == []


def test_bad_split_is_refused_by_name():
    r = recipe("glm-5.2", [], {"pp": 2, "pp_split": [2], "pp_microbatches": 2})
    with pytest.raises(SplitError) as e:
        check_recipe(r, 2)
    msg = str(e.value)
    for words in ("parallel.pp_split=[2]", "layer 2 reuses the top-k of full layer 1", "layer 2 on stage 1",
                  "layer 1 on stage 0", "pp_carry_topk"):
        assert words in msg, msg
    r = recipe("glm-5.2", [], {"pp": 2, "pp_split": [3], "pp_microbatches": 2})
    assert check_recipe(r, 2).pp == 2
    # an MTP layer is guarded like a trunk layer: trunk FFSFS + MTP shared (source 3), last stage from layer 4
    types = ["full", "full", "shared", "full", "shared", "shared"]
    assert violations(types, Split((0, 1, 4), 5, 1)) == [(4, 3, 2, 1), (5, 3, 2, 1)]
    assert violations(types, Split((0, 1, 3), 5, 1)) == []


@pytest.mark.parametrize("parallel, words", [
    ({"pp": 2, "pp_split": [0]}, "must be increasing trunk layer indices in 1 .. 3"),
    ({"pp": 2, "pp_split": [1, 2]}, "has 2 entries; 2 stages (pp=2 × 1 per rank) need 1"),
    ({"pp": 5}, "more than the model's num_hidden_layers=4"),
    ({"pp": 3, "pp_schedule": "looped-bfs", "pp_microbatches": 4}, "pp=3 × 2 stages per rank is more than"),
    ({"pp": 2, "pp_schedule": "1f1b", "pp_stages_per_rank": 2}, "pp_stages_per_rank=2 does not fit"),
    ({"pp": 2, "pp_schedule": "interleaved-1f1b", "pp_microbatches": 4}, "cannot be split into 4 stages"),
    ({"pp": 2, "pp_schedule": "zero"}, "parallel.pp_schedule='zero' is unknown"),
    ({"pp": 2, "pp_microbatches": 3}, "pp_microbatches=3 does not divide the 4 rows"),
    ({"pp": 2, "pp_microbatches": 1}, "fewer than pp=2"),
    ({"pp": 2, "cp": 2}, "pipeline and context parallel together"),
    ({"pp": 2, "pp_microbatches": 2, "stage": "dsa_warmup"}, "with train.stage='dsa_warmup' is not supported"),
])
def test_unsupported_pipeline_layouts_are_named(parallel, words):
    parallel = dict(parallel)
    train = {"stage": parallel.pop("stage")} if "stage" in parallel else {}
    r = recipe("glm-5.2", [], parallel, **train)
    world = parallel.get("pp", 1) * parallel.get("cp", 1) * parallel.get("dp_replicate", 1)
    with pytest.raises(LayoutError) as e:
        check_recipe(r, world)
    assert words in str(e.value)


def test_deepseek_v4_stages_are_refused_by_name():
    from dsalite import presets
    from dsalite.parallel.pipeline import check

    cfg = ModelConfig.from_hf(dict(presets.PRESETS["deepseek-v4-tiny"]))
    r = recipe("glm-5.2", [], {"pp": 2, "pp_microbatches": 2})
    with pytest.raises(LayoutError, match="parallel.pp=2: pipeline stages of DeepSeek-V4"):
        check(r, cfg, Layout(pp=2, dp_shard=1))


def test_cli_refuses_bad_split_before_any_work(tmp_path, capsys):
    r = tmp_path / "r.toml"
    r.write_text(RECIPE.format(corpus=write_documents(tmp_path / "docs.jsonl"))
                 + "\n[parallel]\npp = 2\npp_microbatches = 2\npp_split = [2]\n")
    out = tmp_path / "out"
    assert main(["train", str(r), "--out", str(out), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "layer 2 reuses the top-k of full layer 1" in err and "stage 1" in err
    assert not out.exists()


def test_carry_topk_allows_any_boundary_and_reports_its_bytes():
    cfg = _cfg()
    split = plan_split(cfg, PipelineSpec(2, 2, "1f1b", (2,), True), 32)
    assert split.starts == (0, 2)
    assert carry_bytes(cfg, split, rows=2, seq_len=32) == [2 * 32 * 8 * 4]  # int32 [b, S, K]
    assert carry_bytes(cfg, Split((0, 3), 4, 1), 2, 32) == [0]  # a boundary on a full layer carries nothing


def test_real_glm52_split_is_guarded_and_balanced():
    """GLM-5.2 at its real widths (78 layers + MTP, freq 4 offset 3): the guarded split keeps every shared layer with
    its source; at pp = 2 and 4 its most loaded stage is within 5 % of the mean (pp = 8: bench/parallel.py)."""
    cfg = model_config(_real_glm52())
    costs, tail = layer_costs(cfg, 4096)
    for pp, limit in ((2, 1.05), (4, 1.05)):
        s = balanced_split(costs, tail, pp, allowed_starts(cfg, False), 1)
        assert violations(cfg.indexer_types, s) == []
        assert imbalance(costs, tail, s) <= limit, (pp, s.starts)
    # the carried top-k can only balance better: it may cut anywhere
    s8 = balanced_split(costs, tail, 8, allowed_starts(cfg, False), 1)
    c8 = balanced_split(costs, tail, 8, allowed_starts(cfg, True), 1)
    assert imbalance(costs, tail, c8) <= imbalance(costs, tail, s8)


def _real_glm52():
    from dsalite.training.recipe import load_recipe

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = load_recipe(os.path.join(root, "recipes", "glm5-744b.toml"))
    r.model.overrides.update(index_topk_freq=4, index_skip_topk_offset=3)
    return r


# ----- training (ranks as subprocesses) -----


def run_steps(r, out: str, steps: int, par=None, grads_at=(1, STEPS)) -> dict:
    """`steps` optimizer steps: per-step records, the full gradients (after clipping) at `grads_at` and the final
    full state; under a pipeline every stage's part, merged on every rank."""
    import torch.distributed as dist

    from dsalite.training.trainer import Trainer, _main_first, prepare_data

    t = Trainer(r, out, par=par)
    t.set_data(_main_first(par, lambda: prepare_data(r, out, t.n_mtp))[0])
    grads, opt = {}, t.optimizers[0]
    plain = opt.step

    def step(*a, **k):
        n = len(grads_seen) + 1
        grads_seen.append(n)
        if n in grads_at:
            grads[n] = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                        for name, p in t.model.named_parameters() if p.grad is not None}
        return plain(*a, **k)

    grads_seen: list = []
    opt.step = step
    recs = [t.train_step() for _ in range(steps)]
    res = {"recs": recs, "state": full_state(t.model), "grads": grads}
    if par is not None and par.pipeline is not None:  # every stage's first rank contributes its part
        mine = res if par.meshes.stage.get_local_rank() == 0 else None
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        for p in parts:
            if p is not None and p is not mine:
                res["state"].update(p["state"])
                for n, g in p["grads"].items():
                    res["grads"][n].update(g)
    return res


def job_pipeline(args: dict, par_init) -> dict:
    results = []
    for run in args["runs"]:
        r = recipe(run.get("family", "glm-5.2"), run["files"], run["parallel"], **run.get("train", {}))
        r.model.overrides.update(run.get("overrides", {}))
        par = par_init(r)
        results.append(run_steps(r, run["out"], STEPS, par, tuple(run.get("grads_at", (1, STEPS)))))
        results[-1]["split"] = par.pipeline.split.starts if par.pipeline is not None else None
        results[-1]["sent"] = dict(par.pipeline.sent) if par.pipeline is not None else None  # rank 0: stage 0
    return {"results": results}


JOBS = {"pipeline": job_pipeline}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm().clamp(min=1e-30))


def assert_same(ref, got, where, tol=TOL):
    for s, (a, b) in enumerate(zip(ref["recs"], got["recs"])):
        assert [k for k in ("mtp", "kl", "aux") if k in a] == [k for k in ("mtp", "kl", "aux") if k in b], where
        for key in [k for k in ("loss", "ce", "mtp", "kl", "aux", "grad_norm") if k in a]:
            assert abs(a[key] - b[key]) <= tol * abs(a[key]), f"{where}: step {s + 1} {key} {b[key]} vs {a[key]}"
        assert a["expert_load"] == b["expert_load"], where
    for n in ref["grads"]:
        assert ref["grads"][n].keys() == got["grads"][n].keys(), where
        for k, g in ref["grads"][n].items():
            assert _rel(g, got["grads"][n][k]) <= tol, f"{where}: step {n} gradient of {k}"
    assert ref["state"].keys() == got["state"].keys(), where
    for k, a in ref["state"].items():
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(a, got["state"][k]), f"{where}: {k}"
        else:
            assert _rel(a, got["state"][k]) <= tol, f"{where}: {k}"


def _runs(tmp_path, layouts, grads_at=(1, STEPS), overrides=None):
    files = [write_documents(tmp_path / "docs.jsonl")]
    return files, [{"files": files, "parallel": lay, "train": train, "out": str(tmp_path / f"run{i}"),
                    "grads_at": grads_at, "overrides": overrides or {}} for i, (lay, train) in enumerate(layouts)]


SIX = {"num_hidden_layers": 6, "index_topk_pattern": "FFSFSF"}  # guarded 4 stages: 0 | 1-2 | 3-4 | 5 + MTP


@pytest.mark.timeout(420)
def test_pp2_equals_one_process_carry_equals_guarded_recompute_exact(tmp_path):
    guarded = {"pp": 2, "pp_microbatches": 2}
    accum = {"accum_steps": 2, "aux_loss_coeff": 0.01}
    files, runs = _runs(tmp_path, [(guarded, {}), (dict(guarded, pp_split=[2], pp_carry_topk=True), {}),
                                   (guarded, {"recompute": True}), (guarded, accum)])
    runs += [dict(runs[0], family=f, out=str(tmp_path / f)) for f in ("deepseek-v3.2", "deepseek-v3")]
    runs += [dict(runs[3], parallel={"dp_shard": 2}, out=str(tmp_path / "dp"))]
    for run in runs[3], runs[6]:
        run["grads_at"] = (1,)
    ref = run_steps(recipe("glm-5.2", files), str(tmp_path / "one"), STEPS)
    assert "mtp" in ref["recs"][0] and "kl" in ref["recs"][0]
    got = run_ranks("pipeline", {"module": "test_pipeline", "runs": runs}, 2, str(tmp_path), timeout=400)["results"]
    plain, carry, recompute, accumulated, v32, v3, dp = got
    # two schedule runs per optimizer step (gradient accumulation) with the balance loss on both stages' routers:
    # losses and step-1 gradients equal one process accumulating the same batches; after 5 steps this recipe's
    # parameters drift 1.3e-5 from one process at dp_shard = 2 without a pipeline too (Adam and summation order), so
    # the parameters are held to the dp_shard = 2 run of the same batches, which sums the same pieces
    ref_accum = run_steps(recipe("glm-5.2", files, **accum), str(tmp_path / "one-accum"), STEPS, grads_at=(1,))
    assert "aux" in ref_accum["recs"][0]
    assert_same(ref_accum, {**accumulated, "state": ref_accum["state"]}, "pp=2, accum_steps=2, balance loss")
    assert_same(dp, accumulated, "pp=2 vs dp_shard=2, accum_steps=2, balance loss")
    for family, res in (("deepseek-v3.2", v32), ("deepseek-v3", v3)):  # the other families, one split each
        assert_same(run_steps(recipe(family, files), str(tmp_path / f"one-{family}"), STEPS), res, f"{family} pp=2")
    assert plain["split"] == (0, 3) and carry["split"] == (0, 2)  # the carried run cuts layer 2 from its source
    hidden = 2 * 32 * 64 * 4  # fp32 [b, S, D] per micro-batch; the top-k adds int32 [b, S, K]: carry_bytes' figure
    assert plain["sent"] == {0: {"hidden": hidden, "topk": 0}}
    assert carry["sent"] == {0: {"hidden": hidden, "topk": 2 * 32 * 8 * 4}}
    assert_same(ref, plain, "pp=2 (guarded split)")
    assert_same(ref, carry, "pp=2, carried top-k")
    for a, b in zip(plain["recs"], carry["recs"]):  # same losses as the guarded split's
        assert abs(a["loss"] - b["loss"]) <= TOL * abs(a["loss"])
    for n, gs in plain["grads"].items():  # recompute: bit-identical gradients and losses
        assert all(torch.equal(g, recompute["grads"][n][k]) for k, g in gs.items()), n
    assert [x["loss"] for x in plain["recs"]] == [x["loss"] for x in recompute["recs"]]


@pytest.mark.timeout(420)
def test_two_stages_per_rank_interleaved_and_looped_equal_one_stage_per_rank(tmp_path):
    """pp = 2 ranks × 2 stages each (stage s on rank s mod 2), a 6-layer GLM-5.2 whose only guarded 4-stage split is
    0 | 1-2 | 3-4 | 5 + MTP: interleaved 1F1B and looped BFS give bit for bit the gradients and parameters of 1F1B
    with one stage per rank (same micro-batches, same sums), and equal one process as 1F1B does: gradients at
    step 1, losses and final parameters within 1e-5. (This model's step-5 gradients differ from one process by up to
    2.0e-5 relative at pp = 2 and by 1.8e-5 at dp_shard = 2 without a pipeline: summation order, amplified by Adam.)"""
    lay = {"pp": 2, "pp_microbatches": 2}
    files, runs = _runs(tmp_path, [(lay, {}), (dict(lay, pp_schedule="interleaved-1f1b"), {}),
                                   (dict(lay, pp_schedule="looped-bfs"), {})], overrides=SIX)
    r = recipe("glm-5.2", files)
    r.model.overrides.update(SIX)
    ref = run_steps(r, str(tmp_path / "one"), STEPS, grads_at=(1,))
    got = run_ranks("pipeline", {"module": "test_pipeline", "runs": runs}, 2, str(tmp_path), timeout=400)["results"]
    one_per_rank = got[0]
    assert one_per_rank["split"] == (0, 5)  # head + MTP weigh about as much as 4 layers here
    assert_same(ref, {**one_per_rank, "grads": {1: one_per_rank["grads"][1]}}, "pp=2 (1F1B), 6 layers")
    for res, name in zip(got[1:], ("interleaved-1f1b", "looped-bfs")):
        assert res["split"] == (0, 1, 3, 5), name
        for a, b in zip(one_per_rank["recs"], res["recs"]):  # reported sums: 4 stages' shares instead of 2
            assert abs(a["loss"] - b["loss"]) <= 1e-12 * a["loss"], name
        for n, gs in one_per_rank["grads"].items():
            assert all(torch.equal(g, res["grads"][n][k]) for k, g in gs.items()), (name, n)
        assert all(torch.equal(a, res["state"][k]) for k, a in one_per_rank["state"].items()), name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pp2_with_dp_shard_ep_and_replicas_equals_one_process(tmp_path):
    """4 processes: pp = 2 × dp_shard = 2, the same with the experts split over ep = 2, and pp = 2 × dp_replicate = 2
    (HSDP replicas) under GPipe with one micro-batch. Gradients are compared at
    step 1 (same parameters); later steps through the losses, grad norms and final parameters. (Compared at step 5,
    the batch cut into 4 single-row pieces moves q_a_layernorm's gradient by 2.1e-5 relative — and dp_shard = 4
    without a pipeline moves it by the same 2.1e-5: Adam's sensitivity to summation order, see docs/parallel.md.)"""
    files, runs = _runs(tmp_path, [({"pp": 2, "dp_shard": 2, "pp_microbatches": 2}, {}),
                                   ({"pp": 2, "dp_shard": 2, "ep": 2, "pp_microbatches": 2}, {}),
                                   ({"pp": 2, "dp_replicate": 2, "dp_shard": 1, "pp_microbatches": 1,
                                     "pp_schedule": "gpipe"}, {})], grads_at=(1,))
    ref = run_steps(recipe("glm-5.2", files), str(tmp_path / "one"), STEPS, grads_at=(1,))
    got = run_ranks("pipeline", {"module": "test_pipeline", "runs": runs}, 4, str(tmp_path), timeout=580)["results"]
    assert_same(ref, got[0], "pp=2 × dp_shard=2")
    assert_same(ref, got[1], "pp=2 × dp_shard=2 × ep=2")
    assert_same(ref, got[2], "pp=2 × dp_replicate=2 (GPipe, 1 micro-batch)")


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_pp2_checkpoint_resumes_in_one_process_and_at_dp_shard_2_and_exports_the_same_files(tmp_path):
    corpus = write_documents(tmp_path / "docs.jsonl")
    plain = RECIPE.format(corpus=corpus)
    (tmp_path / "pp.toml").write_text(plain + "\n[parallel]\npp = 2\npp_microbatches = 2\n")
    (tmp_path / "one.toml").write_text(plain)
    pp, one = str(tmp_path / "pp"), str(tmp_path / "one")
    p, _ = dsalite(str(tmp_path / "pp.toml"), "--out", pp, "--nproc", "2", "--quiet", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pp=2" in p.stdout and "pipeline: 2 stages on 2 ranks (1f1b, 2 micro-batches), layers 0-2, 3 + MTP" \
        in p.stdout
    step4 = os.path.join(pp, "checkpoints", "step-00000004")
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(step4))
    # resume the step-2 checkpoint in one process: steps 3 and 4 continue the pipelined run
    shutil.copytree(pp, one, ignore=shutil.ignore_patterns("step-00000004", "hf"))
    assert main(["train", str(tmp_path / "one.toml"), "--out", one, "--resume", "--quiet"]) == 0
    A, B = losses(pp), losses(one)
    assert [x["step"] for x in B] == [1, 2, 3, 4]
    for a, b in zip(A[2:], B[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a["loss"], b["loss"])
    # and at dp_shard = 2 (no pipeline): each rank reads the parameters of both stages' shards
    dp = str(tmp_path / "dp")
    shutil.copytree(pp, dp, ignore=shutil.ignore_patterns("step-00000004", "hf"))
    p, _ = dsalite(str(tmp_path / "one.toml"), "--out", dp, "--resume", "--nproc", "2", "--quiet", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for a, b in zip(A[2:], losses(dp)[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a["loss"], b["loss"])
    # the export read back from the pipelined checkpoint = a one-process export of the same state
    ref = str(tmp_path / "ref")
    shutil.copytree(pp, ref, ignore=shutil.ignore_patterns("hf"))
    assert main(["train", str(tmp_path / "one.toml"), "--out", ref, "--resume", "--quiet"]) == 0
    names = sorted(os.listdir(os.path.join(ref, "hf")))
    assert sorted(os.listdir(os.path.join(pp, "hf"))) == names
    for n in names:
        a, b = os.path.join(ref, "hf", n), os.path.join(pp, "hf", n)
        if n.endswith(".safetensors"):
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), n
        elif n.endswith(".json") and "tokenizer" not in n:
            assert json.load(open(a)) == json.load(open(b)), n


def test_dry_run_plans_the_first_stage():
    """`--dry-run` with pp: rank 0's figures are the first stage's (its layers only, sharded over dp_shard), and the
    plan names the split, its balance and the activations the schedule keeps in flight."""
    from dsalite.model import Transformer
    from dsalite.parallel.pipeline_stage import cut
    from dsalite.parallel.plan import activation_bytes, plan

    r = recipe("glm-5.2", [], {"pp": 2, "dp_shard": 2, "pp_microbatches": 2})
    cfg = model_config(r)
    p = plan(r, 4)
    with torch.device("meta"):
        m = Transformer(cfg)
    cut(m, Split((0, 3), 4, 1), [0])
    assert p.params == sum(-(-q.shape[0] // 2) * (q.numel() // q.shape[0]) * 4 for q in m.parameters())
    assert any("pipeline: 2 stages on 2 ranks (1f1b, 2 micro-batches of 1 rows), layers 0-2, 3 + MTP" in n
               for n in p.notes)
    tokens = 2 * 32  # this rank's rows × seq_len
    assert p.comm["PP send/recv"] == 2 * tokens * cfg.hidden_size * 4
    # every unit gathered twice and reduce-scattered once per micro-batch, (F-1)/F of it, F = dp_shard = 2
    assert p.comm["FSDP"] == int(2 * 3 * sum(q.numel() for q in m.parameters()) * 4 / 2)
    assert p.in_flight == 2 and p.activations == 2 * activation_bytes(cfg, tokens // 2, 4, False, [0, 1, 2])


def test_cli_dry_run_with_pp(capsys):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "recipes")
    assert main(["train", f"{root}/glm5-744b.toml", "--dry-run", "--nproc", "256", "--pp", "4", "--pp-microbatches",
                 "4"]) == 0
    out = capsys.readouterr().out
    assert "256 processes: pp=4, dp_replicate=1, dp_shard=64, ep=8" in out
    assert "pipeline: 4 stages on 4 ranks (1f1b, 4 micro-batches of 1 rows)" in out and "PP send/recv" in out


def test_balanced_split_is_the_best_legal_split():
    """The dynamic programme against brute force on random schedules and costs: never a violation, and no legal split
    has a lighter most-loaded stage."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(40):
        L, pp = rng.randint(3, 9), rng.randint(2, 4)
        types = ["full"] + [rng.choice(["full", "shared"]) for _ in range(L)]  # trunk + one MTP layer
        costs, tail = [rng.uniform(1, 3) for _ in range(L)], rng.uniform(0, 4)
        allowed = [t == "full" for t in types[:L]]
        legal = [c for c in itertools.combinations(range(1, L), pp - 1) if all(allowed[b] for b in c)]
        if not legal:
            with pytest.raises(SplitError):
                balanced_split(costs, tail, pp, allowed, 1)
            continue
        got = balanced_split(costs, tail, pp, allowed, 1)
        assert violations(types, got) == []
        best = min(max(_stage_costs(costs, tail, (0,) + c, L)) for c in legal)
        assert max(_stage_costs(costs, tail, got.starts, L)) == pytest.approx(best)


def _stage_costs(costs, tail, starts, L):
    ends = list(starts[1:]) + [L]
    out = [sum(costs[a:b]) for a, b in zip(starts, ends)]
    out[-1] += tail
    return out


def test_dry_run_with_two_stages_per_rank():
    """Interleaved: rank 0 holds stages 0 and 2 (layer 0 with the embeddings, layers 3-4) of 0 | 1-2 | 3-4 | 5."""
    from dsalite.model import Transformer
    from dsalite.parallel.pipeline_stage import cut
    from dsalite.parallel.plan import plan

    r = recipe("glm-5.2", [], {"pp": 2, "dp_shard": 2, "pp_microbatches": 2, "pp_schedule": "interleaved-1f1b"})
    r.model.overrides.update(SIX)
    p = plan(r, 4)
    assert any("4 stages on 2 ranks (interleaved-1f1b" in n and "rank 0 holds stages 0, 2" in n for n in p.notes)
    with torch.device("meta"):
        m = Transformer(model_config(r))
    cut(m, Split((0, 1, 3, 5), 6, 1), [0, 2])
    assert sorted(m.model.layers) == ["0", "3", "4"] and not hasattr(m, "lm_head")
    assert p.params == sum(-(-q.shape[0] // 2) * (q.numel() // q.shape[0]) * 4 for q in m.parameters())
