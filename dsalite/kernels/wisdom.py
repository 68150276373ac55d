"""What dsalite keeps per machine: kernel builds and measurements per CPU model, the latter as FFTW keeps its wisdom:
measured once, cached on disk, read by every later process, so all processes of a run on one machine choose the same
paths (a resumed run rounds like the uninterrupted one) and none pays for the measurement again. This module only
stores and identifies (the CPU, the cache directories, atomic writes, the lock); `kernels` and `kernels.blas` measure.

A record lives in the kernel cache directory (`cache_dirs`) as wisdom-<what>-<hash of its key>.json, the
key naming everything the measurement depends on (CPU model and flags, kernel build, torch version). The first
process to need it measures under an exclusive file lock; processes started alongside it wait and read its record.
Deleting the files (`dsalite env --recalibrate`) measures again.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def cache_dirs() -> list[Path]:
    """$DSALITE_KERNEL_CACHE (default ~/.cache/dsalite/kernels), then a per-user temporary directory for when that
    one cannot be written."""
    return [Path(os.environ.get("DSALITE_KERNEL_CACHE", Path.home() / ".cache" / "dsalite" / "kernels")),
            Path(tempfile.gettempdir()) / f"dsalite-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"]


def write_atomic(name: str, write) -> Path:
    """write(tmp_path) into a temporary file of the first writable cache directory, renamed to `name` there."""
    dirs = cache_dirs()
    for i, cache in enumerate(dirs):
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=Path(name).suffix, dir=cache)
        except OSError:
            if i == len(dirs) - 1:
                raise
            continue
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, cache / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return cache / name
    raise OSError("no kernel cache directory")


def find_cached(name: str) -> Path | None:
    """The file `name` in the first cache directory that has it."""
    return next((c / name for c in cache_dirs() if (c / name).exists()), None)


def cpu_model() -> dict:
    """What identifies this CPU: model name, vendor, architecture, core count and feature flags."""
    first: dict[str, str] = {}  # the first processor's entries of /proc/cpuinfo
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                first.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    name = first.get("model name") or first.get("Model") or first.get("cpu model") or platform.processor()
    return {"model": name or platform.machine(), "vendor": first.get("vendor_id") or first.get("CPU implementer", ""),
            "family": first.get("cpu family", ""), "model_id": first.get("model", first.get("CPU part", "")),
            "stepping": first.get("stepping", first.get("CPU revision", "")), "arch": platform.machine(),
            "cores": os.cpu_count() or 1, "flags": sorted(cpu_flags())}


def cpu_key() -> str:
    """A short hash of `cpu_model()` without the core count (a VM of the same CPU with more cores is the same CPU)."""
    m = {k: v for k, v in cpu_model().items() if k != "cores"}
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]


def _name(what: str, key: dict) -> str:
    return f"wisdom-{what}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"


@contextlib.contextmanager
def _locked(name: str):
    """An exclusive lock on <cache>/<name>.lock for the block (no lock where fcntl or the directory is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    for cache in cache_dirs():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            f = open(cache / f"{name}.lock", "a")
        except OSError:
            continue
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    yield


def read(what: str, key: dict) -> dict | None:
    """The cached record for `key`, or None."""
    path = find_cached(_name(what, key))
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cached(what: str, key: dict, measure) -> dict:
    """The record of `what` for `key`: read from the cache, or measure() (a JSON-able dict) once under the lock,
    written atomically and returned."""
    rec = read(what, key)
    if rec is not None:
        return rec
    name = _name(what, key)
    with _locked(name):
        rec = read(what, key)  # measured by another process while this one waited
        if rec is None:
            rec = dict(measure(), key=key)
            write_atomic(name, lambda tmp: Path(tmp).write_text(json.dumps(rec, indent=1, sort_keys=True)))
    return rec


def forget() -> list[str]:
    """Delete every cached record (the next process measures again); returns the paths removed."""
    gone = []
    for cache in cache_dirs():
        for path in glob.glob(str(cache / "wisdom-*.json")):
            with contextlib.suppress(OSError):
                os.unlink(path)
                gone.append(path)
    return gone
