"""LoRA adapters in PEFT's format, both ways, on GLM-5.2 (IndexShare schedule) and DeepSeek-V4.

dsalite → PEFT: a dsalite model with adapters on every group PEFT can target (attention, indexer, MLP / shared
experts; random non-zero B) saves them; `peft.PeftModel.from_pretrained(transformers_model, DIR)` must give dsalite's
logits. PEFT → dsalite: an adapter made with `peft.get_peft_model` on transformers' model (per-module rank and alpha
overrides, rsLoRA) loads into dsalite with the same logits. Ground truth is transformers + PEFT, fp32.
"""

import json

import pytest
import torch

from dsalite.checkpoint.pretrained import from_pretrained
from dsalite.training.lora import EXTRA_FILE, LoRALinear, apply_lora, load_adapters, save_adapters
from dsalite.verify import load_hf
from hf_fixtures import make_checkpoint
from v4_fixtures import make_v4_checkpoint

peft = pytest.importorskip("peft")

# indexer: CSA layers' compressor.indexer.q_b_proj / scorer.weights_proj on V4, full layers' wq_b / wk /
# weights_proj on GLM. mlp (shared experts, dense MLP) only on V4: see test_what_peft_cannot_hold_is_named.
TARGETS = {"glm52": ["attention", "indexer"], "v4": ["attention", "indexer", "mlp"]}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return {"glm52": make_checkpoint(root, "glm52_schedule"), "v4": make_v4_checkpoint(root, "v4_all_types")}


def ids_for(model, S=24):
    vocab = model.cfg.vocab_size if hasattr(model, "cfg") else model.config.vocab_size
    return torch.randint(0, vocab, (2, S), generator=torch.Generator().manual_seed(1))


def randomise_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("case", ["glm52", "v4"])
def test_dsalite_adapter_loads_in_peft(ckpts, case, tmp_path):
    model = from_pretrained(ckpts[case]).eval()
    done = apply_lora(model, 4, 8.0, TARGETS[case])
    assert any(".indexer." in n for n in done) and any("shared_experts" in n for n in done) == (case == "v4")
    randomise_b(model)
    ids = ids_for(model)
    with torch.no_grad():
        ours = model(ids).logits
        base = from_pretrained(ckpts[case])(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapters change the logits
    save_adapters(model, str(tmp_path / "a"), 4, 8.0, TARGETS[case])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    theirs_model = peft.PeftModel.from_pretrained(load_hf(ckpts[case]), str(tmp_path / "a")).eval()
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {n for n in done if not n.startswith("mtp.")}  # exactly the trunk's adapters
    with torch.no_grad():
        theirs = theirs_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # and back: dsalite reads its own files (all targets restored)
    fresh = from_pretrained(ckpts[case]).eval()
    assert sorted(load_adapters(fresh, str(tmp_path / "a"))) == sorted(done)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case,modules", [
    ("glm52", ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "wq_b", "wk", "weights_proj"]),
    ("v4", ["q_a_proj", "q_b_proj", "kv_proj", "o_b_proj", "weights_proj", "gate_proj", "down_proj"]),
])
def test_peft_adapter_loads_in_dsalite(ckpts, case, modules, tmp_path):
    hf = load_hf(ckpts[case])
    conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, rank_pattern={"q_b_proj": 2},
                           alpha_pattern={"o_b_proj" if case == "v4" else "o_proj": 3.0}, use_rslora=(case == "v4"),
                           init_lora_weights=False)  # random A and B: a non-trivial update
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, conf).eval()
    pm.save_pretrained(str(tmp_path / "p"))
    ids = ids_for(pm.base_model.model)
    with torch.no_grad():
        theirs = pm(ids).logits
        base = load_hf(ckpts[case])(ids).logits
    assert (theirs - base).abs().max() > 1e-2
    model = from_pretrained(ckpts[case]).eval()
    names = load_adapters(model, str(tmp_path / "p"))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert set(names) == wrapped and len(names) > 2 * model.cfg.num_hidden_layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case,targets,why", [
    ("v4", ["attention", "experts"], "fused experts have no PEFT equivalent"),
    ("glm52", ["mlp"], "PEFT turns gate_proj/up_proj/down_proj targets of a glm_moe_dsa model into fused-expert"),
])
def test_what_peft_cannot_hold_is_kept_beside(ckpts, case, targets, why, tmp_path):
    """Fused-expert adapters (every family) and GLM's dense-MLP / shared-expert adapters (PEFT would retarget them
    to the fused experts) go beside PEFT's files with a warning naming why; dsalite restores them all."""
    model = from_pretrained(ckpts[case]).eval()
    apply_lora(model, 2, 4.0, targets)
    randomise_b(model)
    with pytest.warns(UserWarning, match=why):
        save_adapters(model, str(tmp_path / "e"), 2, 4.0, targets)
    assert (tmp_path / "e" / EXTRA_FILE).exists()
    ids = ids_for(model, 12)
    fresh = from_pretrained(ckpts[case]).eval()
    load_adapters(fresh, str(tmp_path / "e"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_what_plain_lora_cannot_express_is_refused(ckpts, tmp_path):
    """PEFT variants plain LoRA cannot express, and adapters on modules this model lacks, are refused by name."""
    hf = load_hf(ckpts["v4"])
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_a_proj"], use_dora=True)).save_pretrained(
        str(tmp_path / "d"))
    with pytest.raises(ValueError, match="use_dora = True: DoRA is not supported"):
        load_adapters(from_pretrained(ckpts["v4"]), str(tmp_path / "d"))
    glm = load_hf(ckpts["glm52"])
    peft.get_peft_model(glm, peft.LoraConfig(r=2, target_modules=["kv_b_proj"])).save_pretrained(
        str(tmp_path / "g"))
    with pytest.raises(ValueError, match="kv_b_proj', which this deepseek_v4 model does not have"):
        load_adapters(from_pretrained(ckpts["v4"]), str(tmp_path / "g"))
