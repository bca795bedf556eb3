"""The MLP of the seed: forward, loss and backward, written as the derivation writes them.

Notation (the seed's; A is before the nonlinearity, Z after). Row-major: one example per row.
Shape letters: m = minibatch size, d = 784 inputs, h = hidden width, c = 10 classes; in a
net of K layers, h_k is the width of layer k (h_0 = d, h_K = c).

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
    db1 = dA1.sum(axis=0)     (h,)     the seed averages these rows (erratum)

Deeper nets of K layers follow by induction, with Z0 = X and dA_K = (softmax(A_K) - Y) / m:
dW_k = Z_{k-1}.T @ dA_k, db_k = dA_k.sum(axis=0), dZ_{k-1} = dA_k @ W_k.T,
dA_{k-1} = dZ_{k-1} * phi'(A_{k-1}). Layer k (1-based) is stored at index k - 1 of the tuples
below. Labels count from 0 (the seed counts classes from 1). With label smoothing, Y is the
smoothed target (see `targets`).
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
    Z: tuple[Array, ...]     # (X, Z1, ..., Z_{K-1}): the input of each layer, after dropout
    A: tuple[Array, ...]     # (A1, ..., A_K): pre-activations; A_K are the logits
    masks: tuple[Array, ...]  # (M1, ..., M_{K-1}): inverted-dropout masks, or ()


def init_params(widths: tuple[int, ...], init: str, rng: np.random.Generator,
                dtype: str = "float32") -> Params:
    """Weights drawn on the host from `rng` (He or Xavier), biases zero.

    `widths` is (d, h1, ..., c). Drawing on the host makes CPU and GPU runs start alike.
    """
    W, b = [], []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        if init == "he":  # He et al. 2015: Var = 2 / fan_in, for relu-like phi
            Wk = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
        elif init == "xavier":  # Glorot & Bengio 2010: U(-r, r), r = sqrt(6 / (fan_in + fan_out))
            r = np.sqrt(6.0 / (fan_in + fan_out))
            Wk = rng.uniform(-r, r, size=(fan_in, fan_out))
        else:
            raise ValueError(f"init must be 'he' or 'xavier', not {init!r}")
        W.append(Wk.astype(dtype))
        b.append(np.zeros(fan_out, dtype=dtype))
    return Params(tuple(W), tuple(b))


def forward(params: Params, X: Array, act: Activation, masks: tuple = (),
            matmul: Any = None) -> Cache:
    """A_k = Z_{k-1} @ W_k + b_k for k = 1..K; Z_k = phi(A_k) (times the mask M_k) for k < K.
    `matmul(A, B)`, when given, computes A @ B (a step's own BLAS, `FastStep.matmul`)."""
    Z, A = [X], []
    K = len(params.W)                                     # number of layers
    for k, (Wk, bk) in enumerate(zip(params.W, params.b), start=1):
        Ak = (Z[-1] @ Wk if matmul is None else matmul(Z[-1], Wk)) + bk  # (m, h_k); h_K = c
        A.append(Ak)
        if k < K:
            Zk = act.phi(Ak)          # (m, h_k)
            if masks:
                Zk = Zk * masks[k - 1]  # M_k, inverted dropout: 0 or 1/(1-p)
            Z.append(Zk)
    return Cache(tuple(Z), tuple(A), tuple(masks))


def log_softmax(A2: Array) -> Array:
    """log Z2, from the row maximum and log-sum-exp: no exp overflows, and log Z2 is finite
    unless a logit lies farther below the row's maximum than the dtype's range (-inf then)."""
    xp = array_module(A2)
    shifted = A2 - A2.max(axis=1, keepdims=True)                     # (m, c)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax(A2: Array) -> Array:
    """Z2 = softmax(A2), each row summing to 1."""
    xp = array_module(A2)
    E = xp.exp(A2 - A2.max(axis=1, keepdims=True))                   # (m, c)
    return E / E.sum(axis=1, keepdims=True)


def targets(y: Array, c: int, dtype: Any, smoothing: float = 0.0) -> Array:
    """Y, the one-hot rows of the labels (m, c); with label smoothing alpha = `smoothing`, the
    smoothed target (1 - alpha) Y + alpha / c, which the code also calls Y."""
    xp = array_module(y)
    Y = xp.zeros((y.shape[0], c), dtype=dtype)
    Y[xp.arange(y.shape[0]), y] = 1
    return Y * (1 - smoothing) + smoothing / c if smoothing else Y


def loss_and_dA2(A2: Array, y: Array, smoothing: float = 0.0) -> tuple[Array, Array]:
    """Mean cross-entropy L = -(1/m) sum(Y * log Z2) and dA2 = (Z2 - Y) / m (m, c).

    L is a 0-d array on the device (a NumPy scalar on the CPU). Y is the one-hot target, or
    the smoothed one when `smoothing` > 0. With one-hot Y, L is
    mean(logsumexp(A2[i]) - A2[i, y_i]) = -mean(log Z2[i, y_i]). For a deeper net, A2 and Z2
    stand for the output layer's A_K and Z_K.
    """
    m, c = A2.shape
    logZ2 = log_softmax(A2)                                          # (m, c)
    Y = targets(y, c, A2.dtype, smoothing)                           # (m, c), smoothed if asked
    xp = array_module(A2)
    # a 0 target's term is 0, also where a logit so far below the row's maximum (a spread past
    # the dtype's range) makes log Z2 -inf: 0 * -inf would be NaN
    L = -xp.where(Y != 0, Y * logZ2, 0).sum() / A2.dtype.type(m)    # () in A2's dtype
    dA2 = (xp.exp(logZ2) - Y) / m                                    # (m, c)
    return L, dA2


def backward(params: Params, cache: Cache, dA2: Array, act: Activation) -> Grads:
    """dW_k, db_k for k = K down to 1 (see the module docstring); dA2 is dA_K."""
    K = len(params.W)                                                 # number of layers
    dW: list = [None] * K
    db: list = [None] * K
    dA = dA2                                                          # dA_K (m, c)
    for k in range(K, 0, -1):                                         # dA is dA_k (m, h_k)
        dW[k - 1] = cache.Z[k - 1].T @ dA                             # dW_k (h_{k-1}, h_k)
        db[k - 1] = dA.sum(axis=0)                                    # db_k (h_k,)
        if k > 1:
            dZ = dA @ params.W[k - 1].T                               # dZ_{k-1} (m, h_{k-1})
            if cache.masks:
                dZ = dZ * cache.masks[k - 2]                          # through the mask M_{k-1}
            dA = dZ * act.phi_prime(cache.A[k - 2])                   # dA_{k-1} (m, h_{k-1})
    return Grads(tuple(dW), tuple(db))


def correct_count(A2: Array, y: Array) -> Array:
    """How many rows of logits put their maximum on the label (a 0-d device array)."""
    return (A2.argmax(axis=1) == y).sum()


def dropout_masks(rng: Any, m: int, hidden: tuple[int, ...], p: float, dtype: Any) -> tuple:
    """One inverted-dropout mask (m, h_k) per hidden layer of the widths `hidden` (h1, ...):
    1/(1-p) where kept, 0 where dropped; () when p is 0.

    `rng` is a numpy or cupy Generator living on the same device as the activations.
    """
    if p == 0:
        return ()
    masks = []
    for h in hidden:
        M = (rng.random((m, h), dtype=dtype) >= p).astype(dtype)   # (m, h) of 0 and 1
        M *= 1.0 / (1.0 - p)                                         # in place: keeps dtype
        masks.append(M)
    return tuple(masks)
