"""Shared-memory arrays and their lifetime.

The parent creates every block (and is the only process that ever unlinks one); workers attach by
name. Block names are `partrain-<parent pid>-<random>-<array>`, so `ls /dev/shm` says who owns a
block, and a test can check that a run left nothing behind.

Lifetime, on every exit path:
- `SharedArrays.unlink()` (idempotent) is called by the engine's `close()`, its `abort()` (a
  second Ctrl-C) and its failure path; a `weakref.finalize` (which also runs at interpreter exit) covers callers that
  forget to close.
- If the parent is killed outright (SIGKILL), the multiprocessing resource tracker unlinks the
  blocks once the parent and its workers are gone (the parent registers each block there on
  creation), with a "leaked shared_memory objects" warning.
- If the tracker is killed too (SIGKILL of the whole process group), the next `create` on the
  machine removes the blocks: the owner holds a lock on the set's lock file while it lives
  (scratch.py).

Workers attach *without* registering with the resource tracker. With `spawn`/`forkserver` the
children share the parent's tracker process, which keeps one set of names: a worker's register is a
no-op, and a worker's unregister (the usual bpo-38119 advice for unrelated processes) would remove
the parent's entry, so the parent's own unlink later makes the tracker print a KeyError traceback
and a SIGKILLed parent would leak the block. So `attach` skips the registration altogether (Python
3.13 has `track=False` for this).
"""
from __future__ import annotations

import os
import secrets
import sys
import weakref
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from ..errors import PartrainError
from . import scratch

PREFIX = "partrain-"
SHM_DIR = "/dev/shm"
_ALIGN = 4096  # page-align every array: no false sharing between workers' buffers


