"""Reading a file the user names, with a cap on how much is read: a pipe, `<(...)` or
/dev/stdin works as a file does, while an endless input (/dev/zero) or a huge file is refused
after `limit` bytes instead of filling the memory. (A pipe with no writer waits for one, as
`cat` would.)"""

from __future__ import annotations

import os


def read_at_most(path: str | os.PathLike, limit: int) -> bytes | None:
    """The bytes of `path`, or None when it holds more than `limit` bytes (only `limit` + 1
    are read). OSError as `open` and `read` raise it (a folder: IsADirectoryError)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return None if len(data) > limit else data


def writing_now(folder: str | os.PathLike) -> bool:
    """Whether a `gpumlp train` is writing the run in `folder` now: it holds an exclusive
    flock(2) on the folder for as long as it runs (runfiles.lock_run), so a shared one cannot
    be had. False where the system has no flock, or the folder cannot be opened."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as fd closes
        return False
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks
        return False
    finally:
        os.close(fd)
