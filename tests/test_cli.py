"""The `dsalite` command as a user runs it: a subprocess, its exit code and what it prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "dsalite")  # the installed console script
COMMAND = [_SCRIPT] if os.path.isfile(_SCRIPT) else [sys.executable, "-m", "dsalite.cli"]

OPTIONS = {
    "create": ["--preset", "--seed", "--init-std", "glm-5.2-tiny", "deepseek-v3.2-tiny", "deepseek-v3-tiny"],
    "verify": ["--seq-len", "--batch", "--seed", "--atol"],
    "convert": ["--dtype", "--max-shard-gb", "bf16", "fp32"],
}


def dsalite(*args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("DSALITE_TEST_THREADS", "2"))
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_top_level_help_lists_every_command():
    r = dsalite("--help")
    assert r.returncode == 0, r.stderr
    for cmd in OPTIONS:
        assert cmd in r.stdout
    r = dsalite()
    assert r.returncode != 0 and "COMMAND" in r.stderr  # a subcommand is required


@pytest.mark.parametrize("cmd", sorted(OPTIONS))
def test_subcommand_help_mentions_every_option(cmd):
    r = dsalite(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: dsalite {cmd}" in r.stdout
    for opt in OPTIONS[cmd]:
        assert opt in r.stdout, f"{cmd} --help does not mention {opt}"


@pytest.fixture(scope="module")
def created(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "v32-tiny"
    r = dsalite("create", out, "--preset", "deepseek-v3.2-tiny", "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert "deepseek-v3.2-tiny" in r.stdout and str(out) in r.stdout
    assert os.path.isfile(out / "config.json") and os.path.isfile(out / "model.safetensors")
    return out


def test_create_then_verify_passes(created):
    r = dsalite("verify", created, "--seq-len", 40, "--batch", 1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "FAIL" not in r.stdout
    assert "1 × 40 tokens" in r.stdout


def test_verify_outside_tolerance_exits_1(created):
    r = dsalite("verify", created, "--seq-len", 40, "--batch", 1, "--atol", "1e-12")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout and "PASS" not in r.stdout
    assert "tolerance 1e-12" in r.stdout


def test_verify_missing_path_is_a_clean_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    r = dsalite("verify", missing)
    assert r.returncode not in (0, 1)  # 1 means "compared and disagreed"; this never got that far
    assert str(missing) in r.stderr and "error" in r.stderr
    assert "Traceback" not in r.stderr


def test_verify_corrupt_config_is_a_clean_error(created, tmp_path):
    bad = tmp_path / "corrupt"
    bad.mkdir()
    shutil.copy(created / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text('{"model_type": "deepseek_v32", ')
    r = dsalite("verify", bad)
    assert r.returncode not in (0, 1)
    assert str(bad / "config.json") in r.stderr and "JSON" in r.stderr
    assert "Traceback" not in r.stderr


def test_convert_missing_source_is_a_clean_error(tmp_path):
    r = dsalite("convert", tmp_path / "absent", tmp_path / "out", "--dtype", "fp32")
    assert r.returncode not in (0, 1)
    assert str(tmp_path / "absent") in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "out")
