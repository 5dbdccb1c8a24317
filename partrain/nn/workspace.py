"""Reusable buffers for the kernels.

Every kernel takes an optional `ws` (a `Workspace`) so that the training loop reuses its big buffers
from step to step instead of asking the allocator (and the kernel's page-zeroing) for tens of MB
every call.
"""
from __future__ import annotations

import numpy as np


class Workspace:
    """Named reusable buffers: `get(key, shape, dtype)` returns the same array while shape fits."""

    def __init__(self):
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        buf = self._bufs.get(key)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = np.empty(shape, dtype)
            self._bufs[key] = buf
        return buf


def buffer(ws: Workspace | None, key: str, shape, dtype) -> np.ndarray:
    """The workspace's buffer `key`, or a fresh uninitialised array without a workspace."""
    return np.empty(shape, dtype) if ws is None else ws.get(key, shape, dtype)
