"""What one worker process runs: attach, build the model, then obey the parent's commands.

Protocol (bytes over the worker's own Pipe; the parent sends only indices — data, parameters,
gradients, optimizer state and results all live in shared memory):

  parent -> worker                       worker -> parent
  b"S" + STEP(lo, hi, batch, lr, t, epoch, b"c" (gradient of my shard written; results in ctl[w])
              then_reduce)
                                           or b"r" when then_reduce (also reduced and stepped)
  b"R" (with the last STEP's lr and t)     b"r" (my slice of the sum reduced, optimizer stepped)
                                           under MPI, between the two: b"A" (my slice summed
                                           here), the parent's b"a" (summed over machines)
                                           with --clip-norm, before the step: b"n" (my slice's
                                           blocks of the norm written), the parent's b"C" +
                                           FACTOR (what every slice is scaled by)
  b"Q"                                     (exits)
                                           b"k" once after start-up: attached and ready
                                           b"E" + one-line message: failed (traceback in the log)

Between b"c" and b"R" the workers' shards of the row-parallel layers' inputs and output
gradients (rowgrad.py) are all in shared memory: the parent's b"R" is the barrier they need.
The worker never waits on another worker, only on its pipe; the pipe reports EOF when the parent
dies, so a worker never outlives its parent by more than one step.
"""
from __future__ import annotations

import os
import signal
import struct
import sys
import time
import traceback

import numpy as np
from threadpoolctl import threadpool_limits

from ..clipping import Clipper, scale
from ..optim import sync_frozen
from ..step import (accumulated_gradient, init_model, micro_gradients, n_micro, pass_shards,
                    split_shards)
from .recovery import STEPPED, back_up_slice, backup_names
from . import rowgrad
from .reduce import get_reduction, reduce_and_step
from .shm import SharedArrays

# lo, hi (this machine's part of the minibatch), batch (the global minibatch size: the loss is
# scaled by 1/batch), lr, t, epoch (keys the augmentation), then_reduce, step_lo (where the global
# minibatch starts: micro-batch k begins at step_lo + k·micro)
STEP = struct.Struct("<qqqdqq?q")
FACTOR = struct.Struct("<d")  # b"C": the clipping factor C / max(norm, C)
# Columns of the control block ctl (float64, one row per worker), written by worker w in row w.
LOSS, CORRECT, T_COMPUTE, T_REDUCE, T_OPTIM, PID, PHASE = range(7)  # PHASE: see recovery
CTL_COLUMNS = 8


