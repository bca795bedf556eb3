"""Downloading one canonical MNIST `.gz` file from a mirror, with the standard library.

urllib is enough here: one GET per file, no session, no retries (the next mirror is the retry),
and it honours the usual proxy variables. The timeout bounds both the connection and every wait
for the next bytes, so a stalled server costs at most `timeout` seconds per mirror.
"""

from __future__ import annotations

import http.client
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from . import __version__
from .fetch_store import (SourceFailed, Unreachable, cannot_write, gunzip, store_verified,
                          temp_file)

USER_AGENT = f"gpumlp/{__version__} (MNIST downloader; Python urllib)"
CHUNK = 1 << 16

OnBytes = Callable[[int, "int | None"], None]  # (bytes so far, total or None when unknown)


def file_url(base: str, stem: str) -> str:
    return f"{base.rstrip('/')}/{stem}.gz"


def content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def copy_body(response, out, on_bytes: OnBytes) -> None:
    """Copy the response body to `out`; a body shorter than announced is a failure."""
    total, done = content_length(response), 0
    on_bytes(done, total)
    while chunk := response.read(CHUNK):
        out.write(chunk)
        done += len(chunk)
        on_bytes(done, total)
    if total is not None and done < total:
        raise SourceFailed(f"connection closed after {done} of {total} bytes")


def download(url: str, out, timeout: float, on_bytes: OnBytes) -> None:
    """GET `url` into the binary file `out`; every network failure becomes a SourceFailed."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            copy_body(response, out, on_bytes)
    except urllib.error.HTTPError as e:
        raise SourceFailed(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise Unreachable(f"cannot connect ({e.reason})") from None
    except (TimeoutError, socket.timeout):
        raise Unreachable(f"no data for {timeout:g} s (timed out)") from None
    except http.client.IncompleteRead as e:
        raise SourceFailed(f"connection closed after {len(e.partial)} bytes") from None
    except (http.client.HTTPException, ConnectionError) as e:
        raise Unreachable(f"connection failed ({e.__class__.__name__}: {e})") from None


def fetch_file(base: str, folder: Path, stem: str, expected: str, timeout: float,
               on_bytes: OnBytes) -> Path:
    """Download `stem`.gz from the mirror `base` into `folder`, verified, as `folder/stem`."""
    try:
        fd, part = temp_file(folder, stem)
    except OSError as e:
        raise cannot_write(folder, e) from None
    try:
        with os.fdopen(fd, "wb") as out:
            download(file_url(base, stem), out, timeout, on_bytes)
        return store_verified(folder, stem, gunzip(part.read_bytes()), expected)
    finally:
        part.unlink(missing_ok=True)
