"""The trainer end to end on a tiny model: resume is bit-identical, the warm-up stage touches only indexers,
a SIGKILL during a save leaves the previous checkpoint, the export loads in transformers, LoRA merges exactly."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dsalite.training import checkpointing
from dsalite.training.recipe import parse_recipe
from dsalite.training.trainer import Trainer, prepare_data, train
from train_fixtures import tiny_recipe, write_corpus


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln)["loss"] for ln in f]


def test_resume_is_bit_identical(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(tiny_recipe([corpus], accum_steps=2), a, progress=False, export=False)
    train(tiny_recipe([corpus], accum_steps=2), b, progress=False, export=False)
    assert [s for s, _ in checkpointing.list_checkpoints(b)] == [2, 4]
    shutil.rmtree(checkpointing.checkpoint_dir(b, 4))  # as if the run had died after step 2
    train(tiny_recipe([corpus], accum_steps=2), b, resume=True, progress=False, export=False)
    assert len(losses(a)) == 4 and losses(a) == losses(b)
    assert losses(a)[-1] < losses(a)[0]


def test_warmup_stage_trains_only_indexers(tmp_path):
    r = tiny_recipe([write_corpus(tmp_path / "c.txt")], stage="dsa_warmup", max_steps=2, lr=1e-2)
    t = Trainer(r, str(tmp_path / "o"))
    t.set_data(prepare_data(r, str(tmp_path / "o"), t.n_mtp)[0])
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    recs = [t.train_step() for _ in range(2)]
    assert all(rec["kl"] > 0 for rec in recs)
    changed = {k for k, v in t.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".indexer." in k for k in changed), sorted(changed)
    assert any(k.startswith("model.layers.0.self_attn.indexer") for k in changed)
    assert not any(k.startswith("model.layers.2.") for k in changed)  # shared layer: no indexer to train


def test_muon_and_balance_loss_step(tmp_path):
    r = tiny_recipe([write_corpus(tmp_path / "c.txt")], optimizer="muon", aux_loss_coeff=1e-3, max_steps=2)
    t = Trainer(r, str(tmp_path / "o"))
    t.set_data(prepare_data(r, str(tmp_path / "o"), t.n_mtp)[0])
    bias = t.model.model.layers["1"].mlp.gate.e_score_correction_bias.clone()
    rec = t.train_step()
    assert len(t.optimizers) == 2 and rec["aux"] > 0 and torch.isfinite(torch.tensor(rec["loss"]))
    assert not torch.equal(bias, t.model.model.layers["1"].mlp.gate.e_score_correction_bias)
    assert rec["expert_load_max_over_mean"] >= 1.0


_KILL = """
import os, signal, sys, torch
from dsalite.training import checkpointing
out = sys.argv[1]
checkpointing.save_state(out, 1, {"step": 1, "w": torch.ones(3)}, keep_last=2)
real = torch.save
def dying_save(obj, f):
    with open(f, "wb") as fh:
        fh.write(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
checkpointing.save_state(out, 2, {"step": 2, "w": torch.zeros(3)}, keep_last=2)
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", _KILL, str(tmp_path)], env=env, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()
    assert any(".tmp-" in n for n in os.listdir(tmp_path / "checkpoints"))
    s = checkpointing.load_latest(str(tmp_path))
    assert s["step"] == 1 and torch.equal(s["w"], torch.ones(3))
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "checkpoints"))


def test_export_loads_in_transformers_with_mtp(tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from dsalite.checkpoint.pretrained import from_pretrained
    from dsalite.verify import load_hf

    out = str(tmp_path / "o")
    train(tiny_recipe([write_corpus(tmp_path / "c.txt")], max_steps=2), out, progress=False)
    path = os.path.join(out, "hf")
    assert os.path.isfile(os.path.join(out, "loss.png")) and os.path.isdir(os.path.join(out, "tensorboard"))
    keys = set()
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as st:
                keys |= set(st.keys())
    assert any(k.startswith("model.layers.4.eh_proj") for k in keys), "MTP layer missing from the export"
    ids = torch.tensor([AutoTokenizer.from_pretrained(path).encode("the king speaks to the queen of night")])
    with torch.no_grad():
        theirs = load_hf(path)(ids).logits
        ours = from_pretrained(path)(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_lora_merge_equals_unmerged_and_adapters_round_trip(tmp_path):
    from dsalite.training.lora import LoRALinear, load_adapters, merge_lora, save_adapters

    r = tiny_recipe([write_corpus(tmp_path / "c.txt")], stage="lora", max_steps=1)
    t = Trainer(r, str(tmp_path / "o"))
    m = t.model
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(n.startswith("model.layers.2.self_attn.indexer") for n in trainable)
    assert any(".experts.parametrizations.gate_up_proj" in n for n in trainable)
    assert isinstance(m.model.layers["0"].self_attn.indexer.wk, LoRALinear)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapters(m, str(tmp_path / "lora"), 4, 8.0, r.lora.targets)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = m(ids).logits
        merged = merge_lora(m)(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not any("lora_" in k for k in m.state_dict())
    fresh = Trainer(tiny_recipe([write_corpus(tmp_path / "c.txt")]), str(tmp_path / "p")).model
    load_adapters(fresh, str(tmp_path / "lora"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_recipe_errors_name_the_key():
    with pytest.raises(ValueError, match=r"train\.lrr is unknown"):
        parse_recipe({"train": {"lrr": 1.0}})
    with pytest.raises(ValueError, match=r"train\.max_steps must be int"):
        parse_recipe({"train": {"max_steps": "ten"}})
    with pytest.raises(ValueError, match=r"train\.stage='warm' is unknown"):
        parse_recipe({"train": {"stage": "warm"}})


def test_bf16_autocast_with_recompute_trains(tmp_path):
    r = tiny_recipe([write_corpus(tmp_path / "c.txt")], bf16=True, recompute=True, max_steps=3, lr=1e-2)
    t = Trainer(r, str(tmp_path / "o"))
    t.set_data(prepare_data(r, str(tmp_path / "o"), t.n_mtp)[0])
    recs = [t.train_step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor([x["loss"], x["kl"], x["grad_norm"]])).all() for x in recs)
    assert recs[-1]["ce"] < recs[0]["ce"]


def test_two_stage_dsa_recipe_chain(tmp_path):
    """Warm-up export → sparse stage from it (its tokenizer too): everything trains, KL on the selection only."""
    corpus = write_corpus(tmp_path / "c.txt")
    warm = str(tmp_path / "warm")
    train(tiny_recipe([corpus], stage="dsa_warmup", max_steps=2), warm, progress=False)
    r = tiny_recipe([corpus], stage="dsa_sparse", max_steps=1)
    r.model.init_from = r.data.tokenizer = os.path.join(warm, "hf")
    t = Trainer(r, str(tmp_path / "sparse"))
    t.set_data(prepare_data(r, str(tmp_path / "sparse"), t.n_mtp)[0])
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    rec = t.train_step()
    assert rec["kl"] > 0
    changed = {k for k, v in t.model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".indexer." in k for k in changed) and any("experts" in k for k in changed)
    assert "model.embed_tokens.weight" in changed
