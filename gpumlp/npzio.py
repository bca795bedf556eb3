"""Deterministic, atomic .npz files: the same arrays always give the same bytes.

`numpy.savez` stamps each member with the current time, so two identical runs would
write different files; here every member carries a fixed timestamp. Writes go to a
temporary file in the same folder, are flushed and fsynced, then renamed over the target,
so a crash or a full disk never leaves a half-written file under the real name.

Reading (`Npz`, `load_npz`) never unpickles, and checks every array member (a name ending in
".npy") before any data is read: each must be an unencrypted .npy array whose header announces
exactly the member's size, so a header that lies or an oversized member is refused in one line
(a CheckpointError) instead of being read; with `Npz` a caller reads only the members it needs.
Other members (a README.txt added to the zip) are not arrays: they are left out, never read.
"""

from __future__ import annotations

import contextlib
import errno
import io
import lzma
import math
import os
import signal
import struct
import tempfile
import tokenize
import zipfile
import zlib
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple, NoReturn

import numpy as np

from .errors import LINK_LOOP, CheckpointError, GpumlpError, in_link_loop, shown
from .signals import replace_handlers, restore_handlers

FIXED_TIME = (1980, 1, 1, 0, 0, 0)
MAGIC_LEN = 8                 # b"\x93NUMPY" and two version bytes
NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))
MAX_NPY_HEADER = 10_000       # NumPy's own limit (numpy.load's max_header_size)


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


def atomic_write(path: str | os.PathLike, data: bytes, suffix: str = ".tmp",
                 new: bool = False) -> None:
    """Write `data` to `path` through a fsynced temporary file ".<name>.<random><suffix>" beside
    it (the name's first 200 bytes) and a rename; `new`: only where no file is (`TargetAppeared`
    if one came since the caller looked)."""
    atomic_write_all({Path(path): data}, suffix, new={Path(path)} if new else ())


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold the stop signals (SIGINT, SIGTERM, SIGHUP: those with a handler) while the block
    runs, and deliver the first one that came when it ends: for steps that must not be cut in
    two. Outside the main thread, where Python sets no handlers, signals are left as they
    are."""
    came: list[int] = []
    held = replace_handlers(lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        restore_handlers(held)
        if came:
            signal.raise_signal(came[0])   # now, to the handler it would have met


class TargetAppeared(GpumlpError):
    """A file came to be where gpumlp was to write a new one (after the check that none was
    there): it is left as it is."""


NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK,
                 errno.EXDEV, errno.EINVAL}  # no hard links here (EINVAL: Windows' FAT, SMB):
                                             # publish by rename instead


def publish_new(tmp: str, path: Path) -> None:
    """Give the temporary file `tmp` the name `path` only if nothing has it: a hard link that
    fails where a name exists (a rename would replace it), then `tmp` removed."""
    appeared = TargetAppeared(f"{path}: a file appeared there while gpumlp was writing it, "
                              "and was left as it is; move it away, or pass --overwrite")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise appeared from None
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        if os.path.lexists(path):  # the best a file system without links allows
            raise appeared from None
        os.replace(tmp, path)
        return
    with contextlib.suppress(OSError):  # published: a temporary name left is all that fails
        os.unlink(tmp)


def atomic_write_all(files: Mapping[Path, bytes], suffix: str = ".tmp",
                     new: Collection[Path] = ()) -> None:
    """Write each file as `atomic_write` does, all or none: every temporary file is written
    and fsynced before the first rename, so a full disk changes none of the targets, and
    Ctrl-C or SIGTERM during the renames takes effect after the last (`signals_held`). The
    paths in `new` are written only where no file is, first: a file that appeared there
    since the caller's check stops the write (`TargetAppeared`) before any other is replaced,
    and those already written are taken back."""
    new = {Path(p) for p in new}
    staged: list[tuple[str, Path]] = []
    published: list[Path] = []  # of `new`: taken back if a later file fails
    try:
        for path, data in sorted(files.items(), key=lambda item: item[0] not in new):
            staged.append((stage(path, data, suffix), path))
        with signals_held():
            while staged:
                tmp, path = staged[0]
                try:
                    if path in new:
                        publish_new(tmp, path)
                        published.append(path)
                    else:
                        os.replace(tmp, path)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, str(path)) from None
                staged.pop(0)
            sync_folders({path.parent for path in files})  # makes the renames durable
    except BaseException:
        for path in published if staged else ():
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        for tmp, _ in staged:  # those not renamed: a failure before or during the renames
            try:
                os.unlink(tmp)
            except OSError:
                pass


def sync_folders(folders: set[Path]) -> None:
    """fsync each folder, where the system allows it."""
    for folder in folders:
        try:
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass


def file_mode(path: Path) -> int:
    """The permissions a file written at `path` gets: those of the file it replaces, but that
    its owner may read and write it (gpumlp appends to metrics.jsonl; an export one cannot read
    is of no use), else what open() would give a new one (0o666 less the umask; mkstemp's are
    0o600)."""
    try:
        return os.stat(path).st_mode & 0o777 | 0o600
    except OSError:
        return 0o666 & ~umask()


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back (a moment other threads could see)
    os.umask(mask)
    return mask


def stage(path: Path, data: bytes, suffix: str) -> str:
    """A fsynced temporary file holding `data` beside `path`: its name, for `os.replace`."""
    try:
        # ".<name>.<8 random><suffix>": the name cut to 200 bytes so that a long one (up to
        # NAME_MAX, 255 bytes) still leaves room for the rest
        short = os.fsdecode(os.fsencode(path.name)[:200])
        fd, tmp = tempfile.mkstemp(prefix=f".{short}.", suffix=suffix, dir=path.parent)
    except OSError as e:  # named by the file it was for, not the temporary name
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode(path))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):  # a full disk has no file name: give it the target's
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return tmp


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    atomic_write(path, npz_bytes(arrays))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz, read with pickling disabled; a CheckpointError if unreadable."""
    with Npz(path) as npz:
        return {name: npz.read(name) for name in npz.headers}


