"""Deterministic, atomic .npz files: the same arrays always give the same bytes.

`numpy.savez` stamps each member with the current time, so two identical runs would
write different files; here every member carries a fixed timestamp. Writes go to a
temporary file in the same folder, are flushed and fsynced, then renamed over the target,
so a crash or a full disk never leaves a half-written file under the real name.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import CheckpointError

FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of an uncompressed .npz holding `arrays`, in the given order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buffer.getvalue()


def atomic_write(path: str | os.PathLike, data: bytes, suffix: str = ".tmp") -> None:
    """Write `data` to `path` through a fsynced temporary file ".<name>.<random><suffix>" beside
    it and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    atomic_write(path, npz_bytes(arrays))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz, read with pickling disabled; a CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # np.load would try a pickle, or return a bare .npy array
        raise CheckpointError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise CheckpointError(f"{path}: holds object arrays, which gpumlp refuses to "
                                  "unpickle; it was not written by gpumlp") from None
        raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file (truncated or corrupt: "
                              f"{e.__class__.__name__})") from None
