"""The MLP of the seed: forward, loss and backward, written as the derivation writes them.

Notation (the seed's; A is before the nonlinearity, Z after). Row-major: one example per row.
Shape letters: m = minibatch size, d = 784 inputs, h = hidden width, c = 10 classes.

    A1 = X @ W1 + b1          (m, h)   hidden pre-activation
    Z1 = phi(A1)              (m, h)   hidden activation
    A2 = Z1 @ W2 + b2         (m, c)   logits
    Z2 = softmax(A2)          (m, c)   predicted probabilities
    L  = -mean(log Z2[i, y_i])  ()     mean cross-entropy, computed from log-sum-exp of A2

Backward, in the order of the code (each gradient has its tensor's shape):

    dA2 = (Z2 - Y) / m        (m, c)   softmax and cross-entropy fused
    dW2 = Z1.T @ dA2          (h, c)
    db2 = dA2.sum(axis=0)     (c,)
    dZ1 = dA2 @ W2.T          (m, h)
    dA1 = dZ1 * phi'(A1)      (m, h)   the seed has an extra 1/m here (erratum)
    dW1 = X.T @ dA1           (d, h)   and another extra 1/m here (erratum)
    db1 = dA1.sum(axis=0)     (h,)

Deeper nets follow by induction, with Z0 = X: dZ_k = dA_{k+1} @ W_{k+1}.T,
dA_k = dZ_k * phi'(A_k), dW_k = Z_{k-1}.T @ dA_k. Layer k is stored at index k - 1 of
the tuples below. Labels count from 0 (the seed counts classes from 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .activations import Activation
from .backend import array_module

Array = Any  # a numpy.ndarray or a cupy.ndarray


class Params(NamedTuple):
    W: tuple[Array, ...]  # W[k-1] = W_k, shape (fan_in, fan_out)
    b: tuple[Array, ...]  # b[k-1] = b_k, shape (fan_out,)


def params_on(backend: Any, params: Params) -> Params:
    """The host parameters on the backend's device (copies on a GPU; the arrays themselves on
    the CPU)."""
    return Params(tuple(map(backend.asarray, params.W)), tuple(map(backend.asarray, params.b)))


class Grads(NamedTuple):
    W: tuple[Array, ...]  # dW_k, same shapes as Params.W
    b: tuple[Array, ...]  # db_k, same shapes as Params.b


class Cache(NamedTuple):
    Z: tuple[Array, ...]     # (X, Z1, ..., Z_{L-1}): the input of each layer, after dropout
    A: tuple[Array, ...]     # (A1, ..., A_L): pre-activations; A_L are the logits
    masks: tuple[Array, ...]  # inverted-dropout masks of the hidden layers, or ()


def init_params(widths: tuple[int, ...], init: str, rng: np.random.Generator,
                dtype: str = "float32") -> Params:
    """Weights drawn on the host from `rng` (He or Xavier), biases zero.

    `widths` is (d, h1, ..., c). Drawing on the host makes CPU and GPU runs start alike.
    """
    W, b = [], []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        if init == "he":  # He et al. 2015: Var = 2 / fan_in, for relu-like phi
            Wk = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
        else:  # Glorot & Bengio 2010: U(-r, r), r = sqrt(6 / (fan_in + fan_out))
            r = np.sqrt(6.0 / (fan_in + fan_out))
            Wk = rng.uniform(-r, r, size=(fan_in, fan_out))
        W.append(Wk.astype(dtype))
        b.append(np.zeros(fan_out, dtype=dtype))
    return Params(tuple(W), tuple(b))


def forward(params: Params, X: Array, act: Activation, masks: tuple = ()) -> Cache:
    """A_k = Z_{k-1} @ W_k + b_k, Z_k = phi(A_k) (times the dropout mask) for every layer."""
    Z, A = [X], []
    last = len(params.W) - 1
    for k, (Wk, bk) in enumerate(zip(params.W, params.b)):
        Ak = Z[-1] @ Wk + bk          # (m, fan_out)
        A.append(Ak)
        if k < last:
            Zk = act.phi(Ak)          # (m, h_k)
            if masks:
                Zk = Zk * masks[k]    # inverted dropout: mask is 0 or 1/(1-p)
            Z.append(Zk)
    return Cache(tuple(Z), tuple(A), tuple(masks))


def log_softmax(A2: Array) -> Array:
    """log Z2, from the row maximum and log-sum-exp: finite for any finite logits."""
    xp = array_module(A2)
    shifted = A2 - A2.max(axis=1, keepdims=True)                     # (m, c)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax(A2: Array) -> Array:
    """Z2 = softmax(A2), each row summing to 1."""
    xp = array_module(A2)
    E = xp.exp(A2 - A2.max(axis=1, keepdims=True))                   # (m, c)
    return E / E.sum(axis=1, keepdims=True)


def targets(y: Array, c: int, dtype: Any, smoothing: float = 0.0) -> Array:
    """Y, the one-hot rows of the labels (m, c); with label smoothing, (1-e) Y + e/c."""
    xp = array_module(y)
    Y = xp.zeros((y.shape[0], c), dtype=dtype)
    Y[xp.arange(y.shape[0]), y] = 1
    return Y * (1 - smoothing) + smoothing / c if smoothing else Y


def loss_and_dA2(A2: Array, y: Array, smoothing: float = 0.0) -> tuple[Array, Array]:
    """Mean cross-entropy L (a 0-d device array) and dA2 = (Z2 - Y) / m."""
    m, c = A2.shape
    logZ2 = log_softmax(A2)                                          # (m, c)
    Y = targets(y, c, A2.dtype, smoothing)                           # (m, c)
    L = -(Y * logZ2).sum() / m                                       # ()
    dA2 = (array_module(A2).exp(logZ2) - Y) / m                      # (m, c)
    return L, dA2


def backward(params: Params, cache: Cache, dA2: Array, act: Activation) -> Grads:
    """dW_k, db_k for every layer, from the last to the first (see the module docstring)."""
    L = len(params.W)
    dW: list = [None] * L
    db: list = [None] * L
    dA = dA2                                                          # (m, c)
    for k in reversed(range(L)):
        dW[k] = cache.Z[k].T @ dA                                     # (fan_in, fan_out)
        db[k] = dA.sum(axis=0)                                        # (fan_out,)
        if k > 0:
            dZ = dA @ params.W[k].T                                   # (m, h_k)
            if cache.masks:
                dZ = dZ * cache.masks[k - 1]                          # through the dropout mask
            dA = dZ * act.phi_prime(cache.A[k - 1])                   # (m, h_k)
    return Grads(tuple(dW), tuple(db))


def correct_count(A2: Array, y: Array) -> Array:
    """How many rows of logits put their maximum on the label (a 0-d device array)."""
    return (A2.argmax(axis=1) == y).sum()


def dropout_masks(rng: Any, m: int, widths: tuple[int, ...], p: float, dtype: Any) -> tuple:
    """One inverted-dropout mask per hidden layer: 1/(1-p) where kept, 0 where dropped.

    `rng` is a numpy or cupy Generator living on the same device as the activations.
    """
    masks = []
    for h in widths if p > 0 else ():
        M = (rng.random((m, h), dtype=dtype) >= p).astype(dtype)   # (m, h) of 0 and 1
        M *= 1.0 / (1.0 - p)                                         # in place: keeps dtype
        masks.append(M)
    return tuple(masks)
