"""Training-state checkpoints: `DIR/checkpoints/step-NNNNNNNN/state.pt`, written with `checkpoint.io.atomic_dir`.

A directory named `step-N` exists only once complete (the rename is the commit), so a crash or SIGKILL mid-save leaves
at most a `step-N.tmp-*` directory beside the previous, loadable checkpoints; the next save or resume removes it.
The state holds everything a bit-identical continuation needs: weights and buffers (router biases), optimizer
and scheduler states, the step, and the RNG state.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

import torch

from dsalite.checkpoint.io import TEMP_MARK, atomic_dir

STATE = "state.pt"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step-{step:08d}")


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def remove_stale_temps(out: str) -> None:
    for d in glob.glob(os.path.join(out, "checkpoints", f"step-*{TEMP_MARK}*")):
        shutil.rmtree(d, ignore_errors=True)


def save_state(out: str, step: int, state: dict, keep_last: int) -> str:
    """Write `state` for `step` atomically, then delete all but the newest `keep_last` checkpoints."""
    path = checkpoint_dir(out, step)
    remove_stale_temps(out)
    with atomic_dir(path) as tmp:
        torch.save(state, os.path.join(tmp, STATE))
    for _, old in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_latest(out: str) -> dict | None:
    """The newest complete checkpoint's state, or None when there is none."""
    remove_stale_temps(out)
    ckpts = list_checkpoints(out)
    if not ckpts:
        return None
    step, path = ckpts[-1]
    state = torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=False)
    if state.get("step") != step:
        raise ValueError(f"{path}/{STATE} records step {state.get('step')}, expected {step}")
    return state
