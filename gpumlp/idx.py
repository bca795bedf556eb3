"""The IDX file format of MNIST: read (raw or gzip) with strict checks, and write.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the body. MNIST uses the
unsigned-byte type (0x08): images are (n, 28, 28), labels are (n,).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

UBYTE = 0x08
MAX_BYTES = 64 << 20  # no MNIST file is larger (the largest is 47,040,016 bytes)


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes into a uint8 array; a bad header or body is a DataError."""
    if len(raw) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(raw)} bytes)")
    zero1, zero2, dtype_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero1 != 0 or zero2 != 0 or dtype_code != UBYTE or not 1 <= ndim <= 3:
        raise DataError(
            f"{name}: bad magic number 0x{raw[:4].hex()} (expected 0x00000801 for labels "
            "or 0x00000803 for images); is this an MNIST IDX file?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: header cut short ({len(raw)} bytes, need {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if ndim == 3 and shape[1:] != (28, 28):
        raise DataError(f"{name}: images are {shape[1]}x{shape[2]}, expected 28x28")
    expected = int(np.prod(shape, dtype=np.int64))
    body = len(raw) - header
    if body != expected:
        what = "short" if body < expected else "too long"
        raise DataError(f"{name}: body is {what}: {body} bytes for shape {shape} "
                        f"(expected {expected}); the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def gunzip(raw: bytes, name: str = "data", limit: int | None = None) -> bytes:
    """The decompressed bytes when `raw` is gzip data (by its magic, not a name), else `raw`.

    Decompression stops as soon as the output passes `limit` bytes (default MAX_BYTES), so a
    small file that would expand to gigabytes (a decompression bomb) costs no more than that.
    Errors start with "`name`: ", or with no prefix when `name` is empty.
    """
    if raw[:2] != b"\x1f\x8b":
        return raw
    limit = MAX_BYTES if limit is None else limit
    where = f"{name}: " if name else ""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            out = stream.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{where}broken gzip data ({e})") from None
    if len(out) > limit:
        raise DataError(f"{where}expands to more than {limit:,} bytes, more than any MNIST "
                        "file")
    return out


def read_bytes(path: str | os.PathLike) -> bytes:
    """The decompressed bytes of the file at `path`; one larger than MAX_BYTES is not read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise DataError(f"{path}: {size:,} bytes, more than any MNIST file")
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return gunzip(raw, str(path))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a uint8 array."""
    return parse_idx(read_bytes(path), name=str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array of 1 to 3 dimensions."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()
