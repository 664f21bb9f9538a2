"""One writing run per checkpoint directory: :class:`WriterLock`."""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from types import ModuleType

#: The lock file in a directory that a writing manager holds.
LOCK_FILE = ".ema_jax-writer.lock"


def _fcntl() -> ModuleType | None:
    """The ``fcntl`` module, or ``None`` where the platform has none (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    return fcntl


class WriterLock:
    """An exclusive ``flock`` on ``<directory>/.ema_jax-writer.lock``, which names its holder
    (host, pid, start time), held until :meth:`release`.

    The kernel drops the lock when its holder exits, however it dies (``kill -9``
    included), so a stale file is simply taken over. Two holders in one process conflict
    too (each holds its own open file). Where ``fcntl`` does not exist (Windows) no lock is
    taken: a ``UserWarning`` says so, and one writer per directory is up to the caller.

    Raises:
      RuntimeError: another writer holds the directory (its holder is named).
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None
        os.makedirs(directory, exist_ok=True)
        fcntl = _fcntl()
        if fcntl is None:
            warnings.warn(
                f"this platform has no fcntl: {directory} is opened for writing without the "
                "one-writer lock; make sure no other run writes to it at the same time",
                UserWarning,
                stacklevel=3,
            )
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with open(fd, closefd=True) as f:
                    holder = f.read().strip() or "unknown (it has not written its name yet)"
                raise RuntimeError(
                    f"checkpoint directory {directory} is already open for writing by "
                    f"another manager: {holder} (lock {self.path}). One writing run per "
                    "directory: close that manager (or wait for its run to end), write "
                    "elsewhere, or open this one with manager(directory, read_only=True) to "
                    "read"
                ) from None
            try:  # a holder that closed meanwhile removed the file we locked: retry
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Removes the file (still locked, so no one can take it meanwhile), then unlocks.
        A killed holder leaves the file, unlocked: the next holder takes it over."""
        if self._fd is not None:
            os.unlink(self.path)
            os.close(self._fd)
            self._fd = None
