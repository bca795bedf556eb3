"""The activation phi of the seed and its derivative phi', side by side.

Each entry maps A (the pre-activation) to Z = phi(A), and A to phi'(A). They work on
NumPy and CuPy arrays alike and keep the input's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from .backend import array_module

LEAKY_SLOPE = 0.01
GELU_K = math.sqrt(2.0 / math.pi)  # GELU, tanh approximation (Hendrycks & Gimpel 2016)
GELU_C = 0.044715


class Activation(NamedTuple):
    phi: Callable[[Any], Any]        # A -> Z
    phi_prime: Callable[[Any], Any]  # A -> dZ/dA, elementwise
    kink: bool = False               # piecewise linear with a kink at 0 (phi' jumps there)


def relu(A):
    return array_module(A).maximum(A, 0)


def relu_prime(A):
    return (A > 0).astype(A.dtype)


def leaky_relu(A):
    return array_module(A).where(A > 0, A, A * LEAKY_SLOPE)


def leaky_relu_prime(A):
    xp = array_module(A)
    return xp.where(A > 0, xp.ones_like(A), xp.full_like(A, LEAKY_SLOPE))


# The logistic function and its kin are written with exponents <= 0 only, which never overflow,
# so that they keep float32's relative precision everywhere: sigma(x) = e^min(x, 0) / (1 + E) and
# sigma'(x) = E / (1 + E)^2 with E = e^-|x|. The old forms cancelled: 1 + tanh(x/2) gave 0 below
# x = -17 and lost digits from x = -4, as 1 - tanh^2 x did from |x| = 4. (The numerator's second
# exp is cheaper than NumPy's `where`, which takes ten times as long on a random sign pattern.)

def _exp_minus_abs(x):
    xp = array_module(x)
    return xp.exp(-xp.abs(x))                              # E = e^-|x| in [0, 1]


def _logistic(x, E):
    xp = array_module(x)
    return xp.exp(xp.minimum(x, 0)) / (1 + E)              # 1 / (1 + e^-x)


def sigmoid(A):
    return _logistic(A, _exp_minus_abs(A))


def sigmoid_prime(A):
    E = _exp_minus_abs(A)
    return E / (1 + E) ** 2                                # = s (1 - s)


def tanh(A):
    return array_module(A).tanh(A)


def tanh_prime(A):
    xp = array_module(A)                                   # E = e^-2|A|, |A| capped: 2 A overflows
    E = xp.exp(-2 * xp.minimum(xp.abs(A), 1e4))            # past 1.7e38 (squaring e^-|A| cost ulps)
    return 4 * E / (1 + E) ** 2                            # = 1 - tanh^2 A


def _gelu_2u(A):
    return 2 * GELU_K * (A + GELU_C * (A * A * A))         # 2u; A ** 3 is 400 times slower


def gelu(A):
    U2 = _gelu_2u(A)
    return A * _logistic(U2, _exp_minus_abs(U2))           # = A (1 + tanh u) / 2 = A sigma(2u)


def gelu_prime(A):
    # = (1 + t)/2 + A (1 - t^2) u' / 2 with t = tanh u and u' = K (1 + 3 C A^2), i.e.
    # sigma(2u) + 2 K A (1 + 3 C A^2) sigma'(2u); A E is taken first, so that E = 0 (|A| past
    # 10) gives 0 where 2 K A or A^2 alone would overflow to inf (and inf * 0 to NaN).
    U2 = _gelu_2u(A)
    E = _exp_minus_abs(U2)
    AE = A * E
    return _logistic(U2, E) + 2 * GELU_K * (AE + 3 * GELU_C * A * (A * AE)) / (1 + E) ** 2


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(relu, relu_prime, kink=True),
    "leaky_relu": Activation(leaky_relu, leaky_relu_prime, kink=True),
    "sigmoid": Activation(sigmoid, sigmoid_prime),
    "tanh": Activation(tanh, tanh_prime),
    "gelu": Activation(gelu, gelu_prime),
}
