"""Downloading one canonical MNIST `.gz` file from a mirror, with the standard library.

urllib is enough here: one GET per file, no session, no retries (the next mirror is the retry),
and it honours the usual proxy variables. Three limits keep a bad or slow server from holding
the fetch: `timeout` bounds the connection and every wait for the next bytes; `deadline` bounds
the whole file, however slowly a server trickles its headers or body; and a body larger than
MAX_BYTES is refused as soon as it is announced or passed, so it is never held whole.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from . import __version__
from .fetch_store import (SourceFailed, Unreachable, gunzip, squeeze_spaces,
                          store_verified)

USER_AGENT = f"gpumlp/{__version__} (MNIST downloader; Python urllib)"
CHUNK = 1 << 16
MAX_BYTES = 64 << 20  # no body is larger: the largest MNIST .gz is 9.9 MB
DEADLINE = 600.0  # seconds one file may take in all (9.9 MB at 16.5 KB/s)

OnBytes = Callable[[int, "int | None"], None]  # (bytes so far, total or None when unknown)


def file_url(base: str, stem: str) -> str:
    return f"{base.rstrip('/')}/{stem}.gz"


def content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def read_body(response, on_bytes: OnBytes, stop: threading.Event) -> bytes:
    """The response body (cut short once `stop` is set); one shorter than announced, or longer
    than MAX_BYTES, is a failure."""
    total, body = content_length(response), bytearray()
    if total is not None and total > MAX_BYTES:
        raise SourceFailed(f"announces {total:,} bytes, more than any MNIST file "
                           f"({MAX_BYTES:,} at most)")
    on_bytes(0, total)
    while not stop.is_set() and (chunk := response.read1(CHUNK)):
        body += chunk
        if len(body) > MAX_BYTES:
            raise SourceFailed(f"sent over {MAX_BYTES:,} bytes, more than any MNIST file")
        on_bytes(len(body), total)
    if total is not None and len(body) < total:
        raise SourceFailed(f"connection closed after {len(body)} of {total} bytes")
    return bytes(body)


def get(url: str, timeout: float, on_bytes: OnBytes, stop: threading.Event) -> bytes:
    """GET `url`'s body; every network failure becomes a SourceFailed."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return read_body(response, on_bytes, stop)
    except urllib.error.HTTPError as e:
        e.close()  # its connection, else left to the garbage collector (a ResourceWarning)
        raise SourceFailed(squeeze_spaces(f"HTTP {e.code} {e.reason}")) from None
    except urllib.error.URLError as e:
        raise Unreachable(squeeze_spaces(f"cannot connect ({e.reason})")) from None
    except (TimeoutError, socket.timeout):
        raise Unreachable(f"no data for {timeout:g} s (timed out)") from None
    except http.client.IncompleteRead as e:
        raise SourceFailed(f"connection closed after {len(e.partial)} bytes") from None
    except (http.client.HTTPException, OSError) as e:
        raise Unreachable(squeeze_spaces(f"connection failed ({e.__class__.__name__}: {e})")
                          ) from None


def download(url: str, timeout: float, deadline: float, on_bytes: OnBytes) -> bytes:
    """`get(url)`, given up after `deadline` seconds whatever the server is doing (a name lookup,
    headers or a body trickled a byte at a time): the request runs in a daemon thread that stops
    at its next bytes, and the caller moves on."""
    outcome: dict = {}
    stop = threading.Event()

    def work():
        try:
            outcome["body"] = get(url, timeout, on_bytes, stop)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=work, name=f"gpumlp download {url}", daemon=True)
    worker.start()
    try:
        worker.join(deadline)
        late = worker.is_alive()
    finally:
        stop.set()
    if late:
        raise Unreachable(f"took over {deadline:g} s for one file (the limit per file)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["body"]


def fetch_file(base: str, folder: Path, stem: str, expected: str, timeout: float,
               on_bytes: OnBytes, deadline: float = DEADLINE) -> Path:
    """Download `stem`.gz from the mirror `base` and store it, verified, as `folder/stem`."""
    body = download(file_url(base, stem), timeout, deadline, on_bytes)
    return store_verified(folder, stem, gunzip(body), expected)
