"""MNIST as uint8 arrays on the host: the four IDX files of a folder, checked and reshaped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError
from .idx import read_idx

# split name -> (images file, labels file); the ".gz" form or the raw form is accepted.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = tuple(name for pair in FILES.values() for name in pair)


class Split(NamedTuple):
    images: np.ndarray  # (n, 784) uint8
    labels: np.ndarray  # (n,) uint8, digits 0..9


class Mnist(NamedTuple):
    train: Split
    test: Split


def find_file(folder: Path, stem: str) -> Path:
    """The path of `stem` in `folder`, raw or `.gz`; a DataError naming both when neither exists."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: missing {stem}(.gz); the folder needs the four MNIST files "
                    f"{', '.join(n + '.gz' for n in ALL_FILES)}")


def load_split(folder: Path, split: str) -> Split:
    images_stem, labels_stem = FILES[split]
    images = read_idx(find_file(folder, images_stem))
    labels = read_idx(find_file(folder, labels_stem))
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{folder}: {split} files have shapes {images.shape} and {labels.shape}; "
                        "expected (n, 28, 28) images and (n,) labels")
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{folder}: {split} labels hold {labels.max()}, expected digits 0..9")
    return Split(images.reshape(len(images), 784), labels)


def load_mnist(folder: str | os.PathLike) -> Mnist:
    """Read the train and test splits from the four IDX files in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder; pass --data-dir with the four MNIST files")
    return Mnist(load_split(folder, "train"), load_split(folder, "test"))
