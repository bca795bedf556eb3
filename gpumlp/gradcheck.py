"""Central finite differences in float64 against the hand-written backward pass.

For a parameter entry theta, the numerical gradient is (L(theta + eps) - L(theta - eps)) / 2 eps.
The relative error of an entry is |analytic - numeric| / max(|analytic|, |numeric|, floor):
the floor keeps entries whose gradient is (nearly) zero from dividing by roundoff.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .activations import Activation
from .model import Params, backward, dropout_masks, forward, init_params, loss_and_dA2

EPS = 1e-5
FLOOR = 1e-4  # entries with |gradient| below this are judged by absolute error / 1e-4
NONZERO = 1e-9  # a numeric gradient above this is no rounding noise (~1e-11 at EPS in float64)


class ParamCheck(NamedTuple):
    name: str            # W1, b1, W2, ...
    shape: tuple
    checked: int         # entries compared
    max_rel_error: float
    max_abs_error: float
    nonzero: int = -1    # of those, entries whose numeric gradient is not ~0 (-1: not counted);
                         # a sample of only zeros (dead units, blank pixels) checks little


def loss_of(params: Params, X, y, act: Activation, masks: tuple = (),
            smoothing: float = 0.0) -> float:
    """The mean cross-entropy L of the net on (X, y), as a Python float."""
    return float(loss_and_dA2(forward(params, X, act, masks).A[-1], y, smoothing)[0])


def check_gradients(params: Params, X: np.ndarray, y: np.ndarray, act: Activation,
                    masks: tuple = (), smoothing: float = 0.0, samples: int | None = None,
                    rng: np.random.Generator | None = None) -> list[ParamCheck]:
    """Compare backward() with central differences for every parameter of a float64 net.

    `samples` entries per parameter are drawn from `rng` (all entries when None; a fresh
    generator when `rng` is None). Only the loss gradients are checked: weight decay and
    max-norm act in the optimizer step. A ValueError when the net or X is not float64.
    """
    tensors = {name: t for k in range(len(params.W))
               for name, t in ((f"W{k + 1}", params.W[k]), (f"b{k + 1}", params.b[k]))}
    not_float64 = [name for name, t in {**tensors, "X": X}.items() if t.dtype != np.float64]
    if not_float64:
        raise ValueError("check_gradients needs a float64 net and float64 X (central differences "
                         f"in lower precision are roundoff); not float64: {', '.join(not_float64)}")
    rng = np.random.default_rng() if rng is None else rng
    cache = forward(params, X, act, masks)
    _, dA2 = loss_and_dA2(cache.A[-1], y, smoothing)
    grads = backward(params, cache, dA2, act)
    results = []
    for k in range(len(params.W)):
        for name, theta, analytic in ((f"W{k + 1}", params.W[k], grads.W[k]),
                                      (f"b{k + 1}", params.b[k], grads.b[k])):
            flat_theta, flat_grad = theta.reshape(-1), analytic.reshape(-1)
            n = flat_theta.size
            every = samples is None or samples >= n
            idx = np.arange(n) if every else rng.choice(n, samples, replace=False)
            numeric = np.empty(len(idx))
            for j, i in enumerate(idx):
                saved = flat_theta[i]
                flat_theta[i] = saved + EPS
                plus = loss_of(params, X, y, act, masks, smoothing)
                flat_theta[i] = saved - EPS
                minus = loss_of(params, X, y, act, masks, smoothing)
                flat_theta[i] = saved
                numeric[j] = (plus - minus) / (2 * EPS)
            a = flat_grad[idx]
            abs_err = np.abs(a - numeric)
            rel = abs_err / np.maximum(np.maximum(np.abs(a), np.abs(numeric)), FLOOR)
            results.append(ParamCheck(name, theta.shape, len(idx), float(rel.max()),
                                      float(abs_err.max()), int((np.abs(numeric) > NONZERO).sum())))
    return results


def worst_error(results: list[ParamCheck]) -> float:
    """The largest relative error of all the checks, NaN if any is NaN: a NaN gradient (or a
    NaN numeric one) fails every tolerance, where max() would step over it."""
    errors = [r.max_rel_error for r in results]
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def passes(results: list[ParamCheck], tolerance: float) -> bool:
    """Every relative error at most `tolerance` (False for NaN)."""
    return worst_error(results) <= tolerance


def gradcheck_config(widths: tuple[int, ...], act: Activation, init: str, seed: int = 0,
                     m: int = 8, dropout: float = 0.0, smoothing: float = 0.0,
                     samples: int | None = 20) -> list[ParamCheck]:
    """Check a float64 net of the given widths on a random minibatch of m examples."""
    rng = np.random.default_rng(seed)
    params = init_params(widths, init, rng, "float64")
    params = Params(params.W, tuple(rng.normal(0, 0.1, v.shape) for v in params.b))
    X = rng.random((m, widths[0]))                                   # (m, d) in [0, 1)
    y = rng.integers(0, widths[-1], size=m)                          # (m,)
    masks = dropout_masks(rng, m, widths[1:-1], dropout, np.dtype("float64"))
    return check_gradients(params, X, y, act, masks, smoothing, samples, rng)
