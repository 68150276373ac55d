"""Packed data: document boundaries, per-document positions, SFT masks, the token file, the tokenizer."""

import json

import numpy as np
import torch

from dsalite.config import ModelConfig
from dsalite.model import Transformer
from dsalite.training import data as D
from dsalite.training.losses import shifted_labels, token_losses
from train_fixtures import write_corpus


def test_packed_documents_equal_separate_runs():
    cfg = ModelConfig.tiny("glm_moe_dsa", index_topk=8, index_topk_pattern="FFSF")
    m = Transformer(cfg)
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (20, 28)]
    b = D.pack_documents(docs)
    S = b.tokens.shape[1]
    out = m(b.tokens, position_ids=b.positions, segment_ids=b.segments)
    assert (out.topk[0] >= 0).sum(-1).max() == 8 < 20, "the indexer selection must be sparse inside each document"
    packed = token_losses(out.logits, shifted_labels(b.tokens, b.segments, b.loss_mask, S, 1))[0]
    start = 0
    for d in docs:
        ids = torch.tensor([d])
        one = token_losses(m(ids).logits, shifted_labels(ids, torch.zeros_like(ids), torch.ones_like(ids), len(d), 1))
        torch.testing.assert_close(packed[start:start + len(d)], one[0], rtol=1e-5, atol=1e-5)
        start += len(d)
    assert packed[len(docs[0]) - 1] == 0  # the last token of a document predicts nothing across the boundary


def test_token_file_windows_and_sft_masks(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": f"question {i}?", "completion": f" answer {i}."}) for i in range(40)))
    docs = D.read_documents([str(sft)])
    tok = D.train_tokenizer(docs + D.read_documents([write_corpus(tmp_path / "c.txt")]), 300, str(tmp_path / "tok"))
    D.write_token_file(docs, tok, str(tmp_path / "data" / "sft"))
    pt = D.PackedTokens(str(tmp_path / "data" / "sft"), seq_len=16, n_mtp=1)
    starts = pt.starts
    assert pt.tokens[starts[1]] == tok.token_to_id("<|bos|>") and pt.tokens[starts[1] - 1] == tok.token_to_id("<|eos|>")
    n_prompt = 1 + len(tok.encode("question 0?").ids)
    assert not pt.mask[:n_prompt].any() and pt.mask[n_prompt:starts[1]].all()
    b = pt.batch([0, 3])
    assert b.tokens.shape == (2, 18)
    for row in range(2):
        seg, pos = b.segments[row].numpy(), b.positions[row].numpy()
        a = (0, 3)[row] * 16
        np.testing.assert_array_equal(pos, np.arange(a, a + 18) - starts[seg])
        assert (np.diff(seg) >= 0).all()
    order = D.BatchOrder(pt.n_windows, 2, seed=5)
    assert torch.equal(order.indices(7), D.BatchOrder(pt.n_windows, 2, seed=5).indices(7))


def test_tokenizer_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    docs = D.read_documents([write_corpus(tmp_path / "c.txt")])
    tok = D.train_tokenizer(docs, 300, str(tmp_path / "tok"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "what light through yonder window — 🌹"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text).ids
    assert hf.decode(tok.encode(text).ids) == text
    assert hf.bos_token_id == 0 and hf.eos_token_id == 1


def test_bad_inputs_name_the_problem(tmp_path):
    import pytest

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a \"text\" key"):
        D.read_documents([str(bad)])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        D.read_documents([str(tmp_path / "nope.txt")])
