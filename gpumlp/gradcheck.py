"""Central finite differences in float64 against the hand-written backward pass.

For a parameter entry theta, the numerical gradient is (L(theta + eps) - L(theta - eps)) / 2 eps.
The relative error of an entry is |analytic - numeric| / max(|analytic|, |numeric|, floor):
the floor keeps entries whose gradient is (nearly) zero from dividing by roundoff.

With a piecewise-linear activation (relu, leaky_relu), an entry whose step theta +- eps moves
some kept pre-activation across the kink at 0 is no test point: its central difference averages
two slopes and is no derivative. Such entries ("straddling" ones) are found by comparing the
signs of the hidden pre-activations at theta + eps and theta - eps with those at theta, counted,
and left out of the errors; every other entry is compared as usual.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import activations
from .activations import Activation
from .model import Params, backward, dropout_masks, forward, init_params, loss_and_dA2

EPS = 1e-5
FLOOR = 1e-4  # entries with |gradient| below this are judged by absolute error / 1e-4
NONZERO = 1e-9  # a numeric gradient above this is no rounding noise (~1e-11 at EPS in float64)
KINKED = (activations.relu, activations.leaky_relu)  # phi piecewise linear, with a kink at 0


class ParamCheck(NamedTuple):
    name: str            # W1, b1, W2, ...
    shape: tuple
    checked: int         # entries compared
    max_rel_error: float
    max_abs_error: float
    nonzero: int = -1    # of those, entries whose numeric gradient is not ~0 (-1: not counted);
                         # a sample of only zeros (dead units, blank pixels) checks little
    straddling: int = 0  # entries drawn besides `checked` whose step crosses a kink: left out


def kink_pattern(cache, masks: tuple):
    """Which kept hidden pre-activations are above the kink at 0, one bool array per layer; a
    dropped unit (mask 0) counts as below, since its kink does not reach the loss."""
    return tuple((A > 0) & (masks[k] != 0) if masks else A > 0
                 for k, A in enumerate(cache.A[:-1]))


def loss_of(params: Params, X, y, act: Activation, masks: tuple = (), smoothing: float = 0.0,
            kinked: bool = False) -> tuple[float, tuple]:
    """The mean cross-entropy L of the net on (X, y), as a Python float, and the kink_pattern of
    the same forward pass when `kinked` (else ())."""
    cache = forward(params, X, act, masks)
    loss = float(loss_and_dA2(cache.A[-1], y, smoothing)[0])
    return loss, kink_pattern(cache, masks) if kinked else ()


def check_gradients(params: Params, X: np.ndarray, y: np.ndarray, act: Activation,
                    masks: tuple = (), smoothing: float = 0.0, samples: int | None = None,
                    rng: np.random.Generator | None = None) -> list[ParamCheck]:
    """Compare backward() with central differences for every parameter of a float64 net.

    `samples` entries per parameter are drawn from `rng` (all entries when None; a fresh
    generator when `rng` is None). Only the loss gradients are checked: weight decay and
    max-norm act in the optimizer step. With relu or leaky_relu, drawn entries whose step
    straddles the kink are counted in `straddling` and left out of `checked` and the errors.
    A ValueError when the net or X is not float64.
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
    kinked = act.phi in KINKED
    pattern = kink_pattern(cache, masks) if kinked else ()
    results = []
    for k in range(len(params.W)):
        for name, theta, analytic in ((f"W{k + 1}", params.W[k], grads.W[k]),
                                      (f"b{k + 1}", params.b[k], grads.b[k])):
            flat_theta, flat_grad = theta.reshape(-1), analytic.reshape(-1)
            n = flat_theta.size
            every = samples is None or samples >= n
            idx = np.arange(n) if every else rng.choice(n, samples, replace=False)
            numeric = np.empty(len(idx))
            valid = np.ones(len(idx), dtype=bool)  # False: the step straddles a kink
            for j, i in enumerate(idx):
                saved = flat_theta[i]
                flat_theta[i] = saved + EPS
                plus, at_plus = loss_of(params, X, y, act, masks, smoothing, kinked)
                flat_theta[i] = saved - EPS
                minus, at_minus = loss_of(params, X, y, act, masks, smoothing, kinked)
                flat_theta[i] = saved
                numeric[j] = (plus - minus) / (2 * EPS)
                valid[j] = all(np.array_equal(p, q) and np.array_equal(p, r)
                               for p, q, r in zip(pattern, at_plus, at_minus))
            a = flat_grad[idx]
            abs_err = np.abs(a - numeric)
            rel = abs_err / np.maximum(np.maximum(np.abs(a), np.abs(numeric)), FLOOR)
            left_out = ~valid & ~np.isnan(rel)  # a NaN gradient fails wherever it is
            abs_err[left_out] = rel[left_out] = 0.0
            results.append(ParamCheck(name, theta.shape, int(valid.sum()), float(rel.max()),
                                      float(abs_err.max()),
                                      int((np.abs(numeric[valid]) > NONZERO).sum()),
                                      int((~valid).sum())))
    return results


def straddling(results: list[ParamCheck]) -> int:
    """How many drawn entries were left out because their step straddles a kink."""
    return sum(r.straddling for r in results)


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
