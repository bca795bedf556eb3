"""Class probabilities of a trained model for image files, one result per file.

Each file is read and laid out as MNIST lays out its digits (`preprocess.load_digit`);
the files that can be read go through the network together, on the device, in batches.
A file that cannot be read gets its error message in its result and does not stop the
others.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np

from .activations import ACTIVATIONS
from .backend import Backend, to_host
from .config import Config
from .data import batch_slices, to_inputs
from .errors import CheckpointError, one_line_message
from .mnist import C, D
from .model import Params, forward, softmax
from .preprocess import ImageError, load_digit

TOO_LARGE = ("its weights are finite but too large to use: the network's outputs are NaN or "
             "infinite; train it again with a lower optim.lr")


class FileResult(NamedTuple):
    path: str
    probabilities: np.ndarray | None  # (c,) on the host, or None when the file failed
    error: str | None                 # one line naming the file, or None
    logits: np.ndarray | None = None  # (c,) A2, which ranks the classes as evaluate does

    def top(self, k: int) -> list[tuple[int, float]]:
        """The k most probable classes with their probabilities, most probable first, ranked
        by the logits where given (float32 probabilities can tie where the logits do not)."""
        rank = self.logits if self.logits is not None else self.probabilities
        order = np.argsort(-rank, kind="stable")[:k]
        return [(int(c), float(self.probabilities[c])) for c in order]


def outputs(params: Params, config: Config, pixels: np.ndarray, backend: Backend,
            source: str = "the model") -> tuple[np.ndarray, np.ndarray]:
    """(A2, Z2), the logits and their softmax, each (n, c) on the host, for pixels (n, 784) in
    [0, 255], scaled as in training; a CheckpointError naming `source` (the model file) when
    any of them is NaN or infinite. `params` live on the backend's device (`model.params_on`).
    """
    act = ACTIVATIONS[config.model.activation]
    logits, probs = [], []
    with np.errstate(over="ignore", invalid="ignore"):  # the check below says it in one line
        for sl in batch_slices(len(pixels), config.train.eval_batch_size):
            X = to_inputs(backend.asarray(pixels[sl]), config.data.normalize, config.train.dtype)
            A2 = forward(params, X, act).A[-1]                              # (m, c)
            logits.append(to_host(A2))
            probs.append(to_host(softmax(A2)))
    empty = np.zeros((0, C), dtype=config.train.dtype)
    A2, Z2 = (np.concatenate(parts) if parts else empty for parts in (logits, probs))
    if not (np.isfinite(A2).all() and np.isfinite(Z2).all()):
        raise CheckpointError(f"{source}: {TOO_LARGE}")
    return A2, Z2


def probabilities(params: Params, config: Config, pixels: np.ndarray, backend: Backend,
                  source: str = "the model") -> np.ndarray:
    """Z2 (n, c) on the host, as `outputs` gives it."""
    return outputs(params, config, pixels, backend, source)[1]


def predict_files(params: Params, config: Config, paths: Sequence[str | os.PathLike],
                  backend: Backend, source: str = "the model") -> list[FileResult]:
    """One FileResult per path, in order; unreadable files carry their error instead.
    `source` names the model in the error for weights too large to use."""
    digits, errors = {}, {}
    for i, path in enumerate(paths):
        try:
            digits[i] = load_digit(path).reshape(-1)                   # (784,)
        except ImageError as e:
            errors[i] = one_line_message(e)                           # a line break as \n
    pixels = np.stack(list(digits.values())) if digits else np.zeros((0, D), np.float32)
    logits_of, probabilities_of = (dict(zip(digits, rows)) for rows in  # path index -> (c,)
                                   outputs(params, config, pixels, backend, source))
    return [FileResult(str(path), probabilities_of.get(i), errors.get(i), logits_of.get(i))
            for i, path in enumerate(paths)]
