"""Optimizers and learning-rate schedules on slices of one flat parameter vector.

Parameters, gradients and optimizer state are each one flat array (see `nn.params`). A caller steps
the slice [lo, hi) it owns, so the parallel engine can shard the optimizer: worker w reduces slice w
of the gradient and updates slice w of the parameters and state (ZeRO stage 1 on one machine).

Two properties the engine relies on:
- Per-element arithmetic never depends on [lo, hi): the slice is cut at every weight-decay and
  learning-rate-scale boundary and each piece gets the same scalar operations, so stepping [0, k)
  then [k, n) equals stepping [0, n) bit for bit.
- Speed: the slice is processed in cache-sized chunks with two scratch buffers allocated once, using
  in-place ufuncs; there are no full-size temporaries (a naive numpy Adam makes ~10 of them).

The learning rate is an argument of every `step` (the schedule's value), never a setting of the
optimizer. Freezing (`make_optimizer`'s "freeze") is one optimizer per phase (`PhasedOptimizer`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, Sequence

import numpy as np

DEFAULT_CHUNK = 65536  # elements per pass: big enough to amortise per-call overhead, small enough
#                       to stay in cache (4 arrays + 2 scratch = 1.5 MB); see scripts/bench_optim.py


class Optimizer:
    """Shared machinery: range bookkeeping, slicing into segments and chunks, scratch buffers.

    decay_ranges: [(lo, hi)] or [(lo, hi, scale)] in flat coordinates where weight decay applies
    (weights, not biases), with strength scale·weight_decay (1 for a pair; airbench's BN biases,
    whose learning rate is 64x, get 1/64 so that their shrink per step is the weights').
    lr_scale_ranges: [(lo, hi, scale)] where the learning rate is multiplied by `scale`.
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, weight_decay: float, decoupled: bool,
                 decay_ranges: Sequence[tuple[int, int]] | None,
                 lr_scale_ranges: Sequence[tuple[int, int, float]] | None,
                 chunk: int):
        _check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
        _check(chunk >= 1, f"chunk must be >= 1, got {chunk}")
        self.weight_decay = float(weight_decay)
        self.decoupled = bool(decoupled)
        self.chunk = int(chunk)
        self.decay_ranges = _disjoint([(int(r[0]), int(r[1]), float(r[2]) if len(r) > 2 else 1.0)
                                       for r in (decay_ranges or [])], "decay_ranges")
        self.lr_scale_ranges = _disjoint(
            [(int(a), int(b), float(s)) for a, b, s in (lr_scale_ranges or [])], "lr_scale_ranges")
        self._scratch: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {}

    def step(self, params: np.ndarray, grads: np.ndarray, state: dict[str, np.ndarray], t: int,
             lr: float, lo: int = 0, hi: int | None = None) -> None:
        """Update params[lo:hi] and state[name][lo:hi] in place from grads[lo:hi] (read only).

        t is the 1-based step count; lr is this step's learning rate (the schedule's: it has no
        other source).
        """
        n = params.shape[0]
        hi = n if hi is None else hi
        _check(params.ndim == 1 and grads.shape == params.shape,
               f"params and grads must be flat vectors of one length, got {params.shape} and "
               f"{grads.shape}")
        _check(0 <= lo <= hi <= n, f"slice [{lo}, {hi}) is outside a vector of {n}")
        _check(t >= 1, f"step count t is 1-based, got {t}")
        for name in self.state_names:
            _check(name in state and state[name].shape == params.shape
                   and state[name].dtype == params.dtype,
                   f"optimizer state {name!r} must be a flat {params.dtype} vector of {n}")
        lr = float(lr)
        dtype = params.dtype
        a, b = self._buffers(dtype)
        st = [state[name] for name in self.state_names]
        self._begin(t, dtype)
        size = self.chunk
        for s, e, decay, scale in self._segments(lo, hi):
            k = self._scalars(lr * scale, decay, dtype)   # 0-d arrays: cheaper ufunc operands
            for cs in range(s, e, size):
                ce = min(cs + size, e)
                self._update(params[cs:ce], grads[cs:ce], [x[cs:ce] for x in st], k, decay,
                             a[:ce - cs], b[:ce - cs])

    # -- for subclasses -------------------------------------------------------------------------
    def _begin(self, t: int, dtype: np.dtype) -> None:
        """Precompute per-step scalars (bias corrections) once per call."""

    def _scalars(self, lr: float, decay: bool, dtype: np.dtype) -> dict[str, np.ndarray]:
        """Per-segment scalars as 0-d arrays of the parameter dtype."""
        raise NotImplementedError

    def _update(self, p, g, st, k, decay, a, b) -> None:
        """One chunk: p, g, st[i], a, b are equal-length slices; a and b are free scratch."""
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------------
    def _buffers(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        dtype = np.dtype(dtype)
        if dtype not in self._scratch:
            self._scratch[dtype] = (np.empty(self.chunk, dtype), np.empty(self.chunk, dtype))
        return self._scratch[dtype]

    def _segments(self, lo: int, hi: int) -> Iterator[tuple[int, int, float, float]]:
        """Pieces of [lo, hi) with constant (decay scale, lr scale), cut at every range boundary;
        decay scale 0: no decay."""
        cuts = {lo, hi}
        for r in self.decay_ranges:
            cuts.update(c for c in r[:2] if lo < c < hi)
        for r in self.lr_scale_ranges:
            cuts.update(c for c in r[:2] if lo < c < hi)
        points = sorted(cuts)
        for s, e in zip(points[:-1], points[1:]):
            decay = next((dc for a, b, dc in self.decay_ranges if a <= s < b), 0.0)
            decay = decay if self.weight_decay > 0 else 0.0
            scale = next((sc for a, b, sc in self.lr_scale_ranges if a <= s < b), 1.0)
            yield s, e, decay, scale

    def _decay_scalars(self, lr: float, dtype, scale: float) -> dict[str, np.ndarray]:
        """wd for coupled decay (added to the gradient), 1 - lr*wd for decoupled (shrinks p),
        with wd = scale·weight_decay."""
        wd = self.weight_decay * scale
        if self.decoupled:
            return {"shrink": np.array(1.0 - lr * wd, dtype)}
        return {"wd": np.array(wd, dtype)}

    def _decayed_grad(self, p, g, k, decay, a):
        """Coupled (L2) decay: g + wd*p, the gradient of g's loss + 0.5*wd*|w|^2, into scratch a."""
        if decay and not self.decoupled:
            np.multiply(p, k["wd"], a)
            np.add(a, g, a)
            return a
        return g


class Adam(Optimizer):
    """Adam (Kingma & Ba), bias corrected; decoupled=True gives AdamW (Loshchilov & Hutter).

    Textbook: g' = g + wd*p (coupled only); m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'^2;
    p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps).
    Computed as p -= step * m / (sqrt(v) + eps_t) with step = lr*sqrt(1-b2^t)/(1-b1^t) and
    eps_t = eps*sqrt(1-b2^t): algebraically identical (not the paper's eps-hat approximation), it
    only rounds differently, and saves two full passes. AdamW instead first does p *= 1 - lr*wd.
    """

    state_names = ("m", "v")

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False,
                 decay_ranges=None, lr_scale_ranges=None, chunk: int = DEFAULT_CHUNK):
        super().__init__(weight_decay, decoupled, decay_ranges, lr_scale_ranges, chunk)
        b1, b2 = (float(b) for b in betas)
        _check(0 <= b1 < 1 and 0 <= b2 < 1, f"betas must be in [0, 1), got {betas}")
        _check(eps > 0, f"eps must be positive, got {eps}")
        self.betas, self.eps = (b1, b2), float(eps)

    def _begin(self, t, dtype):
        b1, b2 = self.betas
        self._bc1, self._bc2 = 1.0 - b1 ** t, math.sqrt(1.0 - b2 ** t)

    def _scalars(self, lr, decay, dtype):
        b1, b2 = self.betas
        k = {"b1": b1, "b2": b2, "c1": 1 - b1, "c2": 1 - b2, "eps": self.eps * self._bc2,
             "step": lr * self._bc2 / self._bc1}
        k = {n: np.array(x, dtype) for n, x in k.items()}
        return k | self._decay_scalars(lr, dtype, decay) if decay else k

    def _update(self, p, g, st, k, decay, a, b):
        m, v = st
        g = self._decayed_grad(p, g, k, decay, a)  # may live in a, which is free again after v
        np.multiply(m, k["b1"], m)                 # m = b1*m + (1-b1)*g
        np.multiply(g, k["c1"], b)
        np.add(m, b, m)
        np.multiply(g, g, b)                       # v = b2*v + (1-b2)*g*g
        np.multiply(b, k["c2"], b)
        np.multiply(v, k["b2"], v)
        np.add(v, b, v)
        if decay and self.decoupled:
            np.multiply(p, k["shrink"], p)
        np.sqrt(v, a)                              # p -= step * m / (sqrt(v) + eps_t)
        np.add(a, k["eps"], a)
        np.divide(m, a, b)
        np.multiply(b, k["step"], b)
        np.subtract(p, b, p)


