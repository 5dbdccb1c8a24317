"""Channel blocks for the elementwise kernels (GELU, batch norm, the 2x2 max-pool).

Those kernels are chains of whole-array numpy passes; on a map of several MB every pass streams it
from memory again (airbench's first pooled map is 15 MB, beyond a core's L2 and most of its share
of L3). Run the same chain on a few channels at a time instead and the later passes find their
operands in cache. Channels are the maps' leading axis, so a block is one contiguous slice, and
each element still sees exactly the same operations: the results do not change by a bit (per-
channel reductions reduce the same rows). airbench at batch 64, one thread: the pools 12.0 ->
~8 ms forward + backward (BENCHMARKS.md).
"""
from __future__ import annotations

BLOCK_BYTES = 1 << 19  # ~ half a Zen 3 core's 512 KiB L2 per input block, with room for the rest


def channel_blocks(shape: tuple[int, ...], itemsize: int = 4) -> list[slice]:
    """Slices of the leading (channel) axis of a map of `shape`, each about BLOCK_BYTES."""
    per_channel = itemsize
    for n in shape[1:]:
        per_channel *= n
    c = shape[0]
    step = max(1, min(c, BLOCK_BYTES // max(per_channel, 1)))
    return [slice(lo, min(lo + step, c)) for lo in range(0, c, step)]