class NpyHeader(NamedTuple):
    """What a .npy header says: the array's shape, layout and dtype, and where its data starts."""
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int  # bytes before the data: magic, version, header length, header

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """The size of the data the header announces (exact: Python integers)."""
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(stream: BinaryIO) -> NpyHeader:
    """The header at the start of a .npy stream, reading no data; a ValueError saying what is
    wrong when there is none, or it is longer than NumPy's MAX_NPY_HEADER, or it is malformed."""
    try:
        version = np.lib.format.read_magic(stream)
    except ValueError:
        raise ValueError("not a .npy array") from None
    if version not in NPY_VERSIONS:
        raise ValueError(f"unknown .npy format version {version[0]}.{version[1]}")
    width = 2 if version == (1, 0) else 4
    length_bytes = stream.read(width)
    length = int.from_bytes(length_bytes, "little")
    if length > MAX_NPY_HEADER:
        raise ValueError(f".npy header of {length:,} bytes, more than {MAX_NPY_HEADER:,}")
    text = stream.read(length)
    if len(length_bytes) != width or len(text) != length:
        raise ValueError(".npy header cut short")
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) \
        else np.lib.format.read_array_header_2_0  # 3.0 differs in text encoding only
    try:
        shape, fortran_order, dtype = reader(io.BytesIO(length_bytes + text))
    except (ValueError, TypeError, SyntaxError, RecursionError, tokenize.TokenError):
        raise ValueError("malformed .npy header") from None
    if any(n < 0 for n in shape):
        raise ValueError(f".npy header with a negative dimension {shape}")
    return NpyHeader(tuple(shape), fortran_order, dtype, MAGIC_LEN + width + length)


