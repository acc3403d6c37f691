"""One writer per RUN_DIR: an exclusive advisory lock (``fcntl.flock``) on ``RUN_DIR/.bayes-polar-lock``.

The lock belongs to the open file, so the kernel releases it when the process exits or dies (even
by SIGKILL); the file stays, holding the last holder's PID for the message of a refused writer.
:func:`open_run_dir` takes the lock *before* deciding anything about an existing run, so
``--overwrite`` or ``--resume`` of a directory a live fit holds is refused and nothing is touched.

Usage::

    with open_run_dir(out, overwrite=False, resume=False) as run_dir:
        ...  # the whole fit (ensemble members included) writes under run_dir
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ..errors import RunDirBusyError
from .checkpoint import RUN_LOCK as LOCK
from .checkpoint import RUN_MARKER, prepare_run_dir


class RunLock:
    """An exclusive lock on ``run_dir`` held by this process until :meth:`release`."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = run_dir, run_dir / LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusyError(f"run directory {run_dir} is in use by another bayes-polar process (PID "
                                  f"{holder}): wait for it to finish or stop it; nothing was changed") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def holds(self, run_dir: Path) -> bool:
        """Whether the locked file is still ``run_dir``'s lock file (not moved aside with an old run)."""
        try:
            return os.stat(run_dir / LOCK).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = None


@contextlib.contextmanager
def open_run_dir(path, overwrite: bool = False, resume: bool = False):
    """:func:`~bayes_polar.training.checkpoint.prepare_run_dir` under the RUN_DIR lock, held until exit."""
    path = Path(path)
    lock = RunLock(path) if (path / RUN_MARKER).is_file() else None  # never litter a folder that is no run
    try:
        run_dir = prepare_run_dir(path, overwrite=overwrite, resume=resume)
        if lock is None or not lock.holds(run_dir):  # a new directory, or --overwrite replaced it
            fresh = RunLock(run_dir)
            if lock is not None:
                lock.release()
            lock = fresh
        yield run_dir
    finally:
        if lock is not None:
            lock.release()