def main(w: int, conn, cfg: dict) -> None:
    """Process entry point (see engine.ParallelRunner for cfg)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    try:
        code = _serve(w, conn, cfg)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        code = 0  # the parent has gone: nothing to report to
    except BaseException as e:  # noqa: BLE001 - everything goes to the log and the parent
        code = 1
        _report(w, conn, cfg.get("log_path"), e)
    sys.exit(code)


def _report(w: int, conn, log_path: str | None, e: BaseException) -> None:
    text = traceback.format_exc()
    if log_path:
        try:
            append_private(log_path, f"partrain worker {w} (pid {os.getpid()}) failed:\n{text}\n")
        except OSError:
            pass
    first = (str(e).strip().splitlines() or [""])[0][:300]
    try:
        conn.send_bytes(b"E" + f"{type(e).__name__}: {first}".encode("utf-8", "replace"))
    except OSError:
        pass


def append_private(path: str, text: str) -> None:
    """Append to a log only this user can read, never through a symlink (a planted link must
    not make partrain write into someone else's file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(text)


def _serve(w: int, conn, cfg: dict) -> int:
    np.seterr(over="ignore", invalid="ignore", divide="ignore")  # the parent reports a NaN loss
    with threadpool_limits(limits=1):  # N workers on N cores: no BLAS oversubscription
        shm = SharedArrays.attach(cfg["descriptor"])
        n_workers, micro = cfg["n_workers"], cfg.get("micro_batch")
        grads = [shm[f"grad{v}"] for v in range(n_workers)] if not micro else list(shm["rows"])
        rep = init_model(cfg["model_spec"], cfg["optimizer_spec"], cfg["mean"], cfg["std"],
                         arrays=(shm["params"], grads[0 if micro else w], shm["state"]))
        model, optimizer, params = rep.model, rep.optimizer, rep.params
        opt_state = {k: shm[f"opt_{k}"] for k in optimizer.state_names}
        deferred = rowgrad.attach(model, shm, cfg.get("deferred") or [])
        reduced, perm = shm["reduced"], shm["perm"]
        images, labels = shm["images"], shm["labels"]
        stats = shm["stats"][w] if model.stats_size and not micro else None
        mstats = shm["mstats"] if model.stats_size and micro else None
        ctl = shm["ctl"][w]
        reduction = get_reduction(cfg["reduction"])
        my_lo, my_hi = (reduction.ranges(params.size, n_workers)[w] if reduction.in_workers
                        else (0, 0))
        ctl[:] = 0
        ctl[PID] = os.getpid()
        augment = cfg.get("augment")  # an AugmentSpec or None
        xbuf, lr, t, k = None, 0.0, 0, n_workers
        allreduce = _across_machines(conn) if cfg.get("across_machines") else None
        backups = backup_names(optimizer.state_names) if cfg.get("step_copy") else None
        clip = (_clip_hook(conn, Clipper(1.0, params.size, shm["gnorm"])) if cfg.get("clip")
                else None)  # the parent alone knows C: the worker only writes and scales
        chunk, aside, ranks = cfg.get("chunk"), {}, cfg.get("ranks")  # ranks: (rank, size)
        parts = ([(ranks[1], ranks[0])] if chunk and ranks else []) + [(n_workers, w)]
        conn.send_bytes(b"k")
        while True:
            msg = conn.recv_bytes()
            op = msg[:1]
            if op == b"Q":
                return 0
            if op == b"S":
                lo, hi, batch, lr, t, epoch, then_reduce, step_lo = STEP.unpack_from(msg, 1)
                c0 = time.perf_counter()
                s_lo, s_hi = split_shards(lo, hi, n_workers, micro or model.group_size)[w]
                sync_frozen(model, optimizer, t)
                if deferred is not None:  # where my shard's rows go in the step's stash
                    deferred.begin(batch, s_lo - lo)
                if micro:  # rows of their own, summed in order by whoever reduces
                    k = n_micro(batch, micro)
                    xbuf = micro_gradients(model, images, labels, perm, step_lo, s_lo, s_hi,
                                           micro, grads, shm["results"], mstats,
                                           rep.scale, rep.shift, 1.0 / batch, xbuf, augment,
                                           epoch)
                else:  # with --accumulate: my shard of each pass, one pass at a time
                    passes = (pass_shards(lo, hi, chunk, model.group_size, parts) if chunk
                              else [(s_lo, s_hi)])
                    loss, correct, xbuf = accumulated_gradient(
                        model, images, labels, perm, passes, rep.scale, rep.shift,
                        1.0 / batch, stats, xbuf, augment, epoch, aside)
                    ctl[LOSS], ctl[CORRECT] = loss, correct
                ctl[T_COMPUTE] = time.perf_counter() - c0
                if not then_reduce:
                    conn.send_bytes(b"c")
                    continue
            elif op != b"R":
                raise RuntimeError(f"unknown command {msg[:16]!r} from the parent")
            # b"R", or b"S" with then_reduce: sum my slice of the gradients, step it
            if backups is not None:  # so that a lost worker costs only this step
                back_up_slice(shm, backups, my_lo, my_hi, ctl, PHASE)
            ctl[T_REDUCE], ctl[T_OPTIM] = reduce_and_step(
                grads[:k], reduced, params, opt_state, optimizer, my_lo, my_hi, t, lr, allreduce,
                clip, deferred)
            if backups is not None:
                ctl[PHASE] = STEPPED
            conn.send_bytes(b"r")


def _across_machines(conn):
    """The all-reduce hook of a worker under the MPI backend: the parent all-reduces this
    worker's summed slice across machines (workers never call MPI). b"A" says the slice is
    summed; the parent's b"a" that the sum over all machines is in place."""
    def allreduce(view) -> None:
        _ask_parent(conn, b"A", b"a", "all-reducing")
    return allreduce


def _ask_parent(conn, say: bytes, expect: bytes, what: str) -> bytes:
    """Send `say`, wait for the parent's answer starting with `expect` (b"Q": quit quietly)."""
    conn.send_bytes(say)
    msg = conn.recv_bytes()
    if msg[:1] == b"Q":
        raise SystemExit(0)
    if msg[:1] != expect:
        raise RuntimeError(f"unexpected {msg[:16]!r} from the parent while {what}")
    return msg


def _clip_hook(conn, clipper: Clipper):
    """reduce_and_step's before_step under --clip-norm: my slice's blocks of the norm into shared
    memory, b"n", then scale my slice by the factor of the parent's b"C"."""
    def before_step(source, lo: int, hi: int) -> None:
        clipper.partial(source, lo, hi)
        msg = _ask_parent(conn, b"n", b"C", "clipping")
        scale(source, lo, hi, FACTOR.unpack_from(msg, 1)[0])
    return before_step


def describe_exit(exitcode: int | None) -> str:
    """'killed by signal 9 (SIGKILL)' / 'exited with code 3' / 'is still running'."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = "unknown signal"
        return f"killed by signal {-exitcode} ({sig})"
    return f"exited with code {exitcode}"

