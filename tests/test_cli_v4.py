"""`dsalite create --preset deepseek-v4-tiny` then `dsalite verify` as a user runs them, and `--help` naming V4."""

from test_cli import dsalite


def test_v4_create_then_verify_passes(tmp_path):
    out = tmp_path / "v4"
    r = dsalite("create", out, "--preset", "deepseek-v4-tiny")
    assert r.returncode == 0, r.stderr
    assert "deepseek_v4" in r.stdout and "1 MTP" in r.stdout
    r = dsalite("verify", out, "--batch", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and " csa " in r.stdout and " hca " in r.stdout


def test_help_names_the_v4_preset_and_layout():
    assert "deepseek-v4-tiny" in dsalite("create", "--help").stdout
    assert "FP4" in dsalite("convert", "--help").stdout
