"""The data-parallel engine: N worker processes over shared memory, behind the runner interface.

`ParallelRunner` offers exactly what `runner.LocalRunner` offers (docs/INTERFACES.md): `params`,
`state`, `opt_state`, `model`, `set_order`, `step(lo, hi, lr, t)`, `close()`, context manager.

Before the workers start, the parent initialises the parameters exactly as LocalRunner does
(`init_params(seed)`, then `runner.init_from_data` on the training indices), so the workers only
ever read them from shared memory.

One step, as the parent sees it:
  1. send every worker b"S"(lo, hi, lr, t, epoch): worker w computes the gradient of the summed
     loss of its shard `order[split_shards(lo, hi, N)[w]]` (augmented as (seed, epoch, sample
     index) decide, if an AugmentSpec was given), divided by the global batch size, into its own
     gradient buffer (and its batch-norm statistics into its row of `stats`);
  2. wait for all N; sum the losses (w = 0..N-1) and the batch-norm statistics, and merge those
     into the running statistics here, once;
  3. reduce: `sharded` sends b"R" and worker w sums slice w of the N buffers and steps the
     optimizer on it; `parent` does the whole sum and step itself (see `reduce`).
Shared memory holds everything else; a pipe carries a few bytes per message.

Failure: every wait polls the pipes with a short timeout and checks that the workers are alive, so
a dead worker (EOF or exit status) or a failing one (b"E" message; traceback in its log file) ends
the step within POLL_S with a PartrainError naming it. `close()` then stops the others, unlinks all
shared memory and leaves no worker behind; it runs on every exit path (also a context manager, and
from the signal handlers). Ctrl-C: the first asks to stop at the next step boundary (`step` closes
the runner and raises `Interrupted`; `params` etc. stay readable as private copies); a second kills
the workers, unlinks the shared memory and raises KeyboardInterrupt at once. Workers ignore SIGINT.

Workers start with `forkserver` (a clean, single-threaded server forks each worker with numpy and
partrain already imported: no fork-after-threads hazard, no re-import per worker).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from ..batches import normaliser
from ..errors import PartrainError
from ..nn.models import build_model
from ..runner import init_from_data, make_optimizer, n_groups
from . import worker as W
from .reduce import get_reduction, reduce_and_step
from .shm import SharedArrays

POLL_S = 0.1        # how often a waiting parent checks that every worker is alive
QUIT_GRACE_S = 2.0  # how long workers get to exit after b"Q" before they are terminated


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run at a step boundary. The runner is closed; its `params`, `state` and
    `opt_state` are private copies holding the result of the last completed step."""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class StepTimes:
    """Raw timings of one step (seconds). compute: per worker; reduce/optim: per worker for
    `sharded`, one entry (the parent) for `parent`."""

    wall: float
    compute: np.ndarray
    reduce: np.ndarray
    optim: np.ndarray


def step_breakdown(wall: float, compute, reduce, optim) -> dict[str, float]:
    """Split one step's wall time into parts that add up to it.

    compute: mean worker compute time; wait: time lost to the slowest worker (in the compute phase
    and in the reduce phase); reduction / optimizer: mean time of the actors doing them;
    signalling: the rest (messages, process wake-ups, the parent's own bookkeeping).
    """
    compute = np.asarray(compute, np.float64)
    reduce = np.asarray(reduce, np.float64)
    optim = np.asarray(optim, np.float64)
    phase2 = reduce + optim
    parts = {
        "compute": float(compute.mean()),
        "wait": float(compute.max() - compute.mean() + phase2.max() - phase2.mean()),
        "reduction": float(reduce.mean()),
        "optimizer": float(optim.mean()),
    }
    parts["signalling"] = max(0.0, float(wall) - sum(parts.values()))
    return parts


# ----------------------------------------------------------------------------- signal handling
# One handler for all live runners of this process, installed while any is open and only if the
# program had not installed its own (it can call runner.request_stop() / runner.abort() instead).
_LIVE: "weakref.WeakSet[ParallelRunner]" = weakref.WeakSet()
_SAVED_HANDLERS: dict[int, object] = {}


def _on_sigint(signum, frame):
    runners = list(_LIVE)
    if not runners:
        raise KeyboardInterrupt
    if any(r._stop_requested for r in runners):
        for r in runners:
            r.abort()
        raise KeyboardInterrupt
    for r in runners:
        r.request_stop()
    os.write(2, b"\npartrain: Ctrl-C: stopping after this step (press again to stop now)\n")


