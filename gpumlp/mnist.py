"""MNIST as uint8 arrays on the host: the four IDX files of a folder, checked and reshaped."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .errors import DataError, folder_stat, shown
from .idx import parse_idx, read_bytes

D, C = 784, 10  # input pixels (28 x 28) and classes of MNIST: the model's d and c

# split name -> (images file, labels file); the ".gz" form or the raw form is accepted.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = tuple(name for pair in FILES.values() for name in pair)
# what a folder holding none of ALL_FILES lacks (after "FOLDER: "): the names it needs, since
# the files are often saved under others (Kaggle's train-images.idx3-ubyte)
NONE_THERE = (f"none of the four MNIST files is there ({', '.join(ALL_FILES)}, each raw or "
              ".gz); put them there under those names")


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


class NoMnistFiles(DataError):
    """A folder that holds none of the four MNIST files (NONE_THERE), rather than some wrong
    or missing ones: a wrong folder, most likely."""


class FilesMissing(DataError):
    """Files a folder lacks (each "missing"), none of them there but damaged."""


def holds_none(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds none of the four MNIST files, raw or `.gz` (none is read)."""
    return not any((Path(folder) / name).is_file() for stem in ALL_FILES
                   for name in (stem, f"{stem}.gz"))


def stray_folder(folder: Path, stem: str) -> str | None:
    """The name of a folder standing where `stem` (raw or .gz) belongs in `folder`, when
    neither name is a file; None otherwise."""
    names = (stem, f"{stem}.gz")
    if any((folder / name).is_file() for name in names):
        return None
    return next((name for name in names if (folder / name).is_dir()), None)


def not_a_file(folder: Path, stem: str) -> str | None:
    """What stands where `stem` (raw or .gz) belongs in `folder` when neither name is a file:
    a folder, a link that leads to no file, a pipe or a device; None when one is a file or
    nothing is there."""
    names = (stem, f"{stem}.gz")
    try:
        if any((folder / name).is_file() for name in names):
            return None
        for name in names:
            path = folder / name
            if path.is_symlink() and not path.exists():
                target = shown(os.readlink(path), 200)
                return f"{name} is a link to {target}, which leads to no file"
            if path.is_dir():
                return f"{name} is a folder, not the file"
            if path.exists():
                return f"{name} is not a regular file (a pipe, a socket or a device)"
    except OSError:  # unreadable: said when the file is read
        return None
    return None


Check = Callable[[str, bytes], "str | None"]  # (stem, decompressed bytes) -> problem or None


def read_checked(folder: Path, stem: str,
                 check: Check) -> tuple[Path | None, bytes | None, str | None]:
    """(path, decompressed bytes, None) when `stem` in `folder` passes `check`; otherwise
    (path or None, None, the problem: "missing", why it cannot be read, or what `check` says)."""
    try:
        path = find_file(folder, stem)
    except DataError:
        stray = not_a_file(folder, stem)
        return None, None, "missing" if stray is None else stray
    try:
        raw = read_bytes(path)  # a file too large to be MNIST is not read
        problem = check(stem, raw)
    except DataError as e:
        problem, raw = str(e).removeprefix(f"{path}: "), None
    if problem is None:
        return path, raw, None
    gz = path.with_name(f"{path.name}.gz")
    if path.suffix != ".gz" and gz.is_file():  # find_file takes the raw file first
        problem += f" ({gz.name} beside it is not read while {path.name} is there)"
    return path, None, problem


def read_files(folder: Path, check: Check | None,
               stems: tuple[str, ...] = ALL_FILES) -> dict[str, np.ndarray]:
    """stem -> array of each file of `stems` (default: the four), each read once.

    With `check`, every file's bytes must pass it, and one DataError lists every file that
    does not (missing, unreadable or rejected); without it, the first bad file raises.
    """
    arrays, problems, absent = {}, [], 0
    for stem in stems:
        if check is None:
            path = find_file(folder, stem)
            raw = read_bytes(path)
        else:
            path, raw, problem = read_checked(folder, stem, check)
            if problem is not None:
                problems.append(f"{stem}: {problem}")
                absent += problem == "missing"
                continue
        arrays[stem] = parse_idx(raw, name=str(path))
    if problems:
        kind = FilesMissing if absent == len(problems) else DataError
        raise kind(f"{folder}: {'; '.join(problems)}")
    return arrays


def make_split(folder: Path, split: str, arrays: dict[str, np.ndarray]) -> Split:
    images_stem, labels_stem = FILES[split]
    images, labels = arrays[images_stem], arrays[labels_stem]
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{folder}: {split} files have shapes {images.shape} and {labels.shape}; "
                        "expected (n, 28, 28) images and (n,) labels")
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{folder}: {split} labels hold {labels.max()}, expected digits 0..9")
    return Split(images.reshape(len(images), D), labels)


def data_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a Path, once it is known to be a folder holding at least one MNIST file."""
    folder = Path(folder)
    info, refused = folder_stat(folder)  # Path.is_dir() would raise PermissionError
    if refused is not None:
        raise DataError(f"{folder}: {refused}")
    if info is None or not stat.S_ISDIR(info.st_mode):
        raise DataError(f"{folder}: no such data folder; pass --data-dir with the four MNIST files")
    if holds_none(folder):  # one line, not four missing files
        raise NoMnistFiles(f"{folder}: {NONE_THERE}")
    return folder


def load_mnist(folder: str | os.PathLike, check: Check | None = None) -> Mnist:
    """Read the train and test splits from the four IDX files in `folder`.

    `check(stem, raw)` (e.g. a checksum) vets each file's bytes as they are read.
    """
    folder = data_folder(folder)
    arrays = read_files(folder, check)
    return Mnist(make_split(folder, "train", arrays), make_split(folder, "test", arrays))


def load_split(folder: str | os.PathLike, split: str, check: Check | None = None) -> Split:
    """Read one split ("train" or "test") from its two IDX files in `folder`, as `load_mnist`
    does; the other split's files are neither needed nor read."""
    folder = data_folder(folder)
    return make_split(folder, split, read_files(folder, check, FILES[split]))


def load_for(folder: str | os.PathLike, split: str | None, check: Check | None = None):
    """`load_mnist` (an Mnist) for `split` None, else `load_split` (that Split alone)."""
    return load_mnist(folder, check) if split is None else load_split(folder, split, check)
