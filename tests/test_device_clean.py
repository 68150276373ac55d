"""Device-clean code: every tensor the library creates follows the model's (or its inputs') device.

The trap: with torch's default device set to "meta", any allocation that forgets `device=` makes a meta tensor, and
the first time it meets a real CPU tensor torch raises ("Tensor on device meta is not on the expected device cpu").
So a CPU model that runs forward, chunked prefill + decode, speculative decoding and a training step under the trap
allocates nothing on the default device — what a GPU run needs, checked on CPU-only CI.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import dsalite
from dsalite.config import ModelConfig
from dsalite.model import Transformer
from dsalite.presets import PRESETS
from dsalite.training.trainer import Trainer
from train_fixtures import tiny_recipe, write_corpus


@contextlib.contextmanager
def default_device_trap():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_the_trap_catches_an_allocation_without_device():
    x = torch.ones(3, device="cpu")
    with default_device_trap(), pytest.raises(RuntimeError, match="meta"):
        x + torch.arange(3)


@pytest.mark.parametrize("preset", ["glm-5.2-tiny", "deepseek-v3-tiny", "deepseek-v4-tiny"])
def test_inference_allocates_on_the_model_device(preset):
    cfg = ModelConfig.from_hf(dict(PRESETS[preset]))
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the engine's padded batch path (V4 decodes such rows one by one)
    with torch.no_grad():
        ref = model(ids[:1])
        want = dsalite.generate(model, ids, max_new_tokens=6, attention_mask=mask, prefill_chunk=16)
        want_spec = dsalite.generate(model, ids[:1], max_new_tokens=6, speculative="mtp", prefill_chunk=16) \
            if cfg.model_type != "deepseek_v4" else None
        with default_device_trap():
            out = model(ids[:1])
            mtp = model.mtp_forward(out.mtp_input, ids[:1], topk=out.topk)
            got = dsalite.generate(model, ids, max_new_tokens=6, attention_mask=mask, prefill_chunk=16)
            if want_spec is not None:
                got_spec = dsalite.generate(model, ids[:1], max_new_tokens=6, speculative="mtp", prefill_chunk=16)
    assert out.logits.device.type == mtp[0].device.type == got.device.type == "cpu"
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    assert torch.equal(got, want)
    if want_spec is not None:
        assert torch.equal(got_spec, want_spec)


def test_training_step_allocates_on_the_model_device(tmp_path):
    r = tiny_recipe([write_corpus(tmp_path / "c.txt")], recompute=True)
    from dsalite.training import trainer as T

    tokens, _ = T.prepare_data(r, str(tmp_path / "run"), 1)
    tr = Trainer(r, str(tmp_path / "run"))
    tr.set_data(tokens)
    with default_device_trap():
        rec = tr.train_step()
    assert torch.isfinite(torch.tensor(rec["loss"])) and rec["kl"] > 0 and rec["mtp"] > 0
