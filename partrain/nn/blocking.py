"""Channel blocks for the elementwise kernels (GELU, batch norm, the 2x2 max-pool).

Those kernels are chains of whole-array numpy passes; on a map of several MB every pass streams it
from memory again (airbench's first pooled map is 15 MB, beyond a core's L2 and most of its share
of L3). Run the same chain on a few channels at a time instead and the later passes find their
operands in cache. Channels are the maps' leading axis, so a block is one contiguous slice, and
each element still sees exactly the same operations: the results do not change by a bit (per-
channel reductions reduce the same rows). airbench at batch 64, one thread, its three pools
forward + backward: 28–33 -> 18–23 ms a step; its GELUs 20–25 -> 17–19 ms (BENCHMARKS.md).
"""
from __future__ import annotations

import math

BLOCK_BYTES = 1 << 19  # input per block: a Zen 3 core's L2; 512 KiB – 1 MiB did best in a sweep


def channel_blocks(shape: tuple[int, ...], itemsize: int = 4) -> list[slice]:
    """Slices of the leading (channel) axis of a map of `shape`, each about BLOCK_BYTES."""
    c, per_channel = shape[0], itemsize * math.prod(shape[1:])
    step = max(1, min(c, BLOCK_BYTES // max(per_channel, 1)))
    return [slice(lo, min(lo + step, c)) for lo in range(0, c, step)]
