"""Reusable buffers for the kernels.

Every kernel takes an optional `ws` (a `Workspace`) so that the training loop reuses its big buffers
from step to step instead of asking the allocator (and the kernel's page-zeroing) for tens of MB
every call. Two kinds of buffer:
- `get` (through `buffer`): a layer's own, alive between calls — its forward cache, its output
  (the next layer's input), its input gradient;
- `temp` (through `scratch`): alive only inside one kernel call (Winograd's transformed tiles,
  im2col's padded input, the input gradient's columns). A model points the workspaces of all its
  layers at one shared scratch pool (`share_scratch`), so the model holds one copy of the
  largest of these, not one per layer: for airbench that was a third of a worker's memory.
A buffer is a view of a flat store that only grows, so a smaller batch (the last chunk of a pass,
an evaluation batch) reuses the store instead of replacing it.
"""
from __future__ import annotations

import math

import numpy as np


class Workspace:
    """Named reusable buffers: `get(key, shape, dtype)` returns the same memory while it fits."""

    def __init__(self, scratch: "Workspace | None" = None):
        self._bufs: dict[str, np.ndarray] = {}
        self.scratch = scratch  # the pool `temp` draws from; None: this workspace itself
        # What a kept buffer was computed from, for one reused while that is unchanged
        # (Winograd's transformed filters within a step); dropped when its store is replaced.
        self.tags: dict[str, object] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = math.prod(shape)
        store = self._bufs.get(key)
        if store is None or store.dtype != dtype or store.size < n:
            self._bufs.pop(key, None)  # freed before its replacement is allocated
            self.tags.pop(key, None)
            store = np.empty(n, dtype)
            self._bufs[key] = store
        return store[:n].reshape(shape)

    def temp(self, role: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A buffer for use inside one kernel call only, from the shared scratch pool: the next
        kernel that asks for the same `role` gets the same memory."""
        return (self.scratch if self.scratch is not None else self).get("~" + role, shape, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by this workspace's own buffers (not the shared pool's)."""
        return sum(b.nbytes for b in self._bufs.values())


def buffer(ws: Workspace | None, key: str, shape, dtype) -> np.ndarray:
    """The workspace's buffer `key`, or a fresh uninitialised array without a workspace."""
    return np.empty(shape, dtype) if ws is None else ws.get(key, shape, dtype)


def scratch(ws: Workspace | None, role: str, shape, dtype) -> np.ndarray:
    """A buffer alive only during the calling kernel (`Workspace.temp`), or a fresh array."""
    return np.empty(shape, dtype) if ws is None else ws.temp(role, shape, dtype)


def share_scratch(workspaces) -> Workspace:
    """Point every workspace at one new scratch pool (a model does this for its layers)."""
    pool = Workspace()
    for ws in workspaces:
        ws.scratch = pool
    return pool