class _Block(SharedMemory):
    """A SharedMemory that is never unmapped explicitly.

    numpy keeps a reference to the buffer object but no buffer export, so `SharedMemory.close()`
    succeeds while arrays still point into the mapping, and the next access is a segfault. Here the
    mapping simply lives until the last array (and this object) is gone; only the descriptor,
    which mmap has duplicated, is closed at once.
    """

    def release_fd(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:  # see the class docstring
        self.release_fd()

    def __del__(self):
        pass


def free_bytes(path: str = SHM_DIR) -> int | None:
    """Bytes an unprivileged process may still allocate in `path` (None if it does not exist)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class SharedArrays:
    """Named numpy arrays, each in its own POSIX shared-memory block.

    `SharedArrays.create(specs)` in the parent: specs is {name: (shape, dtype)}. Zero-size arrays
    are ordinary (private) numpy arrays, as a shared block cannot be empty.
    `SharedArrays.attach(descriptor)` in a worker, with `descriptor` from the parent's
    `.descriptor()` (a small picklable dict).
    """

    def __init__(self, arrays: dict[str, np.ndarray], blocks: dict[str, SharedMemory],
                 owner: bool, descriptor: dict, lock: str | None = None):
        self.arrays = arrays
        self._blocks = blocks
        self._descriptor = descriptor
        self.owner = owner
        self._unlinked = not owner
        self.nbytes = sum(b.size for b in blocks.values())
        self._lock = lock
        self._finalizer = (weakref.finalize(self, _unlink_blocks, list(blocks.values()),
                                            os.getpid(), lock) if owner else None)

    # ----------------------------------------------------------------------------- parent
    @classmethod
    def create(cls, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
               tag: str | None = None) -> "SharedArrays":
        """Allocate every array (zero-filled), or raise PartrainError and leave nothing behind.
        Blocks that killed runs left are removed first (scratch.sweep)."""
        scratch.sweep()
        scratch.start_quiet_tracker()
        need = sum(-(-_nbytes(s, d) // _ALIGN) * _ALIGN for s, d in specs.values())
        free = free_bytes()
        if free is not None and need > free:
            raise PartrainError(
                f"{SHM_DIR} has {_mib(free)} free but the parallel engine needs {_mib(need)} of "
                f"shared memory (data set, parameters, one gradient buffer per worker, optimizer "
                f"state); free some space, use fewer workers, or enlarge {SHM_DIR} "
                f"(docker run --shm-size=...)")
        tag = tag or f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        arrays, blocks, descriptor = {}, {}, {}
        lock = _new_lock(tag)  # "in use" for scratch.sweep, until unlink()
        try:
            for name, (shape, dtype) in specs.items():
                shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
                size = _nbytes(shape, dtype)
                if size == 0:
                    arrays[name] = np.zeros(shape, dtype)
                    descriptor[name] = (None, shape, dtype.str)
                    continue
                block = _create_block(f"{tag}-{name}", size)
                blocks[name] = block
                _reserve(block, size, need)
                block.release_fd()
                arrays[name] = np.ndarray(shape, dtype, buffer=block.buf)
                descriptor[name] = (block.name, shape, dtype.str)
        except BaseException:
            _unlink_blocks(list(blocks.values()), os.getpid(), lock)
            raise
        return cls(arrays, blocks, True, descriptor, lock)

    def descriptor(self) -> dict:
        """{name: (block name or None, shape, dtype str)}: what a worker needs to attach."""
        return dict(self._descriptor)

    def unlink(self) -> None:
        """Remove every block's name (idempotent; only the creating process does anything).

        Mappings stay valid until closed, so arrays already handed out keep working."""
        if self._unlinked:
            return
        self._unlinked = True
        if self._finalizer is not None:
            self._finalizer.detach()
        _unlink_blocks(list(self._blocks.values()), os.getpid(), self._lock)

    # ----------------------------------------------------------------------------- worker
    @classmethod
    def attach(cls, descriptor: dict) -> "SharedArrays":
        arrays, blocks = {}, {}
        try:
            for name, (block_name, shape, dtype) in descriptor.items():
                if block_name is None:
                    arrays[name] = np.zeros(shape, dtype)
                    continue
                block = _attach_untracked(block_name)
                block.release_fd()
                blocks[name] = block
                arrays[name] = np.ndarray(shape, np.dtype(dtype), buffer=block.buf)
        except FileNotFoundError as e:
            raise PartrainError(f"shared-memory block {e.filename or ''} is gone "
                                f"(did the parent exit?)") from None
        return cls(arrays, blocks, False, dict(descriptor))

    # ----------------------------------------------------------------------------- both
    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def names(self) -> list[str]:
        """Names of the shared blocks (as in /dev/shm)."""
        return [b.name for b in self._blocks.values()]

    def close(self) -> None:
        """Drop this object's arrays (the owner also unlinks every block). Each mapping is
        released when the last numpy view into it goes, never earlier (see `_Block`)."""
        if self.owner:
            self.unlink()
        self.arrays = {}
        self._blocks = {}


def _create_block(name: str, size: int) -> "_Block":
    try:
        return _Block(name=name, create=True, size=size)
    except OSError as e:
        raise _no_shm(e) from None


def _no_shm(e: OSError) -> PartrainError:
    """A read-only /dev/shm, no inodes left, no permission: one line."""
    return PartrainError(f"could not create shared memory in {SHM_DIR} ({e.strerror or e}); the "
                         f"parallel engine needs a writable {SHM_DIR} with room for the data set "
                         f"and the parameters (docker run --shm-size=...)")


def _reserve(block: SharedMemory, size: int, need: int) -> None:
    """Make tmpfs commit the pages now, so a full /dev/shm is a clear error here rather than a
    SIGBUS in some worker later (pytorch#5040)."""
    fd = getattr(block, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (95, 22):  # EOPNOTSUPP / EINVAL: the file system cannot reserve; go on
            return
        free = free_bytes()
        raise PartrainError(
            f"could not reserve {_mib(size)} in {SHM_DIR} ({os.strerror(e.errno)}); the parallel "
            f"engine needs {_mib(need)} in all" + (f", {_mib(free)} is free" if free else "")
            + f"; free some space or enlarge {SHM_DIR} (docker run --shm-size=...)") from None


def _new_lock(tag: str) -> str:
    """The set's lock file (scratch.py), registered with the resource tracker like a block, so a
    SIGKILLed parent's tracker removes it with the blocks."""
    name = f"{tag}-lock"
    try:
        scratch.new_lock_file(os.path.join(SHM_DIR, name))
    except OSError as e:
        raise _no_shm(e) from None
    resource_tracker.register("/" + name, "shared_memory")
    return name


def _unlink_lock(name: str) -> None:
    scratch.release(os.path.join(SHM_DIR, name))
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except OSError:
        pass
    try:
        resource_tracker.unregister("/" + name, "shared_memory")
    except Exception:  # noqa: BLE001 - the tracker is gone: nothing to tell it
        pass


def _unlink_blocks(blocks: list[SharedMemory], creator_pid: int, lock: str | None) -> None:
    """Unlink each block once, then the set's lock file; quiet about blocks already gone. Only
    in the creating process (a forked child inheriting the finalizer must not unlink its
    parent's memory)."""
    if os.getpid() != creator_pid:
        return
    _unlink_each(blocks)
    if lock is not None:
        _unlink_lock(lock)


def _unlink_each(blocks: list[SharedMemory]) -> None:
    for block in blocks:
        try:
            block.unlink()
        except FileNotFoundError:
            try:  # already gone (e.g. removed by hand): still drop the tracker's entry
                resource_tracker.unregister(block._name, "shared_memory")
            except Exception:
                pass
        except Exception:
            pass


def _attach_untracked(name: str) -> SharedMemory:
    """Open an existing block without telling the resource tracker (see the module docstring)."""
    if sys.version_info >= (3, 13):
        return _Block(name=name, track=False)
    register = resource_tracker.register

    def skip_shared_memory(res_name, rtype):
        if rtype != "shared_memory":
            register(res_name, rtype)

    resource_tracker.register = skip_shared_memory  # workers are single-threaded here
    try:
        return _Block(name=name)
    finally:
        resource_tracker.register = register


def leftovers(pid: int | None = None) -> list[str]:
    """Names in /dev/shm made by partrain (by process `pid` if given): for tests and diagnostics."""
    prefix = PREFIX if pid is None else f"{PREFIX}{pid}-"
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except OSError:
        return []