def _on_sigterm(signum, frame):
    for r in list(_LIVE):
        r.abort()
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    if _SAVED_HANDLERS or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _SAVED_HANDLERS[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        _SAVED_HANDLERS[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)


def _restore_handlers() -> None:
    if _LIVE or threading.current_thread() is not threading.main_thread():
        return
    while _SAVED_HANDLERS:
        sig, old = _SAVED_HANDLERS.popitem()
        signal.signal(sig, old)


# ------------------------------------------------------------------------------------- runner
class ParallelRunner:
    """One optimizer step over N worker processes; the LocalRunner contract (see module doc).

    model_spec: (name, options) for `build_model` (name may also be a factory callable, for tests).
    images: uint8 (n, 3, 32, 32) array, or an h5py dataset read straight into shared memory.
    reduction: "sharded" (default) or "parent" (see `reduce`).
    log_dir: where a failing worker writes its traceback (default: the temp folder).
    handle_signals: install the Ctrl-C / SIGTERM handlers described above.
    step_timeout: seconds a live worker may take to answer (None: wait while it is alive).
    augment: an `augment.AugmentSpec` (or None), applied by the workers to every sample.
    init_idx: the training indices `init_from_data` may look at (None: all images).
    """

    def __init__(self, model_spec, optimizer_spec, images, labels, mean, std, seed: int = 0,
                 n_workers: int | None = None, reduction: str = "sharded", log_dir=None,
                 start_method: str = "forkserver", handle_signals: bool = True,
                 step_timeout: float | None = None, startup_timeout: float = 120.0,
                 augment=None, init_idx=None):
        self._closed, self._failed, self._stop_requested = True, False, False
        self._procs: list = []
        self._conns: list = []
        self._shm: SharedArrays | None = None
        self.n_workers = usable_cores() if n_workers is None else int(n_workers)
        if self.n_workers < 1:
            raise PartrainError(f"--workers must be at least 1, got {self.n_workers}")
        self.reduction = get_reduction(reduction)
        self.step_timeout = step_timeout
        name, options = model_spec
        options = dict(options or {})
        self.model = build_model(name, **options) if isinstance(name, str) else name(**options)
        m = self.model
        self.optimizer = make_optimizer(m, optimizer_spec)
        n_images, size = len(labels), m.layout.size
        if tuple(images.shape) != (n_images,) + tuple(m.input_shape) or images.dtype != np.uint8:
            raise PartrainError(f"images must be uint8 {(n_images,) + tuple(m.input_shape)}, got "
                                f"{images.dtype} {tuple(images.shape)}")
        specs = {"images": (images.shape, np.uint8),
                 "labels": ((n_images,), np.asarray(labels).dtype),
                 "perm": ((n_images,), np.int64), "params": ((size,), m.dtype),
                 "reduced": ((size,), m.dtype), "state": ((m.state_layout.size,), m.dtype),
                 "stats": ((self.n_workers, m.stats_size), m.dtype),
                 "ctl": ((self.n_workers, W.CTL_COLUMNS), np.float64)}
        specs.update({f"grad{w}": ((size,), m.dtype) for w in range(self.n_workers)})
        specs.update({f"opt_{k}": ((size,), m.dtype) for k in self.optimizer.state_names})

        if handle_signals:
            _install_handlers()
        _LIVE.add(self)
        self._closed = False
        try:
            self._shm = shm = SharedArrays.create(specs)
            self.tag = shm.names()[0].rsplit("-", 1)[0] if shm.names() else "partrain"
            if hasattr(images, "read_direct"):
                images.read_direct(shm["images"])
            else:
                np.copyto(shm["images"], images)
            shm["labels"][:] = labels
            shm["perm"][:] = np.arange(n_images)
            self._n_order = n_images
            self.images, self.labels = shm["images"], shm["labels"]  # as LocalRunner has them
            self.params, self.state = shm["params"], shm["state"]
            self.opt_state = {k: shm[f"opt_{k}"] for k in self.optimizer.state_names}
            self._grads = [shm[f"grad{w}"] for w in range(self.n_workers)]
            self._reduced, self._stats, self._ctl = shm["reduced"], shm["stats"], shm["ctl"]
            m.bind(self.params, self._reduced, self.state)
            m.init_params(np.random.default_rng(seed))  # exactly as LocalRunner: N=1 equals it
            init_from_data(m, self.images, init_idx, mean, std)
            self._epoch = 0

            log_dir = tempfile.gettempdir() if log_dir is None else os.fspath(log_dir)
            os.makedirs(log_dir, exist_ok=True)
            self.log_paths = [os.path.join(log_dir, f"{self.tag}-worker{w}.log")
                              for w in range(self.n_workers)]
            scale, shift = normaliser(mean, std)
            cfg = dict(descriptor=shm.descriptor(), n_workers=self.n_workers,
                       model_spec=(name, options), optimizer_spec=optimizer_spec,
                       scale=scale, shift=shift, reduction=self.reduction.name,
                       augment=augment if augment is not None and augment.active else None)
            t0 = time.perf_counter()
            self._start_workers(start_method, cfg)
            self._collect(b"k", timeout=startup_timeout, what="start")
            self.startup_s = time.perf_counter() - t0
        except BaseException:
            self.close()
            raise
        self.last_times: StepTimes | None = None
        if self._stop_requested:
            self.close()
            raise Interrupted("interrupted by Ctrl-C while starting the workers")

    # ------------------------------------------------------------------------- the contract
    def set_order(self, order: np.ndarray, epoch: int = 0) -> None:
        """The permutation of train indices for the coming epoch (copied into shared memory), and
        the epoch's number, which every step sends to the workers (it keys the augmentation)."""
        self._check_open()
        order = np.asarray(order)
        perm = self._shm["perm"]
        if order.ndim != 1 or len(order) > len(perm):
            raise ValueError(f"order must be 1-D with at most {len(perm)} indices, got shape "
                             f"{order.shape}")
        if len(order) and (order.min() < 0 or order.max() >= len(perm)):
            raise ValueError(f"order has indices outside [0, {len(perm)})")
        perm[:len(order)] = order
        self._n_order = len(order)
        self._epoch = int(epoch)

    def step(self, lo: int, hi: int, lr: float, t: int) -> tuple[float, int]:
        """One optimizer step on samples order[lo:hi]; returns (sum of their losses, n correct)."""
        if self._stop_requested and not self._closed:
            self.close()
            raise Interrupted("interrupted by Ctrl-C")
        self._check_open()
        lo, hi, t = int(lo), int(hi), int(t)
        if not 0 <= lo < hi <= self._n_order:
            raise ValueError(f"step range [{lo}, {hi}) is outside the order of {self._n_order}")
        t0 = time.perf_counter()
        n = self.n_workers
        sharded = self.reduction.in_workers
        then_reduce = sharded and n == 1  # nobody to wait for: reduce in the same round trip
        self._send_all(b"S" + W.STEP.pack(lo, hi, float(lr), t, self._epoch, then_reduce))
        self._collect(b"r" if then_reduce else b"c")
        ctl = self._ctl
        loss, correct = 0.0, 0
        for w in range(n):  # fixed order: bit-reproducible
            loss += float(ctl[w, W.LOSS])
            correct += int(ctl[w, W.CORRECT])
        compute = ctl[:, W.T_COMPUTE].copy()
        if sharded and not then_reduce:
            self._send_all(b"R" + W.REDUCE.pack(float(lr), t))
            self._merge_stats(hi - lo)  # overlaps with the workers' reduction
            self._collect(b"r")
        else:
            self._merge_stats(hi - lo)
        if sharded:
            red, opt = ctl[:, W.T_REDUCE].copy(), ctl[:, W.T_OPTIM].copy()
        else:
            t_sum, t_opt = reduce_and_step(self._grads, self._reduced, self.params,
                                           self.opt_state, self.optimizer, 0, self.params.size,
                                           t, lr)
            red, opt = np.array([t_sum]), np.array([t_opt])
        self.last_times = StepTimes(time.perf_counter() - t0, compute, red, opt)
        return loss, correct

    def close(self, graceful: bool = True) -> None:
        """Stop the workers, copy params/state/opt_state out, unlink all shared memory.
        Idempotent; safe on every exit path. graceful=False terminates the workers at once
        instead of letting them finish their command (used when an exception is on its way)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_workers(graceful=graceful and not self._failed)
        finally:
            try:
                self._copy_out()
            finally:
                if self._shm is not None:
                    self._shm.close()
                _LIVE.discard(self)
                _restore_handlers()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(graceful=exc_type is None)

    # ------------------------------------------------------------------------- extras
    @property
    def grads(self) -> list[np.ndarray]:
        """The per-worker gradient buffers (shared memory; for tests)."""
        return self._grads

    @property
    def reduced(self) -> np.ndarray:
        """The summed gradient of the last step (shared memory; for tests). With one worker the
        optimizer reads that worker's buffer directly, so that buffer is returned."""
        return self._grads[0] if self.n_workers == 1 and self._grads else self._reduced

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def shm_names(self) -> list[str]:
        return self._shm.names() if self._shm is not None else []

    @property
    def shm_bytes(self) -> int:
        return self._shm.nbytes if self._shm is not None else 0

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def request_stop(self) -> None:
        """Ask for a stop at the next step boundary (what the first Ctrl-C does)."""
        self._stop_requested = True

    def abort(self) -> None:
        """Kill the workers and unlink the shared memory now (what a second Ctrl-C does); safe
        to call from a signal handler at any point. `close()` still tidies up afterwards."""
        self._failed = True
        for p in list(self._procs):
            try:
                p.kill()
            except Exception:
                pass
        if self._shm is not None:
            self._shm.unlink()

    # ------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise PartrainError("the parallel runner is closed")

    def _merge_stats(self, batch: int) -> None:
        if not self.model.stats_size:
            return
        total = self._stats[0].copy()
        for w in range(1, self.n_workers):
            total += self._stats[w]
        self.model.merge_stats(total, n_groups(batch, self.model.group_size))

    def _start_workers(self, start_method: str, cfg: dict) -> None:
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload([W.__name__])
        for w in range(self.n_workers):
            parent_end, child_end = ctx.Pipe(duplex=True)
            p = ctx.Process(target=W.main, name=f"partrain-worker-{w}", daemon=True,
                            args=(w, child_end, dict(cfg, log_path=self.log_paths[w])))
            self._conns.append(parent_end)
            self._procs.append(p)
            p.start()
            child_end.close()  # the worker holds the only other end: its death means EOF here

    def _send_all(self, msg: bytes) -> None:
        for w, conn in enumerate(self._conns):
            try:
                conn.send_bytes(msg)
            except OSError:  # EPIPE: the worker is gone (it may have left an error message)
                self._check_alive()
                self._fail_dead(w)

    def _collect(self, expect: bytes, timeout: float | None = None, what: str = "step") -> None:
        """Wait until every worker has sent `expect`, in order w = 0..N-1; raise on a dead or
        failing worker (checked every POLL_S) or on timeout."""
        timeout = self.step_timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        for w, conn in enumerate(self._conns):
            while not conn.poll(POLL_S):
                self._check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    self._fail(f"worker {w} did not answer within {timeout:g} s ({what})")
            try:
                msg = conn.recv_bytes()
            except (EOFError, OSError):
                self._fail_dead(w)
            if msg[:1] != expect:
                self._unexpected(w, msg)

    def _check_alive(self) -> None:
        for w, p in enumerate(self._procs):
            if p.exitcode is not None:
                conn = self._conns[w]
                try:  # a worker that raised has left its message in the pipe
                    while conn.poll(0):
                        msg = conn.recv_bytes()
                        if msg[:1] == b"E":
                            self._unexpected(w, msg)
                except (EOFError, OSError):
                    pass
                self._fail_dead(w)

    def _unexpected(self, w: int, msg: bytes) -> None:
        if msg[:1] == b"E":
            text = msg[1:].decode("utf-8", "replace")
            self._fail(f"worker {w} failed: {text} (traceback in {self.log_paths[w]})")
        self._fail(f"worker {w} sent an unexpected message {msg[:16]!r}")

    def _fail_dead(self, w: int) -> None:
        p = self._procs[w]
        p.join(1.0)
        self._fail(f"worker {w} died ({W.describe_exit(p.exitcode)})")

    def _fail(self, message: str):
        self._failed = True
        self.close()
        raise PartrainError(message)

    def _stop_workers(self, graceful: bool) -> None:
        procs, conns = self._procs, self._conns
        if graceful:
            for conn in conns:
                try:
                    conn.send_bytes(b"Q")
                except OSError:
                    pass
            deadline = time.monotonic() + QUIT_GRACE_S
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        deadline = time.monotonic() + 1.0
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join(5.0)
        for conn in conns:
            conn.close()
        for p in procs:
            try:
                p.close()
            except ValueError:  # still running after SIGKILL + 5 s: nothing more to do
                pass
        self._procs, self._conns = [], []

    def _copy_out(self) -> None:
        """Private copies of params/state/opt_state, so they outlive the shared memory."""
        if self._shm is None or not hasattr(self, "params"):
            return
        self.params = np.array(self.params)
        self.state = np.array(self.state)
        self.opt_state = {k: np.array(v) for k, v in self.opt_state.items()}
        self._grads, self._stats, self._ctl = [], None, None
        self._reduced = np.zeros_like(self.params)
        self.model.bind(self.params, self._reduced, self.state)
