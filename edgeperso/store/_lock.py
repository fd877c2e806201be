"""A per-user advisory lock across processes ("one trainer per user at a time").

flock(2) on one file per user pseudonym under ``<store>.locks/``. The kernel drops the lock
when its holder exits or is killed, so a crashed trainer never leaves a stale lock, and a
second open file description in the same process conflicts too.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from edgeperso._errors import LockedError, StorageError, UnsupportedError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["UserLock"]


class UserLock:
    """A held per-user lock; release it with `release()` or by leaving a `with` block."""

    def __init__(self, path: Path) -> None:
        if fcntl is None:
            raise UnsupportedError("per-user locks need fcntl (POSIX); not available here")
        self._path = path
        while True:
            try:
                path.parent.mkdir(mode=0o700, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise StorageError(f"cannot create the user lock file ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(
                    "another process or thread holds this user's lock (a trainer is running); "
                    "retry when it finishes"
                ) from None
            # A holder may have removed the file (`remove`) between our open and our flock:
            # then we hold a lock on a file nobody else can find. Try again on the path's.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def remove(self) -> None:
        """Delete the lock file while holding it, then release: after a user is forgotten,
        nothing on disk should say that this user ever trained here."""
        if self._fd is not None:
            try:
                self._path.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot remove the user lock file ({exc.strerror})") from None
            finally:
                self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> UserLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
