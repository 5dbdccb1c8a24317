"""The data-parallel engine: N worker processes over shared memory, behind the runner interface.

`ParallelRunner` offers exactly what `runner.LocalRunner` offers (docs/INTERFACES.md): `params`,
`state`, `opt_state`, `model`, `set_order`, `step(lo, hi, lr, t)`, `close()`, context manager.
Before the workers start, the parent sets up and initialises the model exactly as LocalRunner
does (`step.init_model`), so the workers only ever read the parameters from shared memory.

One step, as the parent sees it:
  1. send every worker b"S"(lo, hi, lr, t, epoch): worker w computes the gradient of the summed
     loss of its shard `order[split_shards(lo, hi, N)[w]]` (augmented as (seed, epoch, sample
     index) decide, if an AugmentSpec was given), divided by the global batch size, into its own
     gradient buffer (and its batch-norm statistics into its row of `stats`);
  2. wait for all N; sum the losses (w = 0..N-1) and the batch-norm statistics, and merge those
     into the running statistics here, once;
  3. reduce: `sharded` sends b"R" and worker w sums slice w of the N buffers and steps the
     optimizer on it; `parent` does the whole sum and step itself (see `reduce`). With
     clip_norm the workers write their slices' blocks of the norm before stepping (`clipping`).
With micro_batch the gradients go into one row per micro-batch instead of one buffer per worker
and every sum runs over the rows in order (`step.micro_gradients`): the same bits for any N.
Shared memory holds everything else; a pipe carries a few bytes per message (`pool`).

Failure: a dead or failing worker ends the step within pool.POLL_S with a PartrainError naming
it. `close()` then stops the others, unlinks all shared memory and leaves no worker behind; it
runs on every exit path (also a context manager). Ctrl-C: see `interrupt`. The driver's StopFlag
(`stop=`) gets `abort` as its stop-now; without one the runner installs `interrupt.catch_signals`
for its own lifetime and `step` raises Interrupted at the first boundary after a Ctrl-C. Workers
ignore SIGINT. With on_worker_failure="restart" a lost worker costs a step instead (`recovery`).
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import PartrainError, WorkerLost
from ..interrupt import StopFlag, catch_signals
from ..clipping import Clipper, n_blocks
from ..step import active_augment, init_model, merge_stats, n_micro, split_shards, stats_batch
from . import rows, rowgrad, scratch
from . import worker as W
from .pool import WorkerPool, usable_cores
from .recovery import MAX_TRIES, backup_names, restore_step_start
from .reduce import get_reduction, reduce_and_step
from .shm import SharedArrays
from .timing import StepTimes


STEP_TIMEOUT_FLOOR_S = 300.0  # the least a step may take before a silent worker ends the run


# ------------------------------------------------------------------------------------- runner
class ParallelRunner:
    """One optimizer step over N worker processes; the LocalRunner contract (see module doc).

    model_spec: (name, options) for `build_model` (name may also be a factory callable, for tests).
    images: uint8 (n, 3, 32, 32) array, or an h5py dataset read straight into shared memory.
    reduction: "sharded" (default) or "parent" (see `reduce`).
    log_dir: where worker w writes `worker{w}.log`, its traceback, if it fails (fit: the run
        folder's logs/; default: this process's private temp folder, see scratch.py).
    stop: the driver's `interrupt.StopFlag` (train.fit's); None: install `catch_signals` while open.
    step_timeout: seconds a live worker may take over one step (None: 10x the slowest step so
        far, at least STEP_TIMEOUT_FLOOR_S); then the run ends with a PartrainError naming it.
    augment: an `augment.AugmentSpec` (or None), applied by the workers to every sample.
    init_idx: the training indices `init_from_data` may look at (None: all images).
    micro_batch: sum the gradient over micro-batches of this many samples, each in a row of its
        own, in the order k = 0, 1, ... (`step.micro_gradients`): the same bits for any N and
        any number of machines. max_batch: the largest step (sizes the rows; needed with it).
    on_worker_failure: "stop" (default: a lost worker ends the run) or "restart": fresh workers
        over the same shared memory do the step again from its start (see `recovery`), up to
        recovery.MAX_TRIES times per step; `on_restart(message)` is told each time. One machine
        only: under MPI the other ranks would wait on this one.
    clip_norm: clip the summed gradient to this global L2 norm (`clipping`): worker w writes the
        blocks of its slice, the parent sums them and sends the factor (b"n", then b"C").
    chunk: compute each step in passes of this many samples (--accumulate, without
        micro-batches): every pass is cut across machines and workers (`step.pass_shards`).
    """

    def __init__(self, model_spec, optimizer_spec, images, labels, mean, std, seed: int = 0,
                 n_workers: int | None = None, reduction: str = "sharded", log_dir=None,
                 start_method: str = "forkserver", stop: StopFlag | None = None,
                 step_timeout: float | None = None, startup_timeout: float = 120.0,
                 augment=None, init_idx=None, cross=None, micro_batch: int | None = None,
                 max_batch: int | None = None, on_worker_failure: str = "stop",
                 on_restart=None, clip_norm: float | None = None, chunk: int | None = None):
        self._closed, self._failed, self._aborted = True, False, False
        self._shm: SharedArrays | None = None
        self.n_workers = usable_cores() if n_workers is None else int(n_workers)
        if self.n_workers < 1:
            raise PartrainError(f"--workers must be at least 1, got {self.n_workers}")
        self.reduction = get_reduction(reduction)
        self._cross = cross if cross is not None and cross.size > 1 else None
        self.micro = int(micro_batch) if micro_batch else None
        if self.micro and not max_batch:
            raise ValueError("micro_batch needs max_batch (the largest step) to size its rows")
        self._max_micro = n_micro(int(max_batch), self.micro) if self.micro else 0
        self._max_batch, self.deferred = (int(max_batch) if max_batch else None), []
        if on_worker_failure not in ("stop", "restart"):
            raise ValueError(f"on_worker_failure must be 'stop' or 'restart', got "
                             f"{on_worker_failure!r}")
        if on_worker_failure == "restart" and self._cross is not None:
            raise PartrainError("--on-worker-failure restart works on one machine only: under "
                                "MPI the other ranks cannot wait while one restarts its workers")
        self._restart, self._on_restart = on_worker_failure == "restart", on_restart
        self.restarts: list[str] = []  # what each restart said
        self._pool = WorkerPool([], step_timeout)
        self._step_timeout, self._slowest_step = step_timeout, 0.0
        self._signals = catch_signals() if stop is None else None
        self._stop = stop if stop is not None else self._signals.__enter__()
        self._stop.on_force(self.abort)
        self._closed = False
        self.last_times: StepTimes | None = None
        self._last_terms = self.n_workers  # gradient buffers summed by the last step
        self._chunk, self._clip_norm, self.clip = (int(chunk) if chunk else None), clip_norm, None
        try:
            rep = init_model(model_spec, optimizer_spec, mean, std,
                             arrays=lambda m, opt: self._share(m, opt, images, labels))
            self.model, self.optimizer = rep.model, rep.optimizer
            self._slices = self.reduction.ranges(self.params.size, self.n_workers)
            rep.initialise(seed, self.images, init_idx, mean, std)  # as LocalRunner: N=1 equals it
            name, options = model_spec
            cfg = dict(descriptor=self._shm.descriptor(), n_workers=self.n_workers,
                       model_spec=(name, dict(options or {})), optimizer_spec=optimizer_spec,
                       mean=mean, std=std, reduction=self.reduction.name,
                       across_machines=self._cross is not None and not self.micro,
                       augment=active_augment(augment), micro_batch=self.micro,
                       step_copy=self._restart, clip=self.clip is not None, chunk=self._chunk,
                       deferred=self.deferred,
                       ranks=(self._cross.rank, self._cross.size) if self._cross else None)
            self._start_args = (start_method, cfg, log_dir, startup_timeout)
            self._start_workers()
        except BaseException as e:
            self.close(graceful=False)
            if (isinstance(e, PartrainError) and self._stop.asked
                    and self._stop.forced is None):  # the Ctrl-C reached a starting process
                raise self._stop.interrupted("interrupted while the workers were starting: "
                                             "no step was done") from None
            raise

    def _share(self, m, optimizer, images, labels):
        """Create the shared memory for model `m` and copy the data in; returns the vectors the
        parent's model binds: (params, the summed gradient, state)."""
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
        if self.micro:  # one row per micro-batch: gradient, (loss, correct), BN statistics
            k = self._max_micro
            specs.update(rows=((k, size), m.dtype), results=((k, 2), np.float64),
                         mstats=((k, max(1, m.stats_size)), m.dtype))
        else:
            specs.update({f"grad{w}": ((size,), m.dtype) for w in range(self.n_workers)})
        specs.update({f"opt_{k}": ((size,), m.dtype) for k in optimizer.state_names})
        self.deferred = rowgrad.deferred_layers(  # layers whose weight gradient is row-parallel
            m, self.n_workers, self.reduction.in_workers, self._max_batch, self.micro,
            self._chunk, self._cross is not None)
        specs.update(rowgrad.shm_specs(m, self.deferred, self._max_batch))
        if self._clip_norm:  # each block's sum of squares, written by the worker of its slice
            specs["gnorm"] = ((n_blocks(size),), np.float64)
        if self._restart:
            self._backups = backup_names(optimizer.state_names)
            specs.update({b: specs[a] for a, b in self._backups.items()})
        with self._stop.deferred():  # a stop-now inside would leak the block being made
            self._shm = shm = SharedArrays.create(specs)
        self.tag = shm.names()[0].rsplit("-", 1)[0] if shm.names() else "partrain"
        if hasattr(images, "read_direct"):
            images.read_direct(shm["images"])
        else:
            np.copyto(shm["images"], images)
        shm["labels"][:] = labels
        shm["perm"][:] = np.arange(n_images)
        self._n_order, self._epoch = n_images, 0
        # All views bound, or none: a second Ctrl-C between them left close()'s _copy_out with
        # params but no opt_state (an AttributeError traceback, seen in CI).
        with self._stop.deferred():
            self.images, self.labels = shm["images"], shm["labels"]  # as LocalRunner has them
            self.params, self.state = shm["params"], shm["state"]
            self.opt_state = {k: shm[f"opt_{k}"] for k in optimizer.state_names}
            self._grads = (list(shm["rows"]) if self.micro else
                           [shm[f"grad{w}"] for w in range(self.n_workers)])
            self._reduced, self._stats, self._ctl = shm["reduced"], shm["stats"], shm["ctl"]
            if self._clip_norm:
                self.clip = Clipper(self._clip_norm, size, shm["gnorm"])
        return self.params, self._reduced, self.state

    def _start(self, start_method: str, cfg: dict, log_dir, timeout: float) -> None:
        # A worker writes its log only when it fails (its traceback), so a run that goes well
        # leaves none; without a run folder, logs go to this process's private folder.
        log_dir = scratch.private_dir() if log_dir is None else os.fspath(log_dir)
        self.log_paths = [os.path.join(log_dir, f"worker{w}.log") for w in range(self.n_workers)]
        self._pool.log_paths = self.log_paths
        t0 = time.perf_counter()
        with self._stop.deferred():  # nor may it cut a process start in half
            self._pool.start(start_method, cfg, timeout)
        self._wait(self._pool.collect, b"k", timeout, "start")
        if self._cross is not None:
            # Every worker has attached: the names can go now. An MPI launcher SIGKILLs the
            # surviving ranks when one dies, and no clean-up code runs then; the mappings stay.
            self._shm.unlink()
        self.startup_s = time.perf_counter() - t0

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
        if self._signals is not None and self._stop.requested and not self._closed:
            self.close()  # on our own: the first step boundary after a Ctrl-C ends the run
            raise self._stop.interrupted("interrupted by Ctrl-C or SIGTERM")
        self._check_open()
        lo, hi, t = int(lo), int(hi), int(t)
        if not 0 <= lo < hi <= self._n_order:
            raise ValueError(f"step range [{lo}, {hi}) is outside the order of {self._n_order}")
        for attempt in range(1, MAX_TRIES + 1):
            try:
                return self._step(lo, hi, lr, t)
            except WorkerLost as e:
                if not self._restart or self._closed:  # closed by _wait already
                    raise
                if attempt == MAX_TRIES:
                    self._give_up(f"{e}, for the {MAX_TRIES}th time in step {t}")
                self._recover(e, t)
        raise AssertionError("unreachable")

    def _step(self, lo: int, hi: int, lr: float, t: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        if self._restart:  # what the parent changes itself, and the workers' marks
            self._state_at_start = np.array(self.state)
            self._ctl[:, W.PHASE] = 0
        self._pool.step_timeout = self._step_timeout or max(STEP_TIMEOUT_FLOOR_S,
                                                            10 * self._slowest_step)
        batch, cross, micro = hi - lo, self._cross, self.micro
        step_lo, k = lo, n_micro(batch, micro) if micro else self.n_workers
        if ((micro and batch > self._max_micro * micro)
                or (self.deferred and batch > self._max_batch)):  # what the rows are sized for
            raise ValueError(f"step of {batch} samples is larger than max_batch")
        if cross is not None and not self._chunk:  # this machine's part (with passes: of each)
            lo, hi = split_shards(lo, hi, cross.size, micro or self.model.group_size)[cross.rank]
        sharded, clip = self.reduction.in_workers, self.clip
        then_reduce = sharded and self.n_workers == 1 and cross is None and clip is None
        self._wait(self._pool.send_all, b"S" + W.STEP.pack(lo, hi, batch, float(lr), t,
                                                           self._epoch, then_reduce, step_lo))
        if micro and cross is not None:  # while the workers compute their rows
            rows.blank_other_rows(self._shm, self.micro, step_lo, lo, hi, k)
        self._wait(self._pool.collect, b"r" if then_reduce else b"c")
        ctl = self._ctl
        compute = ctl[:, W.T_COMPUTE].copy()
        if micro:
            loss, correct = rows.micro_results(self._shm, self.model, k, batch, self._cross,
                                               self._stop)
        else:
            loss, correct = 0.0, 0
            for w in range(self.n_workers):  # fixed order: bit-reproducible
                loss += float(ctl[w, W.LOSS])
                correct += int(ctl[w, W.CORRECT])
        if sharded and not then_reduce:
            self._wait(self._pool.send_all, b"R")  # lr and t came with b"S"
        bn_batch = stats_batch(batch, self._chunk, self.model.group_size)  # its BN groups
        if cross is not None and not micro:  # while the workers sum their slices
            loss, correct = rows.agree_across_machines(self._cross, self._stop, self.model,
                                                       self._stats, loss, correct, bn_batch)
        elif not micro:
            merge_stats(self.model, self._stats, bn_batch)
        if sharded and not then_reduce:
            if cross is not None and not micro:
                for w, (a, b) in enumerate(self._slices):  # the same order on every rank
                    self._wait(self._pool.collect_one, w, b"A")
                    cross.allreduce(self._reduced[a:b])
                    self._wait(self._pool.send_one, w, b"a")
            if clip is not None:  # every slice's blocks written: the norm, then the factor
                self._wait(self._pool.collect, b"n")
                self._wait(self._pool.send_all, b"C" + W.FACTOR.pack(clip.combine()))
            self._wait(self._pool.collect, b"r")
        if sharded:
            red, opt = ctl[:, W.T_REDUCE].copy(), ctl[:, W.T_OPTIM].copy()
        else:
            t_sum, t_opt = reduce_and_step(self._grads[:k], self._reduced, self.params,
                                           self.opt_state, self.optimizer, 0, self.params.size,
                                           t, lr, cross.allreduce if cross and not micro else None,
                                           clip.clip if clip is not None else None)
            red, opt = np.array([t_sum]), np.array([t_opt])
        self._last_terms = k
        self.last_times = StepTimes(time.perf_counter() - t0, compute, red, opt)
        self._slowest_step = max(self._slowest_step, self.last_times.wall)
        return loss, correct

    def close(self, graceful: bool = True) -> None:
        """Stop the workers, copy params/state/opt_state out, unlink all shared memory.
        Idempotent; safe on every exit path. graceful=False terminates the workers at once
        instead of letting them finish their command (used when an exception is on its way).
        A forced stop arriving meanwhile only hurries this along; it is raised at the end."""
        if self._closed:
            return
        self._closed = True
        with self._stop.deferred():
            try:
                self._pool.stop(graceful=graceful and not self._failed)
            finally:
                try:
                    self._copy_out()
                finally:
                    if self._shm is not None:
                        self._shm.close()
                    self._stop.forget(self.abort)
                    if self._signals is not None:
                        self._signals.__exit__(None, None, None)

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
        single = self._last_terms == 1 and self._cross is None
        return self._grads[0] if single and self._grads else self._reduced

    @property
    def worker_pids(self) -> list[int]:
        return self._pool.pids

    @property
    def shm_names(self) -> list[str]:
        return self._shm.names() if self._shm is not None else []

    @property
    def shm_bytes(self) -> int:
        return self._shm.nbytes if self._shm is not None else 0

    @property
    def stop_requested(self) -> bool:
        return self._stop.requested

    def request_stop(self) -> None:
        """Ask for a stop at the next step boundary (what the first Ctrl-C does)."""
        self._stop.requested = True

    def abort(self) -> None:
        """Kill the workers and unlink the shared memory now (what a second Ctrl-C does); safe
        to call from a signal handler at any point. `close()` still tidies up afterwards, and
        the next wait raises the stop flag's forced exception."""
        self._failed = self._aborted = True
        self._pool.kill()
        if self._shm is not None:
            self._shm.unlink()

    # ------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise PartrainError("the parallel runner is closed")

    def _recover(self, lost: WorkerLost, t: int) -> None:
        """After a lost worker, with restart on: every worker gone, the step's start restored,
        fresh workers started; the caller does the step again."""
        try:
            self._pool.kill()
            self._pool.stop(graceful=False)  # joined: no worker writes any more
            restored = restore_step_start(self._shm, self._backups, self._slices,
                                          self._ctl[:, W.PHASE])
            self.state[...] = self._state_at_start
            self._ctl[:] = 0
            self._start_workers()
        except BaseException:
            self._failed = True
            self.close(graceful=False)
            raise
        msg = (f"{lost} in step {t}; {self.n_workers} fresh worker(s) started in "
               f"{self.startup_s:.1f} s, step {t} again from its start"
               + (f" (slices of worker(s) {', '.join(map(str, restored))} put back)"
                  if restored else ""))
        self._note_restart(msg)

    def _start_workers(self) -> None:
        """Start the workers; with restart on, one lost while starting is replaced too (nothing
        was computed yet): fresh workers, up to MAX_TRIES starts."""
        for attempt in range(1, MAX_TRIES + 1):
            try:
                return self._start(*self._start_args)
            except WorkerLost as e:
                if not self._restart or self._closed or attempt == MAX_TRIES:
                    raise
                self._pool.kill()
                self._pool.stop(graceful=False)
                self._note_restart(f"{e} while the workers started; starting "
                                   f"{self.n_workers} fresh one(s)")

    def _note_restart(self, msg: str) -> None:
        self.restarts.append(msg)
        if self._on_restart is not None:
            self._on_restart(msg)

    def _give_up(self, message: str) -> None:
        self._failed = True
        self.close(graceful=False)
        raise PartrainError(message)

    def _wait(self, talk, *args) -> None:
        """A pool call; on a failure close the runner and raise (after `abort`: the stop). A lost
        worker with restart on is left to `step` (nothing closed)."""
        try:
            talk(*args)
        except PartrainError as e:
            if isinstance(e, WorkerLost) and self._restart and not self._aborted \
                    and not self._closed:
                raise
            self._failed = True
            self.close(graceful=False)
            if self._aborted:
                raise self._stop.forced_exception() from None
            raise

    def _copy_out(self) -> None:
        """Private copies of params/state/opt_state, so they outlive the shared memory."""
        if self._shm is None or not hasattr(self, "params"):
            return
        self.params = np.array(self.params)
        self.state = np.array(self.state)
        self.opt_state = {k: np.array(v) for k, v in self.opt_state.items()}
        self._grads, self._stats, self._ctl = [], None, None
        self._reduced = np.zeros_like(self.params)
        if hasattr(self, "model"):
            self.model.bind(self.params, self._reduced, self.state)
