"""`dsalite env` reports this machine as it is: the CPU and ISA flags /proc/cpuinfo shows, a kernel build this CPU
runs, the paths the library really chose (the same calls the layers make), and measured rates."""

import json
import os
import subprocess
import sys

import pytest

from dsalite import doctor, kernels
from dsalite.kernels import blas


def cpuinfo() -> dict:
    first = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            first.setdefault(k.strip(), v.strip())
    return first


@pytest.fixture(scope="module")
def reported():
    """`dsalite env --json` run as a user runs it, and its text form."""
    env = dict(os.environ, DSALITE_KERNELS="1")  # no calibration to wait for in a fresh cache
    out = subprocess.run([sys.executable, "-m", "dsalite.cli", "env", "--threads", "1", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    rep = json.loads(out)
    return rep, doctor.format_report(rep)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads /proc/cpuinfo")
def test_cpu_and_isa_are_the_machines(reported):
    rep, text = reported
    info = cpuinfo()
    flags = set((info.get("flags") or info.get("Features", "")).split())
    model = info.get("model name") or info.get("Model")
    if model:
        assert rep["cpu"]["model"] == model and model in text
    assert rep["cpu"]["cores"] == os.cpu_count()
    assert set(rep["cpu"]["simd"]) == {f for f in doctor.SIMD_FLAGS if f in flags}
    assert rep["cpu"]["flag_count"] == len(flags)
    for f in ("avx2", "avx512f", "asimd"):
        assert (f in flags) == (f in text.split("ISA", 1)[1].splitlines()[0].split())


def test_kernel_build_is_one_the_cpu_runs(reported):
    rep, text = reported
    k = rep["kernels"]
    assert k["cpu_runs"] == kernels.cpu_isas() and k["isa"] in k["cpu_runs"] and k["isa"] == k["requested"]
    assert k["build"].split()[0] == k["isa"] and k["build"] in text
    assert k["use"] is True and k["why"] == "DSALITE_KERNELS=1" and "C++ kernels -- DSALITE_KERNELS=1" in text


def test_blas_choice_and_rates_are_reported(reported, monkeypatch):
    rep, text = reported
    b = rep["blas"]
    # the choice a fresh process makes with the worker's environment (this process's own decision is made once and
    # earlier tests may have overridden it, so it is recomputed rather than read)
    if "DSALITE_BLAS" in rep["env"]:
        monkeypatch.setenv("DSALITE_BLAS", rep["env"]["DSALITE_BLAS"])
    else:
        monkeypatch.delenv("DSALITE_BLAS", raising=False)
    use, why = blas._choose()
    assert (b["blas"].lower(), b["why"]) == ("openblas" if use else "torch", why) and why in text
    assert b["gflops_one_thread"]["torch"] > 0 and b["gflops_one_thread"]["openblas"] > 0
    assert rep["torch"]["threads"] == 1 and rep["env"]["DSALITE_KERNELS"] == "1"


def test_calibration_timings_are_printed(monkeypatch):
    """With the default (calibrated) choice the report carries the measured cases, kernel against PyTorch."""
    cal = {"kernel_faster": True, "threads": 1, "kernels": {"select": {"speedup": 3.0}},
           "cases": {"select small 128 rows": {"kernel_ms": 1.0, "torch_ms": 3.0, "speedup": 3.0}}}
    monkeypatch.setattr(kernels, "decision", lambda: {"use": True, "why": "calibrated on this CPU: x", "isa": "avx2",
                                                      "build": "avx2 vw=8", "calibration": cal})
    text = doctor.format_report(doctor.report(measure_blas=False))
    assert "select small 128 rows" in text and "3.00x" in text and "calibrated on this CPU: x" in text
    assert doctor.summary_lines()[2].startswith("# kernels: C++ avx2 vw=8 -- calibrated")


FAULTS = """
import sys
import torch
from dsalite.kernels import memory
mode = memory.keep_freed_memory() if sys.argv[1] == "call" else memory.mode()

def minor_faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])

faults = []
for _ in range(24):  # 64 MiB, freed again
    before = minor_faults()
    torch.empty(1 << 24).fill_(1.0)
    faults.append(minor_faults() - before)
print(mode, max(faults[-8:]))  # kept: the heap settles after a few (2-8 here, with the heap's layout) and stays
"""


@pytest.mark.parametrize("how,env,kept", [("call", {}, True), ("call", {"DSALITE_MALLOC": "glibc"}, False),
                                          ("read", {"GLIBC_TUNABLES": "from memory.tunables()"}, True),
                                          ("read", {}, False)])
def test_freed_memory_is_kept_for_reuse(how, env, kept):
    """With freed memory kept (dsalite's commands call `keep_freed_memory`; benches start their processes with
    `memory.tunables()`) a 64 MiB buffer allocated again reuses its pages: next to no page faults, where glibc's
    default unmaps it and faults all 16384 pages in again. `dsalite env` reports which is in effect."""
    from dsalite.kernels import memory

    env = {k: memory.tunables() if v == "from memory.tunables()" else v for k, v in env.items()}
    base = {k: v for k, v in os.environ.items() if k not in ("DSALITE_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", FAULTS, how], env={**base, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == ("kept" if kept else "glibc")
    faults = int(out[1])
    assert faults < 1000 if kept else faults >= 16384, faults
    rep = subprocess.run([sys.executable, "-m", "dsalite.cli", "env", "--no-measure", "--json"],
                         env={**base, **env, "DSALITE_KERNELS": "0"}, capture_output=True, text=True, check=True)
    # the command itself keeps freed memory unless told not to
    assert json.loads(rep.stdout)["malloc"].startswith("glibc's default" if env.get("DSALITE_MALLOC") else "freed")
