"""float64 values of the smooth activations and their derivatives, written with `math`
independently of gpumlp.activations, and the error bound float32 must meet against them."""

from __future__ import annotations

import math

import numpy as np

K, C = math.sqrt(2 / math.pi), 0.044715    # GELU's tanh approximation
ULP = float(np.finfo(np.float32).eps)       # 2^-23
GRID = np.linspace(-40, 40, 8001).astype(np.float32)   # float32 points, both tails included


def sigma(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def sigma_prime(x):
    e = math.exp(-abs(x))
    return e / (1 + e) ** 2


def two_u(a):
    return 2 * K * (a + C * a ** 3)


# name -> (phi's terms, phi''s terms): the float64 value is the sum of the terms, and float32's
# error is judged against the sum of their sizes (gelu' is a difference that has a root).
TERMS = {
    "sigmoid": (lambda a: [sigma(a)], lambda a: [sigma_prime(a)]),
    "tanh": (lambda a: [math.tanh(a)], lambda a: [4 * sigma_prime(2 * a)]),
    "gelu": (lambda a: [a * sigma(two_u(a))],
             lambda a: [sigma(two_u(a)), 2 * K * a * (1 + 3 * C * a * a) * sigma_prime(two_u(a))]),
}


def float32_error(name: str, which: str, got: np.ndarray, A: np.ndarray = GRID) -> np.ndarray:
    """|got - exact| in units of ULP * size * condition, at points whose size is a normal
    float32 (NaN elsewhere). gelu's condition is 1 + |2u|: an ulp of u moves e^-|2u| by |2u| ulps,
    as it would in any float32 formula."""
    terms = np.array([TERMS[name][which == "phi_prime"](float(a)) for a in A])
    exact, size = terms.sum(axis=1), np.abs(terms).sum(axis=1)
    condition = 1 + np.abs([two_u(float(a)) for a in A]) if name == "gelu" else 1.0
    normal = size >= np.finfo(np.float32).tiny
    error = np.full(len(A), np.nan)
    bound = ULP * size * condition
    error[normal] = np.abs(np.asarray(got, dtype=np.float64) - exact)[normal] / bound[normal]
    return error
