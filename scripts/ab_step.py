"""A/B of one training step between an earlier commit and this checkout, in one process.

This VM's timings move by 20-50 % from minute to minute (other tenants share the memory and the
last-level cache), so two benchmark runs one after the other compare the minutes more than the
code. Here both versions live in one process, on one BLAS thread, and alternate step by step
(ABBA order), so a slow spell hits both alike: the ratio of the medians is what to quote.

The earlier commit's `partrain/` is unpacked by `git archive` into a temporary folder as the package
`partrain_base` (partrain's imports are relative, so it runs under that name).

    python scripts/ab_step.py --base HEAD~1 --batch-size 50 --steps 40
    python scripts/ab_step.py --base 1489d55 --model airbench --optimizer sgd --batch-size 64
"""
from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from partrain.bench_kernels import step_bench

ROOT = Path(__file__).resolve().parent.parent


def unpack(commit: str, into: Path) -> None:
    """`partrain/` of `commit` as `into`/partrain_base."""
    blob = subprocess.run(["git", "archive", commit, "partrain"], cwd=ROOT, check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.12, and 3.10.12 / 3.11.4 on
            tar.extractall(into, filter="data")
        else:  # our own git archive of our own tree
            tar.extractall(into)
    (into / "partrain").rename(into / "partrain_base")


def make_step(package: str, model_name: str, optimizer: str, batch: int):
    """(train step + optimizer step, train step alone) of `package`'s model and optimizer, set up
    by this checkout's `bench_kernels.step_bench` so that both versions get the same data."""
    models = importlib.import_module(package + ".nn.models")
    optim = importlib.import_module(package + ".optim")
    bench = step_bench(model_name, batch, optimizer, build=models.build_model,
                       make_opt=optim.make_optimizer)
    return bench.full_step, bench.forward_backward


def interleaved(a, b, steps: int, warmup: int = 3) -> tuple[float, float]:
    """Median ms of a and of b, timed alternately (ABBA) for `steps` rounds."""
    for f in (a, b):
        for _ in range(warmup):
            f()
    times = {id(a): [], id(b): []}
    for i in range(steps):
        for f in ((a, b) if i % 2 == 0 else (b, a)):
            t0 = time.perf_counter()
            f()
            times[id(f)].append(time.perf_counter() - t0)
    return float(np.median(times[id(a)]) * 1e3), float(np.median(times[id(b)]) * 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the earlier commit (A)")
    p.add_argument("--model", default="three-layer")
    p.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"))
    p.add_argument("--batch-size", type=int, nargs="+", default=[50, 256])
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        unpack(args.base, Path(d))
        sys.path.insert(0, d)
        with threadpool_limits(1):
            for batch in args.batch_size:
                base = make_step("partrain_base", args.model, args.optimizer, batch)
                new = make_step("partrain", args.model, args.optimizer, batch)
                for i, what in enumerate(("step", "forward+backward")):
                    ma, mb = interleaved(base[i], new[i], args.steps)
                    print(f"{args.model} batch {batch} {what}: {args.base} {ma:.1f} ms, "
                          f"this checkout {mb:.1f} ms, ratio {mb / ma:.3f}", flush=True)


if __name__ == "__main__":
    main()