class SGD(Optimizer):
    """SGD with optional (Nesterov) momentum and weight decay, as torch.optim.SGD computes it.

    g' = g + wd*p (coupled only); u = momentum*u + g'; d = g' + momentum*u (Nesterov) or u;
    p -= lr*d. Decoupled decay (as in SGDW and airbench's lr-scaled decay) replaces the first line
    with p *= 1 - lr*wd before the update, so decay strength follows the schedule.
    With momentum 0 there is no state.
    """

    def __init__(self, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, decoupled: bool = False,
                 decay_ranges=None, lr_scale_ranges=None, chunk: int = DEFAULT_CHUNK):
        super().__init__(weight_decay, decoupled, decay_ranges, lr_scale_ranges, chunk)
        _check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
        _check(not nesterov or momentum > 0, "nesterov needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.state_names = ("velocity",) if momentum > 0 else ()

    def _scalars(self, lr, decay, dtype):
        k = {"mu": np.array(self.momentum, dtype), "lr": np.array(lr, dtype)}
        return k | self._decay_scalars(lr, dtype, decay) if decay else k

    def _update(self, p, g, st, k, decay, a, b):
        g = self._decayed_grad(p, g, k, decay, a)
        if decay and self.decoupled:
            np.multiply(p, k["shrink"], p)
        d = g
        if st:
            (u,) = st
            np.multiply(u, k["mu"], u)             # u = mu*u + g
            np.add(u, g, u)
            d = u
            if self.nesterov:                      # d = g + mu*u
                np.multiply(u, k["mu"], b)
                np.add(b, g, b)
                d = b
        np.multiply(d, k["lr"], b)
        np.subtract(p, b, p)


OPTIMIZERS = ("adam", "adamw", "sgd")


def build_optimizer(name: str, **hyper) -> Optimizer:
    """An optimizer by name: adam, adamw (= adam with decoupled decay) or sgd. It has no learning
    rate of its own: that comes with every step (the schedule's), by one road."""
    key = name.lower()
    if key == "adamw":
        hyper.setdefault("decoupled", True)
        cls = Adam
    elif key == "adam":
        cls = Adam
    elif key == "sgd":
        cls = SGD
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if "betas" not in hyper and ("beta1" in hyper or "beta2" in hyper):
        hyper["betas"] = (hyper.pop("beta1", 0.9), hyper.pop("beta2", 0.999))
    try:
        return cls(**hyper)
    except TypeError as e:
        raise ValueError(f"bad hyperparameters for {name}: {e}") from None


# -- freezing: one optimizer per phase -----------------------------------------------------------

def make_optimizer(model, optimizer_spec: tuple[str, dict]):
    """The optimizer of `optimizer_spec` = (name, hyper) over the model's flat vector: weight decay
    on the model's decay ranges, its per-parameter learning-rate scales.

    hyper may hold "freeze": {parameter name or layer prefix: step count s}: from step t = s + 1
    on, those parameters get a learning-rate scale of 0, i.e. stay exactly as they are (p - 0·d
    == p), as PyTorch's requires_grad = False leaves them. That is one optimizer per phase,
    chosen by t (`PhasedOptimizer`): no state, so a resumed run freezes at the same step.
    """
    name, hyper = optimizer_spec
    hyper = dict(hyper)
    freeze = {k: int(v) for k, v in (hyper.pop("freeze", None) or {}).items()}
    specs = model.layout.specs
    for key in freeze:
        if not any(_matches(s.name, key) for s in specs):
            raise ValueError(f"cannot freeze {key!r}: the model has no such parameter "
                             f"({', '.join(s.name for s in specs)})")

    def build(frozen: set[str]):
        scales = [(model.layout.offsets[s.name], model.layout.offsets[s.name] + s.size,
                   0.0 if any(_matches(s.name, k) for k in frozen) else s.lr_scale)
                  for s in specs if s.size]
        return build_optimizer(name, decay_ranges=model.layout.decay_ranges(),
                               lr_scale_ranges=[r for r in scales if r[2] != 1.0], **hyper)

    if not freeze:
        return build(set())
    starts = sorted({0} | {s + 1 for s in freeze.values()})
    frozen = {t0: {k for k, s in freeze.items() if s + 1 <= t0} for t0 in starts}
    return PhasedOptimizer([(t0, build(frozen[t0])) for t0 in starts], frozen)


def _matches(param: str, key: str) -> bool:
    return param == key or param.startswith(key + ".")


class PhasedOptimizer:
    """Optimizers with the same hyperparameters and state, each used from its first step t on.

    Only their learning-rate scales differ (parameters frozen from some step), so they share the
    flat state vectors; like every optimizer here, stepping a slice equals stepping the whole.
    """

    def __init__(self, phases: list[tuple[int, Optimizer]], frozen: dict[int, set] | None = None):
        self.phases = sorted(phases, key=lambda p: p[0])
        self.state_names = self.phases[0][1].state_names
        self.frozen = frozen or {}

    def frozen_at(self, t: int) -> set:
        """The names (parameters or layer prefixes) frozen at step t."""
        return next((self.frozen.get(t0, set()) for t0, _ in reversed(self.phases) if t >= t0),
                    set())

    def at(self, t: int) -> Optimizer:
        """The optimizer that step t (1-based) uses."""
        chosen = self.phases[0][1]
        for t0, opt in self.phases:
            if t >= t0:
                chosen = opt
        return chosen

    def step(self, params, grads, state, t, lr, lo=0, hi=None) -> None:
        self.at(t).step(params, grads, state, t, lr, lo, hi)


def sync_frozen(model, optimizer, t: int) -> None:
    """Tell the model which whole layers the optimizer has frozen by step t, so that it skips
    their backward work (airbench: conv0a's input gradient once the whitening bias is frozen).
    Their parameters stay as they are either way (learning-rate scale 0); this only saves time."""
    if isinstance(optimizer, PhasedOptimizer):
        for key in optimizer.frozen_at(t):
            if key in model.layer_names and key not in model.frozen:
                model.set_frozen(key)


# -- learning-rate schedules ---------------------------------------------------------------------

SCHEDULES = ("constant", "step", "cosine", "linear", "onecycle", "triangular")


def make_schedule(kind: str, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  **kw) -> Callable[[int], float]:
    """A function from the 0-based step number to the learning rate.

    constant; step (base*gamma^(step//step_size), gamma=0.1, step_size=ceil(total_steps/3): the
    classic two drops by 10x); cosine (to final_lr=0 at total_steps); linear (straight down to
    final_lr=0 at total_steps); onecycle / triangular (start_frac=0.2 -> 1 at peak_frac=0.23 of
    training -> end_frac=0.07 at total_steps: airbench94's triangle).
    warmup_steps multiplies any of them by min(1, (step+1)/warmup_steps), so step 0 already moves.
    Past total_steps every schedule holds its final value.
    """
    allowed = {"constant": (), "step": ("step_size", "gamma"), "cosine": ("final_lr",),
               "linear": ("final_lr",), "onecycle": ("start_frac", "peak_frac", "end_frac"),
               "triangular": ("start_frac", "peak_frac", "end_frac")}
    if kind not in allowed:
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    extra = set(kw) - set(allowed[kind])
    if extra:
        raise ValueError(f"schedule {kind!r} takes no {', '.join(sorted(extra))}")
    _check(base_lr > 0, f"base_lr must be positive, got {base_lr}")
    _check(total_steps >= 1, f"total_steps must be >= 1, got {total_steps}")
    _check(warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}")
    if kind == "step":
        kw.setdefault("step_size", -(-total_steps // 3))
        _check(kw["step_size"] >= 1, f"step_size must be >= 1, got {kw['step_size']}")
    if kind in ("onecycle", "triangular"):
        kind = "onecycle"
        _check(0 < kw.get("peak_frac", 0.23) < 1, "peak_frac must be in (0, 1)")
    fn = functools.partial(_SCHEDULE_FNS[kind], float(base_lr), int(total_steps), **kw)
    return functools.partial(_warmed, fn, int(warmup_steps))  # partials pickle; closures do not


def _warmed(fn, warmup_steps: int, step: int) -> float:
    lr = fn(step)
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def _constant(base, total, step):
    return base


def _step(base, total, step, step_size, gamma=0.1):
    return base * gamma ** (min(step, total) // step_size)


def _cosine(base, total, step, final_lr=0.0):
    frac = min(max(step, 0), total) / total
    return final_lr + (base - final_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _linear(base, total, step, final_lr=0.0):
    frac = min(max(step, 0), total) / total
    return base + (final_lr - base) * frac


def _onecycle(base, total, step, start_frac=0.2, peak_frac=0.23, end_frac=0.07):
    return base * float(np.interp(step, [0, peak_frac * total, total],
                                  [start_frac, 1.0, end_frac]))


_SCHEDULE_FNS = {"constant": _constant, "step": _step, "cosine": _cosine, "linear": _linear,
                 "onecycle": _onecycle}


# -- small helpers -------------------------------------------------------------------------------

def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _disjoint(ranges: list, what: str) -> list:
    """Sorted ranges; overlapping ones would make an element's treatment ambiguous."""
    ranges = sorted(ranges)
    for r in ranges:
        _check(0 <= r[0] <= r[1], f"{what}: bad range {r}")
    for r, s in zip(ranges[:-1], ranges[1:]):
        _check(r[1] <= s[0], f"{what}: ranges {r} and {s} overlap")
    return ranges
