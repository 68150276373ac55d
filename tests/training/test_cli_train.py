"""`dsalite train`: a TOML recipe end to end through the command line, and its errors."""

import json

from dsalite.cli import build_parser, main
from train_fixtures import write_corpus

RECIPE = """
[model]
preset = "glm-5.2-tiny"
overrides = {{ hidden_size = 64, num_hidden_layers = 4, index_topk = 8, moe_intermediate_size = 32 }}

[data]
files = ["{corpus}"]
vocab_size = 300
seq_len = 32
batch_size = 2

[train]
stage = "pretrain"
max_steps = 50
warmup_steps = 1
threads = 1
"""


def test_train_command_writes_metrics_plot_and_hf(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(corpus=write_corpus(tmp_path / "c.txt")))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out), "--max-steps", "2", "--quiet"]) == 0
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all("loss" in r for r in recs)
    assert (out / "loss.png").stat().st_size > 1000 and (out / "hf" / "config.json").is_file()
    assert str(out / "hf") in capsys.readouterr().out


def test_train_command_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstage = 'dense'\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "train.stage='dense' is unknown" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for opt in ("--out", "--max-steps", "--resume", "--init-from", "--quiet"):
        assert opt in help_text

