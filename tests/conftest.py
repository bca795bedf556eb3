"""Shared fixtures: the real MNIST folder (or a visible skip), and a tiny synthetic MNIST.

The real MNIST folder is, in this order: $GPUMLP_DATA_DIR, ../shared/data/mnist beside the
checkout, or gpumlp's own cache when `gpumlp data fetch` (or a first `gpumlp train`) filled it.

The tiny MNIST is learnable (each digit is a fixed random prototype plus noise), written as
the four gzip IDX files with `gpumlp.idx.encode_idx`, so the loaders and the CLI read it
exactly as they read the real files, in milliseconds.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from gpumlp import fetch
from gpumlp.idx import encode_idx
from gpumlp.mnist import FILES, Mnist, Split
from gpumlp.signals import STOP_SIGNALS

# The shared MNIST files sit beside the repository: <repo>/../shared/data/mnist
SHARED_MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
# Where the real files may be, as the session starts: tests that monkeypatch the environment or
# fetch.CHECKSUMS (tiny_data_dir) must not change the answer of real_mnist_dir.
STARTING_DATA_DIR = os.environ.get(fetch.DATA_DIR_ENV)
STARTING_CACHE = fetch.mnist_cache_dir()
CANONICAL_CHECKSUMS = dict(fetch.CHECKSUMS)


def holds_mnist_files(folder: Path) -> bool:
    """Whether the four MNIST files are in `folder`, raw or gzipped (not read)."""
    return all((folder / stem).is_file() or (folder / f"{stem}.gz").is_file()
               for pair in FILES.values() for stem in pair)


@functools.cache
def real_mnist_dir() -> Path | None:
    """GPUMLP_DATA_DIR when set, else the shared folder, else gpumlp's own cache when it holds
    the four canonical files (checked by sha256 as gpumlp checks them, ~0.3 s, never
    downloaded); None when none of them has the files. Decided once, from the session's start."""
    candidates = [Path(STARTING_DATA_DIR)] if STARTING_DATA_DIR else []
    candidates.append(SHARED_MNIST_DIR)
    for folder in candidates:
        if holds_mnist_files(folder):
            return folder
    if STARTING_CACHE.is_dir() and not fetch.verify_folder(STARTING_CACHE, CANONICAL_CHECKSUMS):
        return STARTING_CACHE
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder of the four real MNIST files; the test is skipped, with a reason, without it."""
    folder = real_mnist_dir()
    if folder is None:
        pytest.skip(f"real MNIST files not found: run `gpumlp data fetch` to fill gpumlp's "
                    f"cache ({STARTING_CACHE}, intact files only), or set "
                    f"{fetch.DATA_DIR_ENV} to a folder holding the four MNIST IDX files")
    return folder


class TinyMnist(NamedTuple):
    folder: Path                 # the four .gz IDX files
    mnist: Mnist                 # the same arrays, in memory
    checksums: dict[str, str]    # stem -> sha256 of the decompressed IDX bytes


def make_tiny_mnist(n_train: int = 300, n_test: int = 100, seed: int = 0) -> Mnist:
    """Images of 10 random prototypes (one per digit) with pixel noise; uint8, (n, 784).

    Like MNIST's, each image is 0 outside a centred square (its size drawn per image), so
    the fast CPU step leaves out zero pixels here as it does on the real data.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(10, 784))
    centre = np.maximum(np.abs(np.arange(28) - 13.5)[:, None],
                        np.abs(np.arange(28) - 13.5)[None, :]).reshape(784)  # (784,) to centre

    def split(n: int) -> Split:
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        noise = rng.integers(-60, 61, size=(n, 784))
        inside = centre[None, :] < rng.integers(11, 15, size=(n, 1))         # (n, 784)
        images = (np.clip(prototypes[labels] + noise, 0, 255) * inside).astype(np.uint8)
        return Split(images, labels)

    return Mnist(split(n_train), split(n_test))


def write_mnist(folder: Path, mnist: Mnist) -> dict[str, str]:
    """The four gzip IDX files of `mnist` in `folder`; stem -> sha256 of the raw IDX bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, (images_stem, labels_stem) in FILES.items():
        images, labels = getattr(mnist, name)
        for stem, array in ((images_stem, images.reshape(-1, 28, 28)), (labels_stem, labels)):
            raw = encode_idx(array)
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw, mtime=0))
            checksums[stem] = hashlib.sha256(raw).hexdigest()
    return checksums


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> TinyMnist:
    """A learnable 300 + 100 example MNIST, on disk and in memory (read-only: do not modify)."""
    mnist = make_tiny_mnist()
    folder = tmp_path_factory.mktemp("tiny-mnist")
    return TinyMnist(folder, mnist, write_mnist(folder, mnist))


@pytest.fixture
def tiny_data_dir(tiny_mnist, monkeypatch, tmp_path) -> Path:
    """The tiny MNIST folder, accepted by `--data-dir` as if it held the canonical files.

    The data fetcher accepts a folder only when its files have the canonical checksums; here
    the canonical checksums are the tiny files' own, and the cache is an empty temporary folder,
    so nothing is downloaded and the user's cache is never touched.
    """
    from gpumlp import fetch

    monkeypatch.setattr(fetch, "CHECKSUMS", dict(tiny_mnist.checksums))
    monkeypatch.setenv("GPUMLP_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("GPUMLP_DATA_DIR", raising=False)
    return tiny_mnist.folder


@pytest.fixture(scope="session")
def gpu():
    """The CUDA backend with TF32 off (the tolerances are float32's); skipped, with the reason,
    where gpumlp sees no CUDA device."""
    from gpumlp.backend import available_devices, enable_tf32, get_backend

    if not any(d.startswith("cuda") for d in available_devices()):
        pytest.skip("no CUDA device visible to gpumlp (needs CuPy and a GPU: "
                    "pip install -e '.[cuda12]'); the GPU tests were not run")
    device = get_backend("cuda")
    enable_tf32(device, False)
    return device


REAL_SIGNAL, REAL_GETSIGNAL = signal.signal, signal.getsignal  # tests may monkeypatch them


@pytest.fixture
def keep_stop_handlers():
    """SIGINT's, SIGTERM's and SIGHUP's handlers as they were before the test, put back after
    it, whatever the test set (with the real signal.signal, which the test may have replaced)."""
    saved = {signum: REAL_GETSIGNAL(signum) for signum in STOP_SIGNALS}
    yield saved
    for signum, handler in saved.items():
        REAL_SIGNAL(signum, handler)


DEADLINE_ENV = "GPUMLP_TESTS_DEADLINE"  # a time.time() past which no further test starts


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """scripts/gpu_check.sh's stop between two tests: once $GPUMLP_TESTS_DEADLINE has passed
    and tests are left, the session stops with its summary (a SIGINT at the section's limit
    would reach a test's `gpumlp` command, which takes it as its own Ctrl-C and fails)."""
    yield
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and nextitem is not None and time.time() > float(deadline):
        item.session.shouldstop = f"{DEADLINE_ENV} passed: stopped between two tests"
