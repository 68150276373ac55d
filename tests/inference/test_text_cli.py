"""`dsalite generate` end to end: tokenizer.json, chat template, stop strings, batches from a file, closing line."""

import json
import subprocess
import sys

import pytest

from dsalite.cli import main as cli_main
from dsalite.inference.text import TextModel, cut_at_stop, read_prompts

TEXT = ["to be or not to be that is the question", "whether tis nobler in the mind to suffer",
        "the slings and arrows of outrageous fortune", "or to take arms against a sea of troubles"] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("gen") / "m"
    assert cli_main(["create", str(out), "--preset", "deepseek-v3-tiny"]) == 0
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}"}))
    return str(out)


def test_chat_template_and_eos_from_the_checkpoint(ckpt):
    tm = TextModel.load(ckpt)
    assert tm.render("hi", chat=True) == "<s>[user] hi\n[assistant] "
    assert tm.render("hi", chat=False) == "hi"
    assert 1 in tm.eos_ids and tm.tokenizer.token_to_id("</s>") in tm.eos_ids
    assert tm.decode(tm.encode("to be or not")) == "to be or not"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dsalite.cli", "generate", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_streams_text_and_reports_speed(ckpt):
    r = run_cli(ckpt, "--prompt", "to be or not", "--max-new-tokens", "6", "--eos-id", "9999", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stderr and "tok/s" in r.stderr and "B/token" in r.stderr
    # greedy and unseeded sampling agree on what greedy means: the same text twice
    r2 = run_cli(ckpt, "--prompt", "to be or not", "--max-new-tokens", "6", "--eos-id", "9999", "--no-stream")
    assert r2.stdout.strip() == r.stdout.strip()


def test_stop_string_cuts_the_output(ckpt):
    base = run_cli(ckpt, "--prompt", "the", "--max-new-tokens", "12", "--eos-id", "9999", "--no-stream", "--no-chat")
    text = base.stdout.rstrip("\n")
    assert len(text) > 3
    stop = text[2:4]
    cut = run_cli(ckpt, "--prompt", "the", "--max-new-tokens", "12", "--eos-id", "9999", "--no-stream", "--no-chat",
                  "--stop", stop)
    assert cut.stdout.rstrip("\n") == text[: text.index(stop)]


def test_batch_from_prompts_file(ckpt, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "to be"}) + "\n" + json.dumps({"prompt": "whether tis nobler in"}) + "\n")
    r = run_cli(ckpt, "--prompts-file", str(f), "--max-new-tokens", "5", "--eos-id", "9999")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("[0] ") and lines[1].startswith("[1] ")
    alone = run_cli(ckpt, "--prompt", "whether tis nobler in", "--max-new-tokens", "5", "--eos-id", "9999",
                    "--no-stream")
    assert lines[1][4:] == alone.stdout.rstrip("\n")


def test_helpers_and_errors(tmp_path, ckpt):
    assert cut_at_stop("abc<end>def", ["<end>", "d"]) == ("abc", True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_prompts(str(bad))
    r = run_cli(str(tmp_path), "--prompt", "x")
    assert r.returncode != 0 and "config.json" in r.stderr and "Traceback" not in r.stderr
