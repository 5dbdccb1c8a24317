"""Where a worker's memory goes: the bytes of every layer's workspace and of the model's shared
scratch pool after one training step on a shard of random images (one process, no workers).

    python scripts/workspace_memory.py --model airbench --shard 512

Prints one line per layer (its buffers by name), the totals and the process's peak RSS. The
figures of BENCHMARKS.md's issue-12 section come from it.
"""
from __future__ import annotations

import argparse
import resource

import numpy as np

from partrain.nn.models import build_model
from partrain.nn.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="airbench")
    ap.add_argument("--shard", type=int, default=512, help="images in the worker's shard")
    args = ap.parse_args()
    model = build_model(args.model)
    params = np.zeros(model.layout.size, model.dtype)
    model.bind(params, np.zeros_like(params), None)
    model.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.shard, *model.input_shape)).astype(model.dtype)
    y = rng.integers(0, model.n_classes, args.shard)
    model.train_step(x, y, 1.0 / args.shard)
    mib = lambda b: b / 2**20  # noqa: E731
    total = 0
    for name, layer in zip(model.layer_names, model.layers):
        ws = getattr(layer, "ws", None)
        if isinstance(ws, Workspace) and ws.nbytes:
            total += ws.nbytes
            parts = ", ".join(f"{k} {mib(v.nbytes):.1f}" for k, v in ws._bufs.items())
            print(f"{name:16s} {mib(ws.nbytes):7.1f} MiB  ({parts})")
    pool = ", ".join(f"{k.lstrip('~')} {mib(v.nbytes):.1f}" for k, v in model.scratch._bufs.items())
    print(f"layers {mib(total):.1f} MiB; shared scratch {mib(model.scratch.nbytes):.1f} MiB ({pool})")
    print(f"chunk_size {model.chunk_size}; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
