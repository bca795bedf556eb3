"""The dataset on the device: uint8 images, integer labels, a validation split, and the
per-batch conversion to the float inputs X of the seed."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .backend import Backend, array_module
from .config import DataConfig
from .errors import ConfigError
from .mnist import Mnist

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of x/255 over the training images


class DeviceSplit(NamedTuple):
    images: Any  # (n, 784) uint8, on the device
    labels: Any  # (n,) int32, on the device

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class DeviceData(NamedTuple):
    train: DeviceSplit
    val: DeviceSplit | None
    test: DeviceSplit


def device_split(images: np.ndarray, labels: np.ndarray, backend: Backend) -> DeviceSplit:
    """Host images (n, 784) uint8 and labels (n,) on the device: contiguous, labels int32."""
    return DeviceSplit(backend.asarray(np.ascontiguousarray(images)),
                       backend.asarray(labels.astype(np.int32)))


def prepare_data(mnist: Mnist, cfg: DataConfig, backend: Backend,
                 new: bool = True) -> DeviceData:
    """Limit the training set, hold out its last `val_size` rows, and move it all to the device.
    A limit above the training set's size is refused for a `new` run; a resumed run made before
    that rule goes on with all of the set, as it trained."""
    images, labels = mnist.train
    if cfg.limit is not None:
        if cfg.limit > len(labels) and new:  # would train on fewer than config.yaml records
            raise ConfigError(f"config key 'data.limit' is {cfg.limit:,} but MNIST has "
                              f"{len(labels):,} training images; lower it, or null for all")
        images, labels = images[:cfg.limit], labels[:cfg.limit]
    if cfg.val_size >= len(labels):
        raise ConfigError(f"config key 'data.val_size' is {cfg.val_size} but only {len(labels)} "
                          "training examples are available; lower it")
    cut = len(labels) - cfg.val_size
    val = device_split(images[cut:], labels[cut:], backend) if cfg.val_size else None
    return DeviceData(device_split(images[:cut], labels[:cut], backend), val,
                      device_split(*mnist.test, backend))


def to_inputs(images: Any, normalize: str, dtype: str, augment: Any = None, rng: Any = None) -> Any:
    """X (m, 784) in `dtype` from uint8 pixels: x/255, augmented and standardised if asked.

    `augment(X, rng)`, when given, distorts the images while they are still in [0, 1].
    """
    X = images.astype(dtype)
    X *= 1.0 / 255.0
    if augment is not None:
        X = augment(X, rng)
    return standardize(X, normalize)


def standardize(X: Any, normalize: str) -> Any:
    """X (inputs x/255) standardised in place, (X - mean) / std, when `normalize` asks for it."""
    if normalize == "standard":
        X -= MNIST_MEAN
        X *= 1.0 / MNIST_STD
    return X


def permutation(rng: np.random.Generator, n: int, shuffle: bool) -> np.ndarray:
    """The order of one epoch's examples, drawn on the host from the run's generator."""
    return rng.permutation(n) if shuffle else np.arange(n)


def batch_slices(n: int, m: int) -> list[slice]:
    """Consecutive slices of size m covering 0..n; the last one may be shorter."""
    return [slice(i, min(i + m, n)) for i in range(0, n, m)]


def gather(split: DeviceSplit, idx: Any) -> tuple[Any, Any]:
    """(uint8 images, labels) of the rows `idx` of a split, on its device."""
    xp = array_module(split.images)
    return xp.take(split.images, idx, axis=0), xp.take(split.labels, idx, axis=0)
