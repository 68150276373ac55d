"""`dsalite train RECIPE --nproc N`: N local workers started by torch.distributed's elastic launcher (the engine
behind torchrun), each running `python -m dsalite.cli train RECIPE ...` with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from a c10d rendezvous on a free local port, as `torchrun --standalone`).

The same worker command runs under a user's own `torchrun [--nnodes ...] -m dsalite.cli train RECIPE`: multi-node
launching is torchrun's job. The launcher checks the layout before it starts anything (a bad layout costs no
process), gives every worker one thread unless OMP_NUM_THREADS says otherwise, and restarts nothing: when a worker
fails, the agent stops the others (SIGTERM, then SIGKILL after `shutdown_timeout`) and the launcher exits non-zero
with the failing rank's error, which the worker records through torch.distributed.elastic's error file (`run_worker`).
"""

from __future__ import annotations

import os
import sys
import uuid


def launch(argv: list[str], nproc: int, shutdown_timeout: int = 10) -> int:
    """Run `dsalite.cli train *argv` on `nproc` local workers; 0 when all succeed, 1 (with the first failing rank's
    error on stderr) when one fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"dsalite-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          shutdown_timeout=shutdown_timeout)
    try:
        elastic_launch(config, sys.executable)("-m", "dsalite.cli", "train", *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        msg = failure.message  # the worker's recorded error: {"message": "Type: text", "extraInfo": {...}}
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        print(f"dsalite train: rank {rank} of {nproc} failed (exit code {failure.exitcode}): {msg}", file=sys.stderr)
        return 1
    return 0


def run_worker(fn, *args, **kwargs):
    """Call fn in a worker, recording any error in torch.distributed.elastic's error file for the launcher. Like
    elastic's `record`, but also for exceptions that are not `Exception`s (DCP's CheckpointException is a
    BaseException, which `record` lets through unrecorded)."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    handler = get_error_handler()
    handler.initialize()
    try:
        return fn(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        handler.record_exception(e)
        raise
