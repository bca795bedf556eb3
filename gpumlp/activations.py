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


def sigmoid(A):
    return 0.5 * (1 + array_module(A).tanh(0.5 * A))  # = 1/(1+e^-A), without overflow


def sigmoid_prime(A):
    S = sigmoid(A)
    return S * (1 - S)


def tanh(A):
    return array_module(A).tanh(A)


def tanh_prime(A):
    T = array_module(A).tanh(A)
    return 1 - T * T


def gelu(A):
    T = array_module(A).tanh(GELU_K * (A + GELU_C * A ** 3))
    return 0.5 * A * (1 + T)


def gelu_prime(A):
    T = array_module(A).tanh(GELU_K * (A + GELU_C * A ** 3))
    return 0.5 * (1 + T) + 0.5 * A * (1 - T * T) * GELU_K * (1 + 3 * GELU_C * A * A)


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(relu, relu_prime, kink=True),
    "leaky_relu": Activation(leaky_relu, leaky_relu_prime, kink=True),
    "sigmoid": Activation(sigmoid, sigmoid_prime),
    "tanh": Activation(tanh, tanh_prime),
    "gelu": Activation(gelu, gelu_prime),
}
