"""Central finite differences in float64 against the hand-written backward pass.

For a parameter entry theta, the numerical gradient is (L(theta + eps) - L(theta - eps)) / 2 eps.
The relative error of an entry is |analytic - numeric| / max(|analytic|, |numeric|, floor):
the floor keeps entries whose gradient is (nearly) zero from dividing by roundoff.

With an activation whose phi has a kink at 0 (Activation.kink: relu, leaky_relu), an entry whose
step theta +- eps moves some kept pre-activation across the kink is no test point: its central
difference averages two slopes and is no derivative. It is found by comparing the signs of the
hidden pre-activations at theta + eps and theta - eps with those at theta; such an entry is
measured again with the smaller steps eps/10, then eps/100, taking the first whose ends keep
every sign (a "rescued" entry). A rounding error of the loss, ~1e-16 |L|, reaches the difference as
~1e-16 |L| / step (3e-11 at eps, which the floor turns into at most ~3e-7 relative): the floor
of a rescued entry grows with eps / step (1e-3 at eps/10, 1e-2 at eps/100), so roundoff weighs
on it no more than on any other entry, and one tolerance holds for all. An entry that straddles
at every step ("straddling") is counted and left out. A parameter left with no entry compared
(checked == 0) has an unknown error, inf, and fails.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .activations import Activation
from .model import Params, backward, dropout_masks, forward, init_params, loss_and_dA2

EPS = 1e-5
SMALLER_STEPS = (EPS / 10, EPS / 100)  # tried in turn where the EPS step straddles a kink
FLOOR = 1e-4  # entries with |gradient| below this are judged by absolute error / 1e-4 (at EPS)
NONZERO = 1e-9  # a numeric gradient above this is no rounding noise (~1e-11 at EPS in float64)


class ParamCheck(NamedTuple):
    name: str            # W1, b1, W2, ...
    shape: tuple
    checked: int         # entries compared
    max_rel_error: float  # inf (and max_abs_error too) when checked == 0: nothing was compared
    max_abs_error: float
    nonzero: int = -1    # of those, entries whose numeric gradient is not ~0 (-1: not counted);
                         # a sample of only zeros (dead units, blank pixels) checks little
    straddling: int = 0  # entries drawn besides `checked` whose step crosses a kink at every
                         # step tried: left out
    rescued: int = 0     # of `checked`, entries measured with a smaller step than EPS


def kink_pattern(cache, masks: tuple):
    """Which kept hidden pre-activations are above the kink at 0, one bool array per layer; a
    dropped unit (mask 0) counts as below, since its kink does not reach the loss."""
    return tuple((A > 0) & (masks[k] != 0) if masks else A > 0
                 for k, A in enumerate(cache.A[:-1]))


def loss_of(params: Params, X, y, act: Activation, masks: tuple = (), smoothing: float = 0.0):
    """The mean cross-entropy L of the net on (X, y), as a Python float, and the forward cache."""
    cache = forward(params, X, act, masks)
    return float(loss_and_dA2(cache.A[-1], y, smoothing)[0]), cache


def largest(errors: np.ndarray) -> float:
    """The largest of the errors (NaN if one is), inf for none."""
    return float(errors.max()) if errors.size else math.inf


def check_gradients(params: Params, X: np.ndarray, y: np.ndarray, act: Activation,
                    masks: tuple = (), smoothing: float = 0.0, samples: int | None = None,
                    rng: np.random.Generator | None = None) -> list[ParamCheck]:
    """Compare backward() with central differences for every parameter of a float64 net.

    `samples` entries per parameter are drawn from `rng` (`drawn_entries`; all entries when
    None; a generator seeded with 0 when `rng` is None, so that the same call checks the same
    entries). Only the
    loss gradients are checked: weight decay and max-norm act in the optimizer step. With a
    kinked activation, drawn entries whose step straddles the kink are measured again with
    SMALLER_STEPS (`rescued`), or, straddling at every step, counted in `straddling` and left
    out of `checked` and the errors. Each entry of `params` is moved in place and put back.
    A ValueError when the net or X is not float64, or a parameter not C-contiguous.
    """
    tensors = {name: t for k in range(len(params.W))
               for name, t in ((f"W{k + 1}", params.W[k]), (f"b{k + 1}", params.b[k]))}
    not_float64 = [name for name, t in {**tensors, "X": X}.items() if t.dtype != np.float64]
    if not_float64:
        raise ValueError("check_gradients needs a float64 net and float64 X (central differences "
                         f"in lower precision are roundoff); not float64: {', '.join(not_float64)}")
    strided = [name for name, t in tensors.items() if not t.flags.c_contiguous]
    if strided:  # reshape(-1) would give a copy, and the check would move nothing
        raise ValueError(f"check_gradients moves entries in place; not C-contiguous: "
                         f"{', '.join(strided)}")
    rng = np.random.default_rng(0) if rng is None else rng
    cache = forward(params, X, act, masks)
    _, dA2 = loss_and_dA2(cache.A[-1], y, smoothing)
    grads = backward(params, cache, dA2, act)
    pattern = kink_pattern(cache, masks) if act.kink else ()

    def central_difference(flat_theta, i, h):
        """(L(theta + h) - L(theta - h)) / 2h at entry i, and whether both ends keep the kink
        pattern at theta (always without a kink)."""
        saved, ends = flat_theta[i], []
        for value in (saved + h, saved - h):
            flat_theta[i] = value
            ends.append(loss_of(params, X, y, act, masks, smoothing))
        flat_theta[i] = saved
        (plus, at_plus), (minus, at_minus) = ends
        kept = not pattern or all(
            np.array_equal(p, q) and np.array_equal(p, r) for p, q, r in
            zip(pattern, kink_pattern(at_plus, masks), kink_pattern(at_minus, masks)))
        return (plus - minus) / (2 * h), kept

    def measure(flat_theta, i):
        """The central difference at entry i with the first step whose ends keep the kink
        pattern, and that step (0 when none does)."""
        for h in (EPS, *SMALLER_STEPS):
            numeric, kept = central_difference(flat_theta, i, h)
            if kept:
                return numeric, h
        return numeric, 0.0

    results = []
    for k in range(len(params.W)):
        for name, theta, analytic in ((f"W{k + 1}", params.W[k], grads.W[k]),
                                      (f"b{k + 1}", params.b[k], grads.b[k])):
            flat_theta = theta.reshape(-1)
            idx = drawn_entries(theta.shape, samples, rng)
            numeric, step = np.array([measure(flat_theta, i) for i in idx]).reshape(-1, 2).T
            results.append(compare(name, theta.shape, analytic.reshape(-1)[idx], numeric, step))
    return results


def drawn_entries(shape: tuple, samples: int | None, rng: np.random.Generator) -> np.ndarray:
    """The flat indices of a parameter's entries to check, sorted: all of them when `samples`
    is None or covers them; else `samples` drawn at random with at least one in each column,
    that is for each unit the parameter feeds (more than `samples` where there are more
    columns; every entry of a bias). A gradient wrong for one unit cannot slip through."""
    n = math.prod(shape)
    if samples is None or samples >= n or len(shape) == 1:
        return np.arange(n)
    rows, cols = shape
    one_per_column = rng.integers(0, rows, cols) * cols + np.arange(cols)
    rest = np.setdiff1d(np.arange(n), one_per_column)
    more = rng.choice(rest, max(samples - cols, 0), replace=False)
    return np.sort(np.concatenate([one_per_column, more]))


def compare(name: str, shape: tuple, analytic: np.ndarray, numeric: np.ndarray,
            step: np.ndarray) -> ParamCheck:
    """The check of one parameter from its entries' analytic and numeric gradients and the
    step each was measured with (0: left out, straddling the kink at every step)."""
    valid = step > 0
    scale = EPS / np.where(valid, step, EPS)  # 1, 10 or 100: roundoff grows as 1 / step
    abs_err = np.abs(analytic - numeric)
    rel = abs_err / np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), FLOOR * scale)
    counted = valid | np.isnan(rel)  # a NaN gradient fails wherever it is
    return ParamCheck(name=name, shape=shape, checked=int(valid.sum()),
                      max_rel_error=largest(rel[counted]), max_abs_error=largest(abs_err[counted]),
                      nonzero=int((np.abs(numeric) > NONZERO * scale)[valid].sum()),
                      straddling=int((~valid).sum()), rescued=int((valid & (step < EPS)).sum()))


def worst_error(results: list[ParamCheck]) -> float:
    """The largest relative error of all the checks, NaN if any is NaN: a NaN gradient (or a
    NaN numeric one) fails every tolerance, where max() would step over it; else inf if a
    parameter had no entry compared (checked == 0), whose error is unknown."""
    errors = [r.max_rel_error for r in results]
    if any(math.isnan(e) for e in errors):
        return math.nan
    return max(e if r.checked else math.inf for e, r in zip(errors, results))


def all_zero(r: ParamCheck) -> bool:
    """Every entry of the parameter was drawn and each compared one has a zero gradient on
    this batch (dead units, zero inputs): a wrong backward that keeps zeros zero (a factor
    1/m) passes there, so the check says nothing about it, and more samples cannot help."""
    return r.checked > 0 and r.nonzero == 0 and r.checked + r.straddling == math.prod(r.shape)


def passes(results: list[ParamCheck], tolerance: float) -> bool:
    """Every relative error at most `tolerance`, every parameter with an entry compared and
    none all zero (`all_zero`); False for NaN."""
    return (worst_error(results) <= tolerance and all(r.checked for r in results)
            and not any(all_zero(r) for r in results))


def gradcheck_config(widths: tuple[int, ...], act: Activation, init: str, seed: int = 0,
                     m: int = 8, dropout: float = 0.0, smoothing: float = 0.0,
                     samples: int | None = 20) -> list[ParamCheck]:
    """Check a float64 net of the given widths on a random minibatch of m examples: `init`'s
    weights, biases drawn from N(0, 0.1) (zero biases would check db less), inputs uniform
    in [0, 1), and dropout masks of probability `dropout`, all from one generator of `seed`."""
    rng = np.random.default_rng(seed)
    params = init_params(widths, init, rng, "float64")
    params = Params(params.W, tuple(rng.normal(0, 0.1, v.shape) for v in params.b))
    X = rng.random((m, widths[0]))                                   # (m, d) in [0, 1)
    y = rng.integers(0, widths[-1], size=m)                          # (m,)
    masks = dropout_masks(rng, m, widths[1:-1], dropout, np.dtype("float64"))
    return check_gradients(params, X, y, act, masks, smoothing, samples, rng)
