"""Reading a file the user names, with a cap on how much is read: a pipe, `<(...)` or
/dev/stdin works as a file does, while an endless input (/dev/zero) or a huge file is refused
after `limit` bytes instead of filling the memory. (A pipe with no writer waits for one, as
`cat` would.)"""

from __future__ import annotations

import contextlib
import os
import stat


READ_CHUNK = 1 << 20  # 1 MiB


def read_at_most(path: str | os.PathLike, limit: int) -> bytes | None:
    """The bytes of `path`, or None when it holds more than `limit` bytes (only `limit` + 1
    are read: as many as a regular file holds, and from a pipe in chunks; `read(limit + 1)`
    would reserve all of it first, 257 MiB for one small picture). OSError as `open` and
    `read` raise it (a folder: IsADirectoryError)."""
    chunks, size = [], 0
    with open(path, "rb") as f:
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # its size known: one read, one copy
            first = f.read(min(os.fstat(f.fileno()).st_size, limit) + 1)
            chunks, size = [first], len(first)
        while size <= limit:  # a pipe, or a file that grew since
            chunk = f.read(min(READ_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    if size > limit:
        return None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def writing_now(folder: str | os.PathLike) -> bool:
    """Whether a `gpumlp train` is writing the run in `folder` now: it holds an exclusive
    flock(2) on the folder for as long as it runs (runfiles.lock_run), so a shared one cannot
    be had. False where the system has no flock, or the folder cannot be opened."""
    with run_held(folder) as train_holds_it:  # the shared lock is let go at once
        return train_holds_it


@contextlib.contextmanager
def run_held(folder: str | os.PathLike):
    """A shared flock(2) on the run folder `folder` held inside, so that a `gpumlp train`
    (runfiles.lock_run: exclusive) cannot start writing the run meanwhile. Yields whether a
    train holds it already (then nothing is held); False, holding nothing, where the system
    has no flock or the folder cannot be opened."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            train_holds_it = False
        except BlockingIOError:
            train_holds_it = True
        except OSError:  # a file system without locks
            train_holds_it = False
        yield train_holds_it
    finally:
        os.close(fd)
