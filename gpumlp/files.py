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
