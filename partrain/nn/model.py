"""The base every model is built on (the models themselves, by name, are in models.py)."""
from __future__ import annotations

import itertools

import numpy as np

from . import functional as F
from .layers import Affine, Conv, Layer, StepContext
from .params import ParamLayout, ParamSpec
from .workspace import Workspace, share_scratch

INFERENCE_CHUNK = 64  # images per forward pass in evaluation, for models without a chunk_size
_VERSIONS = itertools.count(1)  # StepContext.version: one per train_step or logits call


def params_version() -> int:
    """A new `StepContext.version`: a tag no earlier pass has used."""
    return next(_VERSIONS)


def layer_grads(layer: Layer) -> list[np.ndarray]:
    return list(getattr(layer, "g", {}).values())


class Model:
    """A stack of layers with one flat parameter vector, trained with softmax cross-entropy.

    See docs/INTERFACES.md for the contract the runners rely on.

    chunk_size: at most this many samples go through the layers at once (a whole number of
    batch-norm groups); a longer shard is done chunk after chunk, its gradients and statistics
    summed. The layers' buffers are then sized for a chunk, not for the shard, so a worker's
    memory no longer grows with its shard (airbench: 64 images, 10 MB of buffers per image); the
    result is the same up to float round-off, as BN statistics are per group anyway. None: the
    whole shard at once (the course model, whose affine weights would be re-read per chunk).
    Inference always goes in chunks (of chunk_size, else INFERENCE_CHUNK).
    """

    def __init__(self, name: str, layers: list[Layer], input_shape=(3, 32, 32), n_classes=10,
                 dtype=np.float32, group_size: int = 1, weight_decay: float = 0.0,
                 label_smoothing: float = 0.0, options: dict | None = None,
                 chunk_size: int | None = None):
        if chunk_size is not None and (chunk_size < 1 or chunk_size % group_size):
            raise ValueError(f"chunk_size {chunk_size} is not a positive multiple of the "
                             f"group size {group_size}")
        self.chunk_size = chunk_size
        self.scratch = share_scratch(l.ws for l in layers
                                     if isinstance(getattr(l, "ws", None), Workspace))
        self.name, self.layers, self.dtype = name, layers, np.dtype(dtype)
        self.input_shape, self.n_classes = tuple(input_shape), n_classes
        self.group_size, self.weight_decay = group_size, weight_decay
        self.label_smoothing = label_smoothing
        self.options = dict(options or {})
        self.layer_names: tuple[str, ...] = tuple(
            layer.name or f"{type(layer).__name__.lower()}{i}" for i, layer in enumerate(layers))
        named = list(zip(self.layer_names, layers))
        self.layout = ParamLayout([ParamSpec(f"{n}.{s.name}", s.shape, s.decay, s.lr_scale,
                                                    s.decay_scale)
                                   for n, l in named for s in l.params()])
        self.state_layout = ParamLayout([ParamSpec(f"{n}.{s.name}", s.shape)
                                         for n, l in named for s in l.state()])
        self.stats_layout = ParamLayout([ParamSpec(n, (l.stats_size(),))
                                         for n, l in named if l.stats_size()])
        self.stats_size = self.stats_layout.size
        self._frozen: set[str] = set()
        self._set_backward_from()
        shape = self.input_shape
        for layer_name, l in named:
            shape = l.output_shape(shape)
            if min(shape) < 1:  # e.g. 8 x 8 images through airbench's three pools
                raise ValueError(f"{'x'.join(map(str, self.input_shape[1:]))} images are too "
                                 f"small for {name}: its layer {layer_name} would output "
                                 f"{'x'.join(map(str, shape))}")
        if shape != (n_classes,):
            raise ValueError(f"model {name} ends in shape {shape}, expected ({n_classes},)")
        self.params = self.grads = self.state = None
        self._aside: dict[int, np.ndarray] = {}  # train_step's sums so far, when it chunks

    @property
    def frozen(self) -> frozenset[str]:
        """The names of the layers frozen with `set_frozen` (read-only)."""
        return frozenset(self._frozen)

    @property
    def backward_from(self) -> int:
        """Index of the first layer the backward pass runs: the first trainable, not frozen one."""
        return self._backward_from

    def _set_backward_from(self) -> None:
        # Layers before the first one with parameters need no backward pass at all, and that first
        # layer needs no input gradient (for the course model: skips a third of the conv work).
        with_params = [i for i, (n, l) in enumerate(zip(self.layer_names, self.layers))
                       if l.params() and n not in self._frozen]
        self._backward_from = with_params[0] if with_params else len(self.layers)
        for i, l in enumerate(self.layers):
            l.need_dx = i > self._backward_from

    def set_frozen(self, layer_name: str, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the parameters of one layer for the backward pass.

        Only frozen layers BEFORE the first trainable one save work: their backward pass and the
        first trainable layer's input gradient are skipped (airbench: freezing `whiten_bias` after
        its first epochs skips conv0a's input gradient and the whitening GELU's backward). Their
        gradient views are zeroed when frozen and stay zero while frozen; the optimizer still sees
        them (weight decay or momentum would still move them). A frozen layer after the first
        trainable one keeps computing its gradient, as its input gradient is needed anyway.
        """
        if layer_name not in self.layer_names:
            raise ValueError(f"model {self.name} has no layer {layer_name!r}")
        i = self.layer_names.index(layer_name)
        if frozen:
            self._frozen.add(layer_name)
            if self.grads is not None:
                for v in getattr(self.layers[i], "g", {}).values():
                    v[...] = 0
        else:
            self._frozen.discard(layer_name)
        self._set_backward_from()

    # ------------------------------------------------------------------ binding and init
    def bind(self, params: np.ndarray, grads: np.ndarray | None, state: np.ndarray | None) -> None:
        for arr, layout in ((params, self.layout), (grads, self.layout), (state, self.state_layout)):
            if arr is not None and arr.dtype != self.dtype:
                raise ValueError(f"flat vector dtype {arr.dtype} does not match model {self.dtype}")
        self.params, self.grads = params, grads
        self.state = state if state is not None else np.zeros(self.state_layout.size, self.dtype)
        pv = self._by_layer(self.layout.views(params))
        gv = self._by_layer(self.layout.views(grads) if grads is not None else {})
        sv = self._by_layer(self.state_layout.views(self.state))
        for n, layer in zip(self.layer_names, self.layers):
            layer.bind(pv[n], gv[n], sv[n])

    def _by_layer(self, views: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """{"layer.tensor": view} -> {layer: {tensor: view}} (every layer, maybe empty)."""
        out: dict[str, dict[str, np.ndarray]] = {n: {} for n in self.layer_names}
        for key, v in views.items():
            layer, tensor = key.split(".", 1)
            out[layer][tensor] = v
        return out

    def bind_grads(self, grads: np.ndarray) -> None:
        """Point the layers' gradient views at `grads` (same layout), keeping the other bindings,
        and zero the part no backward pass writes (the layers before `backward_from`), so the
        vector holds a whole gradient: how a micro-batch writes its own gradient row
        (`step.micro_gradients`)."""
        if grads.dtype != self.dtype or grads.shape != (self.layout.size,):
            raise ValueError(f"gradient vector {grads.dtype} {grads.shape} does not match model "
                             f"{self.dtype} ({self.layout.size},)")
        self.grads = grads
        gv = self._by_layer(self.layout.views(grads))
        for n, layer in zip(self.layer_names, self.layers):
            layer.g = gv[n]
        for i in range(min(self._backward_from, len(self.layers))):
            for v in layer_grads(self.layers[i]):
                v[...] = 0

    def init_params(self, rng: np.random.Generator) -> None:
        for layer in self.layers:
            layer.init(rng)

    def init_from_data(self, images: np.ndarray, idx, mean, std) -> bool:
        """Data-dependent initialisation after `init_params`, in the parent before any step, from
        the training images `images[idx]` (idx None: all). Returns whether it did anything; most
        models need none (airbench overrides it to compute its whitening filters)."""
        return False

    # ------------------------------------------------------------------------ compute
    def groups(self, n: int) -> list[tuple[int, int]]:
        g = self.group_size
        return [(lo, min(lo + g, n)) for lo in range(0, n, g)]

    def forward(self, x: np.ndarray, ctx: StepContext) -> np.ndarray:
        h = x
        for layer in self.layers:
            h = layer.forward(h, ctx)
        return h

    def train_step(self, x, y, loss_scale: float, stats_out: np.ndarray | None = None,
                   version: int | None = None):
        """Overwrite the bound grads with loss_scale·d(Σ losses)/dθ; return (loss_sum, n_correct).

        In chunks of `chunk_size` samples: the layers overwrite the grads (and BN its statistics)
        with each chunk's, so the sum so far is put aside and added back after every chunk (two
        passes over the parameters per chunk: 8 MB for airbench against ~0.5 s of compute).
        version: `StepContext.version` for every chunk (default: a new one); the same for
        several calls with unchanged parameters (a step's micro-batches) lets them share what
        is computed from the parameters alone."""
        if self.stats_size and stats_out is None:
            stats_out = np.zeros(self.stats_size, self.dtype)
        n = len(y)
        step = self.chunk_size if self.chunk_size and self.chunk_size < n else n
        loss_sum, correct = 0.0, 0
        summed = [v for v in (self.grads, stats_out) if v is not None]
        version = version if version is not None else params_version()
        for lo in range(0, n, step):
            so_far = [self._put_aside(i, v) for i, v in enumerate(summed)] if lo else []
            loss, right = self._train_chunk(x[lo:lo + step], y[lo:lo + step], loss_scale,
                                            stats_out, version)
            loss_sum, correct = loss_sum + loss, correct + right
            for v, saved in zip(summed, so_far):
                v += saved
        return loss_sum, correct

    def _put_aside(self, slot: int, vector: np.ndarray) -> np.ndarray:
        """A copy of `vector` in a buffer kept for the next steps (slot 0 grads, 1 stats)."""
        saved = self._aside.get(slot)
        if saved is None or saved.shape != vector.shape:
            saved = self._aside[slot] = np.empty_like(vector)
        np.copyto(saved, vector)
        return saved

    def _train_chunk(self, x, y, loss_scale, stats_out, version=None):
        stats_views = self.stats_layout.views(stats_out) if stats_out is not None else None
        ctx = StepContext(train=True, groups=self.groups(len(y)), stats_out=stats_views,
                          version=version)
        logits = self.forward(x, ctx)
        loss_sum, correct, d = F.softmax_cross_entropy(logits, y, loss_scale, self.label_smoothing)
        self.backward(d)
        return loss_sum, correct

    def backward(self, dlogits: np.ndarray) -> None:
        """Backward pass of the last training-mode `forward` from the gradient of the logits: writes
        the bound grads of every layer from `backward_from` on (earlier layers need none)."""
        d = dlogits
        for layer in reversed(self.layers[self._backward_from:]):
            d = layer.backward(d)

    def merge_stats(self, stats_sum: np.ndarray, n_groups: int) -> None:
        views = self.stats_layout.views(stats_sum)
        for n, layer in zip(self.layer_names, self.layers):
            if n in views:
                layer.merge_stats(views[n], n_groups)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Evaluation-mode logits (N, n_classes), chunk by chunk (see the class docstring)."""
        step = self.chunk_size or INFERENCE_CHUNK
        ctx = StepContext(train=False, version=params_version())
        if len(x) <= step:
            return self.forward(x, ctx)
        out = np.empty((len(x), self.n_classes), self.dtype)
        for lo in range(0, len(x), step):
            out[lo:lo + step] = self.forward(x[lo:lo + step], ctx)
        return out

    def loss_and_grad(self, x, y) -> tuple[float, np.ndarray]:
        """Mean loss plus regularisation, and its full gradient — for gradient checks."""
        loss_sum, _ = self.train_step(x, y, 1.0 / len(y))
        g = self.grads.copy()
        for lo, hi, scale in self.layout.decay_ranges():
            g[lo:hi] += self.weight_decay * scale * self.params[lo:hi]
        return loss_sum / len(y) + self.reg_loss(), g

    def reg_loss(self) -> float:
        if not self.weight_decay:
            return 0.0
        return 0.5 * self.weight_decay * sum(
            scale * float(np.dot(self.params[lo:hi].astype(np.float64), self.params[lo:hi]))
            for lo, hi, scale in self.layout.decay_ranges())

    def flops_per_image(self) -> dict[str, int]:
        """Multiply-add FLOPs (×2) of the forward pass per image, by layer kind."""
        total, shape = 0, self.input_shape
        for layer in self.layers:
            out = layer.output_shape(shape)
            if isinstance(layer, Conv):
                total += 2 * layer.c_in * layer.k * layer.k * out[0] * out[1] * out[2]
            elif isinstance(layer, Affine):
                total += 2 * layer.d_in * layer.d_out
            shape = out
        return {"forward": total, "train": 3 * total}
