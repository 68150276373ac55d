"""CE gradients of dsalite equal transformers' autograd gradients (fp32) for every parameter HF trains."""

import pytest
import torch

from dsalite.checkpoint.pretrained import from_pretrained
from dsalite.training import losses
from dsalite.training.losses import IGNORE, head_lm_loss, lm_loss
from dsalite.verify import load_hf
from hf_fixtures import make_checkpoint


@pytest.mark.parametrize("fused", [False, True])
def test_ce_gradients_match_transformers(tmp_path, monkeypatch, fused):
    """fused: the trainer's path (head + cross-entropy in chunks, `head_lm_loss`), with small chunks."""
    path = make_checkpoint(tmp_path, "glm52_schedule")  # IndexShare schedule, index_topk 12
    hf = load_hf(path)
    ours = from_pretrained(path)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    hf.train()
    hf(input_ids=ids, labels=ids).loss.backward()
    out = ours(ids)
    assert all(t is None or t.shape[-1] < 40 for t in out.topk[:6])
    assert any((t >= 0).sum(-1).max() < 40 for t in out.topk[:6] if t is not None), "selection is not sparse"
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
    if fused:
        monkeypatch.setattr(losses, "CE_BUDGET", 256 * 7)  # 7 rows per chunk: 12 chunks, the last one short
        calls = []
        fused_apply = losses._LinearCrossEntropy.apply
        monkeypatch.setattr(losses._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or fused_apply(*a))
        head_lm_loss(ours, out.last_hidden, labels).backward()
        assert calls, "the fused path did not run"
    else:
        lm_loss(out.logits, labels).backward()

    theirs = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    mine = dict(ours.named_parameters())
    assert len(theirs) > 50
    for n, g in theirs.items():
        assert n in mine, f"HF parameter {n} has no dsalite counterpart"
        gm = mine[n].grad
        assert gm is not None, f"{n}: HF has a gradient, dsalite none"
        rel = (gm - g).abs().max() / g.abs().max().clamp(min=1e-12)
        assert rel <= 1e-5, f"{n}: relative gradient error {rel:.2e}"
    # the indexer learns only from its own loss: CE leaves it without gradient, as HF (no_grad indexer) does
    assert all(p.grad is None for n, p in ours.named_parameters() if ".indexer." in n)