class Npz:
    """An open .npz file, every member named "*.npy" checked to hold one whole .npy array;
    data is read only by `read`, one member at a time. A CheckpointError for anything unreadable.

    Each such member's .npy header is read (not its data) and the size it announces must be the
    member's size exactly, so that a header that lies, or a member larger than its array, is
    refused before anything large is read. `headers` maps each array's name (the member's
    name without ".npy", as numpy.load names it) to its NpyHeader; members with other names
    are not arrays and are left out, unread. `read` gives what numpy.load would, pickling
    disabled.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():  # links followed
            if in_link_loop(self.path):
                raise CheckpointError(f"{self.path}: {LINK_LOOP}")
            if not self.path.exists():
                raise CheckpointError(f"{self.path}: no such file")
            what = "a folder" if self.path.is_dir() else "a device, pipe or socket"
            raise CheckpointError(f"{self.path}: not a regular file ({what}); give the .npz "
                                  "file itself")
        try:  # is_zipfile says False for a file it may not open: that is no damaged file
            with open(self.path, "rb"):
                pass
        except OSError as e:  # not a CheckpointError: no advice to start a run over
            raise GpumlpError(f"{self.path}: cannot be read ({e.strerror or e}); make it "
                              "readable and try again (the file itself may be intact)") from None
        if not zipfile.is_zipfile(self.path):  # np.load would try a pickle, or read a .npy
            raise CheckpointError(f"{self.path}: not a readable .npz file (not a zip archive)")
        self.headers: dict[str, NpyHeader] = {}
        self._members: dict[str, zipfile.ZipInfo] = {}
        with self._reading():
            self._zip = zipfile.ZipFile(self.path)
        try:
            for info in self._zip.infolist():
                if info.filename.endswith(".npy"):  # numpy.load's test for an array member
                    self._check_member(info)
        except BaseException:
            self.close()
            raise

    def _check_member(self, info: zipfile.ZipInfo) -> None:
        name = info.filename.removesuffix(".npy")
        if name in self.headers:
            self._refuse(f"two members are named {shown(name)}")
        if info.flag_bits & 0x1:
            self._refuse(f"member {shown(info.filename)} is encrypted")
        with self._reading(info.filename), self._zip.open(info) as stream:
            header = read_npy_header(stream)
        if header.dtype.hasobject:
            raise CheckpointError(f"{self.path}: holds object arrays, which gpumlp refuses to "
                                  "unpickle; it was not written by gpumlp")
        if header.offset + header.nbytes != info.file_size:
            self._refuse(f"damaged: the header of member {shown(info.filename)} announces "
                         f"{header.nbytes:,} bytes of {shown(header.dtype)} data of shape "
                         f"{shown(header.shape)}; the member holds "
                         f"{max(info.file_size - header.offset, 0):,}")
        self.headers[name] = header
        self._members[name] = info

    def read(self, name: str) -> np.ndarray:
        """The array `name` (a KeyError when there is none)."""
        info = self._members[name]
        with self._reading(info.filename), self._zip.open(info) as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)

    def _refuse(self, reason: str) -> NoReturn:
        raise CheckpointError(f"{self.path}: not a readable .npz file ({reason})")

    @contextlib.contextmanager
    def _reading(self, member: str | None = None) -> Iterator[None]:
        """Errors of the zip archive and of NumPy's .npy reader as one-line CheckpointErrors."""
        where = f"member {shown(member)}: " if member is not None else ""
        try:
            yield
        except NotImplementedError:  # zipfile: a compression method it cannot undo
            self._refuse(f"{where}unsupported compression method")
        except ValueError as e:
            self._refuse(f"{where}{str(e).splitlines()[0][:200] if str(e) else 'damaged'}")
        except (OSError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error,
                lzma.LZMAError, struct.error) as e:
            self._refuse(f"{where}truncated or corrupt: {e.__class__.__name__}")

    def close(self) -> None:
        zf = getattr(self, "_zip", None)
        if zf is not None:
            zf.close()

    def __enter__(self):  # -> Self (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
