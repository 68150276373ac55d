"""`dsalite train --nproc 2` end to end: rank 0 alone writes metrics; Distributed Checkpoint files from every rank;
resume at the same layout is bit-identical, in one process it continues the uninterrupted run within 1e-5, and a
one-process state.pt resumes under the layout within 1e-5 too; the HF
export (streamed from the shards) equals a one-process export; a corrupt shard fails the launch with the rank's error;
a SIGKILL during a distributed save leaves the previous checkpoint resumable."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from dsalite.cli import main
from dsalite.parallel import checkpoint as pc
from workers import HERE, run_ranks, write_documents

RECIPE = """
[model]
preset = "glm-5.2-tiny"
init_std = 0.05
[model.overrides]
hidden_size = 64
num_hidden_layers = 4
index_topk = 8
moe_intermediate_size = 32
index_n_heads = 4
index_head_dim = 16
q_lora_rank = 32
kv_lora_rank = 32
index_topk_pattern = "FFSF"

[data]
files = ["{corpus}"]
vocab_size = 300
seq_len = 32
batch_size = 4

[train]
max_steps = 4
warmup_steps = 2
save_every = 2
keep_last = 3
threads = 1
"""


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def dsalite(*args, timeout=150):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), *sys.path]))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dsalite.cli", "train", *args], env=env, capture_output=True, text=True,
                       timeout=timeout, start_new_session=True)
    return p, time.monotonic() - t0


def _close(a, b, tol=1e-5):
    return abs(a - b) <= tol * abs(a)


@pytest.mark.timeout(400)
def test_nproc_2_train_resume_export(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text(RECIPE.format(corpus=write_documents(tmp_path / "docs.jsonl")))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(["train", str(r), "--out", one, "--quiet"]) == 0
    p, _ = dsalite(str(r), "--out", two, "--nproc", "2", "--ep", "2", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 processes: dp_replicate=1, dp_shard=2, ep=2" in p.stdout and p.stdout.count("trained pretrain") == 1
    A, B = losses(one), losses(two)
    assert [x["step"] for x in B] == [1, 2, 3, 4]  # rank 0 alone wrote, once per step
    assert all(_close(a["loss"], b["loss"]) for a, b in zip(A, B)), (A, B)
    step4 = os.path.join(two, "checkpoints", "step-00000004")
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.json"} <= set(os.listdir(step4))
    assert [s for s, _ in pc.list_dcp(two)] == [2, 4]

    # the export: same files and tensor names as one process (MTP included), values within 1e-5
    from safetensors.torch import load_file

    ea, eb = (load_file(os.path.join(d, "hf", "model.safetensors")) for d in (one, two))
    assert ea.keys() == eb.keys() and any(k.startswith("model.layers.4.") for k in ea)  # MTP = layer L
    for k, a in ea.items():
        assert float((a.double() - eb[k].double()).norm() / a.double().norm().clamp(min=1e-30)) <= 1e-5, k
    configs = [json.load(open(os.path.join(d, "hf", "config.json"))) for d in (one, two)]
    assert configs[0] == configs[1]
    assert os.path.isfile(os.path.join(two, "hf", "tokenizer.json"))

    # same layout: bit-identical continuation from step 2
    same = str(tmp_path / "same")
    shutil.copytree(two, same)
    shutil.rmtree(os.path.join(same, "checkpoints", "step-00000004"))
    p, _ = dsalite(str(r), "--out", same, "--nproc", "2", "--ep", "2", "--resume", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [x["loss"] for x in losses(same)] == [x["loss"] for x in B]

    # another layout: one process, no process group, continues the uninterrupted run
    solo = str(tmp_path / "solo")
    shutil.copytree(two, solo)
    shutil.rmtree(os.path.join(solo, "checkpoints", "step-00000004"))
    assert main(["train", str(r), "--out", solo, "--resume", "--quiet"]) == 0
    C = losses(solo)
    assert [x["step"] for x in C] == [1, 2, 3, 4]
    assert all(_close(a["loss"], c["loss"]) for a, c in zip(A, C)), (A, C)

    # the other way: the one-process run's state.pt resumes at dp_shard 2 + ep 2, each rank keeping its shards
    up = str(tmp_path / "up")
    shutil.copytree(one, up)
    shutil.rmtree(os.path.join(up, "checkpoints", "step-00000004"))
    p, _ = dsalite(str(r), "--out", up, "--nproc", "2", "--ep", "2", "--resume", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    U = losses(up)
    assert [x["step"] for x in U] == [1, 2, 3, 4] and U[:2] == A[:2]
    assert all(_close(a["loss"], u["loss"]) for a, u in zip(A, U)), (A, U)

    # a corrupt shard on one rank: the launch fails with that error, well within 60 s
    bad = str(tmp_path / "bad")
    shutil.copytree(two, bad)
    shard = os.path.join(bad, "checkpoints", "step-00000004", "__1_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(100)
    p, dt = dsalite(str(r), "--out", bad, "--nproc", "2", "--ep", "2", "--resume", "--max-steps", "6", "--quiet")
    assert p.returncode != 0 and dt < 60
    err = p.stderr[p.stderr.index("dsalite train: rank"):]
    assert "of 2 failed (exit code 1): CheckpointException" in err and "EOFError" in err, p.stderr[-3000:]


@pytest.mark.timeout(200)
def test_sigkill_during_distributed_save_keeps_the_previous_checkpoint(tmp_path):
    from dsalite.training.trainer import Trainer
    from workers import recipe

    files = [write_documents(tmp_path / "docs.jsonl")]
    out = str(tmp_path / "run")
    with pytest.raises(AssertionError, match="rank 1 exited with -9"):
        run_ranks("kill_during_save", {"family": "deepseek-v3", "files": files, "out": out}, 2, str(tmp_path),
                  timeout=150)
    left = os.listdir(os.path.join(out, "checkpoints"))
    # step 2 never became a checkpoint: rank 0 either removed the temporary folder itself (its collective failed
    # when the peer died) or was killed first and left `step-00000002.tmp-*`, which the next load removes
    assert "step-00000001" in left and "step-00000002" not in left, left
    assert pc.latest(out)[:1] == (1,) and pc.latest(out)[2] == "dcp"
    t = Trainer(recipe("deepseek-v3", files), out)  # resumes in one process
    assert pc.load_latest(out, t) and t.step == 1
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-00000001"]  # the half-written save is gone


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_across_layouts_4_ep2_then_2_then_1(tmp_path):
    """Steps 1-2 at dp_shard 4 + ep 2, steps 3-4 at dp_shard 2 (no ep), steps 5-6 in one process: the losses are
    the uninterrupted one-process run's within 1e-5."""
    r = tmp_path / "r.toml"
    text = RECIPE.format(corpus=write_documents(tmp_path / "docs.jsonl"))
    r.write_text(text.replace("max_steps = 4", "max_steps = 6"))
    one, run = str(tmp_path / "one"), str(tmp_path / "run")
    assert main(["train", str(r), "--out", one, "--quiet"]) == 0
    ckpts = os.path.join(run, "checkpoints")
    p, _ = dsalite(str(r), "--out", run, "--nproc", "4", "--ep", "2", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    for s in (4, 6):
        shutil.rmtree(os.path.join(ckpts, f"step-{s:08d}"))
    p, _ = dsalite(str(r), "--out", run, "--nproc", "2", "--resume", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.rmtree(os.path.join(ckpts, "step-00000006"))
    assert main(["train", str(r), "--out", run, "--resume", "--quiet"]) == 0
    A, C = losses(one), losses(run)
    assert [x["step"] for x in C] == [1, 2, 3, 4, 5, 6]
    assert all(_close(a["loss"], c["loss"]) for a, c in zip(A, C)), (A, C)
