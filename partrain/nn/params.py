"""One flat vector for all parameters, with named views.

Every parameter of a model lives in one contiguous array (and its gradient in a second array of the
same layout), so shared memory holds a handful of big arrays and the reduction and the optimizer are
plain vector operations on slices of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ParamSpec:
    """One named tensor inside the flat vector.

    decay: whether weight decay / L2 regularisation applies (weights yes, biases and BN no).
    lr_scale: per-parameter-group learning-rate multiplier.
    decay_scale: where decay applies, its strength relative to the model's weight decay
    (airbench's BN biases with decay: 1/lr_scale, so they shrink per step as the weights do).
    """

    name: str
    shape: tuple[int, ...]
    decay: bool = False
    lr_scale: float = 1.0
    decay_scale: float = 1.0

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class ParamLayout:
    """The order, shapes and offsets of the tensors in a flat vector."""

    specs: list[ParamSpec] = field(default_factory=list)

    def __post_init__(self):
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in {names}")
        self.offsets: dict[str, int] = {}
        off = 0
        for s in self.specs:
            self.offsets[s.name] = off
            off += s.size
        self.size = off

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views (no copies) into `flat`, which must have exactly `self.size` elements."""
        if flat.ndim != 1 or flat.size != self.size:
            raise ValueError(f"flat vector has {flat.size} elements, layout needs {self.size}")
        return {s.name: flat[self.offsets[s.name]:self.offsets[s.name] + s.size].reshape(s.shape)
                for s in self.specs}

    def ranges(self, predicate) -> list[tuple[int, int]]:
        """Merged [lo, hi) ranges of the tensors for which predicate(spec) is true."""
        out: list[tuple[int, int]] = []
        for s in self.specs:
            if not predicate(s) or s.size == 0:
                continue
            lo = self.offsets[s.name]
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], lo + s.size)
            else:
                out.append((lo, lo + s.size))
        return out

    def decay_ranges(self) -> list[tuple[int, int, float]]:
        """[(lo, hi, decay_scale)] of the decayed tensors, neighbours with one scale merged."""
        out: list[tuple[int, int, float]] = []
        for scale in sorted({s.decay_scale for s in self.specs if s.decay}):
            out += [(lo, hi, scale)
                    for lo, hi in self.ranges(lambda s: s.decay and s.decay_scale == scale)]
        return sorted(out)
