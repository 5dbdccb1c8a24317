"""`partrain` as one rank of an MPI job, with hooks for tests/test_mpi.py.

    python tests/mpi_fail_rank.py [--info DIR] [--info-at T] [--raise-at T] [--dump DIR] -- fit ...

- --info DIR: after step T (--info-at, default 2) this rank writes DIR/rank<r>.json: its pid, its
  workers' pids and its shared-memory tag, so a test can signal a rank or a worker mid-run;
- --raise-at T: this rank raises RuntimeError at the start of step T (the other ranks are then
  waiting in that step's all-reduce);
- --stop-in-validation: this rank SIGSTOPs itself when it validates at the end of epoch 1 (a
  machine lost while the others validate, and then wait in the next step);
- --dump DIR: a rank other than 0 writes nothing to the run folder (rundir.MutedRunDir); with this
  it writes what it would have saved, DIR/rank<r>-<which>.npz (+ .json, the metadata), so a test
  can compare its parameters with rank 0's checkpoint from the outside.

With mpiexec's MPMD form (`mpiexec -n 1 A : -n 1 B`) each rank gets its own hooks.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np


def _rank() -> int:
    return int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)  # the test never sees half a file


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("usage: mpi_fail_rank.py [hooks] -- fit ARGS")
    cut = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--info")
    p.add_argument("--info-at", type=int, default=2)
    p.add_argument("--raise-at", type=int)
    p.add_argument("--dump")
    p.add_argument("--stop-in-validation", action="store_true")
    hooks = p.parse_args(argv[:cut])

    from partrain import cli, rundir, session
    from partrain.parallel import engine

    step = engine.ParallelRunner.step

    def hooked_step(self, lo, hi, lr, t):
        if hooks.raise_at is not None and t == hooks.raise_at:
            raise RuntimeError(f"injected fault at step {t}")
        out = step(self, lo, hi, lr, t)
        if hooks.info and t == hooks.info_at:
            _write_json(os.path.join(hooks.info, f"rank{_rank()}.json"),
                        {"rank": _rank(), "pid": os.getpid(), "workers": self.worker_pids,
                         "tag": self.tag, "t": t})
        return out

    engine.ParallelRunner.step = hooked_step

    if hooks.stop_in_validation:
        validate = session.validate  # the epoch's validation pass (early_stop.validate)

        def stopping_validate(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGSTOP)
            return validate(*args, **kwargs)

        session.validate = stopping_validate

    if hooks.dump:
        def save(self, which, arrays, meta):
            base = os.path.join(hooks.dump, f"rank{_rank()}-{which}")
            np.savez(base + ".npz", **{k: np.asarray(v) for k, v in arrays.items()})
            _write_json(base + ".json", {k: meta[k] for k in ("epoch", "position", "t")})

        rundir.MutedRunDir.save = save

    sys.argv = ["partrain", *argv[cut + 1:]]
    cli.main()


if __name__ == "__main__":
    main()
