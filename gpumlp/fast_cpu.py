"""The fast CPU step: the equations of `model.py`, written into preallocated buffers.

Same signature as `step.generic_step` and the same equations (see model.py for the notation:
A before the nonlinearity, Z after; shape letters m, d, h, c). What differs is only where the
numbers are written:

- every product is one BLAS gemm (scipy's wrappers) writing into a buffer allocated once per
  batch size (A_k starts as b_k and the product is added onto it), and every elementwise line
  has an `out=`;
- softmax and cross-entropy are fused: one pass gives L, dA2 = (Z2 - Y) / m and the correct count,
  worked on the transposed logits (NumPy reduces down columns far faster than along rows of 10);
- the SGD update is folded into the dW_k product through gemm's alpha and beta (beta applied
  by a scal first, which OpenBLAS does faster), so dW_k is never stored; the biases the same
  way, with db_k = ones.T @ dA_k as the product (one small gemm instead of a sum and the update):

      plain SGD:   W_k   = (1 - lr wd) W_k - lr Z_{k-1}.T @ dA_k        (one gemm)
      momentum:    vel_k = mu vel_k + Z_{k-1}.T @ dA_k (+ wd W_k);  W_k -= lr vel_k
      Nesterov:    W_k  += lr mu vel_k;  vel_k = mu vel_k + dW_k;  W_k -= lr (1 + mu) vel_k
                   (= W_k - lr (dW_k + mu vel_k), since dW_k = new vel_k - mu old vel_k)

Optimizers that need dW_k itself (Adam, AdamW, Nesterov with weight decay) take the generic step;
`supports` says which configs come here. The batch loader `BatchLoader` gathers the shuffled rows
into a preallocated uint8 buffer and scales them into a preallocated float buffer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
from scipy.linalg import blas

from .activations import ACTIVATIONS, Activation
from .config import Config, OptimConfig
from .data import DeviceSplit, MNIST_MEAN, MNIST_STD
from .model import Params
from .optim import OptState, apply_max_norm
from .step import generic_step


def supports(config: Config) -> bool:
    """True when the fast step computes exactly this config's equations (SGD, no Nesterov + wd)."""
    o = config.optim
    nesterov_wd = o.nesterov and o.momentum > 0 and o.weight_decay > 0
    return o.name == "sgd" and not nesterov_wd and config.train.dtype in ("float32", "float64")


class Blas(NamedTuple):
    """SciPy's BLAS wrappers for one dtype (s... for float32, d... for float64)."""
    gemm: Callable
    axpy: Callable
    scal: Callable


def gemm_into(gemm: Callable, alpha: float, A: np.ndarray, B: np.ndarray, beta: float,
              C: np.ndarray, trans_a: bool = False, trans_b: bool = False) -> None:
    """C = alpha op(A) @ op(B) + beta C in place, for C-ordered arrays.

    BLAS is column-major: a C-ordered M is the Fortran array M.T, so C.T = op(B).T @ op(A).T
    is one call with the operands swapped and no copies. With beta = 0, C's old contents are
    never read (BLAS semantics), so C may be uninitialised.
    """
    gemm(alpha, B.T, A.T, beta, C.T, trans_a=trans_b, trans_b=trans_a, overwrite_c=1)


def gemm_add(lib: Blas, alpha: float, A: np.ndarray, B: np.ndarray, beta: float,
             C: np.ndarray) -> None:
    """C = alpha A.T @ B + beta C, scaling C with scal first: OpenBLAS's gemm is slower for a
    beta other than 0 or 1 than a scal and a gemm with beta = 1 (what it does inside anyway)."""
    if beta != 1:
        lib.scal(beta, C.reshape(-1))                                  # C *= beta
    gemm_into(lib.gemm, alpha, A, B, 1.0, C, trans_a=True)             # C += alpha A.T @ B


class Buffers(NamedTuple):
    """Everything one step writes, for one batch size m (L = number of layers)."""
    A: tuple            # A_k (m, fan_out) for k = 1..L; A_L are the logits A2
    Z: tuple            # Z_k (m, h_k) for the hidden layers
    dA: tuple           # dA_k (m, fan_out); dZ_k is computed in place in the same buffer
    positive: tuple     # (A_k > 0) as 0/1 floats (m, h_k): phi'(A_k) of ReLU, set by forward
    ones: np.ndarray    # (m, 1) of 1: db_k = ones.T @ dA_k is a gemm, so the update folds in
    S: np.ndarray       # (c, m) the logits transposed, then shifted, exp'd, normalised: the
                        # per-row reductions of the softmax run down columns, many times faster
                        # in NumPy than along rows of only c = 10
    rowmax: np.ndarray  # (1, m) max of each row of A2, then log-sum-exp of the shifted row
    rowsum: np.ndarray  # (1, m) sum of exp of each shifted row, then times m
    at_label: np.ndarray  # (m,) logit of the label A2[i, y_i], then shifted, then row losses
    label_pos: np.ndarray  # (m,) flat index i * c + y_i of each label in (m, c)
    row_start: np.ndarray  # (m,) i * c
    pred: np.ndarray    # (m,) argmax of each row of A2
    hit: np.ndarray     # (m,) bool, pred == y


def new_buffers(m: int, widths: tuple[int, ...], dtype: np.dtype) -> Buffers:
    """Buffers for a batch of m rows through the layers `widths` = (d, h1, ..., c)."""
    outs, hidden, c = widths[1:], widths[1:-1], widths[-1]
    empty = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
    return Buffers(
        A=tuple(empty(m, w) for w in outs), Z=tuple(empty(m, w) for w in hidden),
        dA=tuple(empty(m, w) for w in outs), positive=tuple(empty(m, w) for w in hidden),
        ones=np.ones((m, 1), dtype=dtype), S=empty(c, m),
        rowmax=empty(1, m), rowsum=empty(1, m), at_label=empty(m),
        label_pos=np.empty(m, dtype=np.intp), row_start=np.arange(m, dtype=np.intp) * c,
        pred=np.empty(m, dtype=np.intp), hit=np.empty(m, dtype=bool))


# ---- forward: A_k = Z_{k-1} @ W_k + b_k, Z_k = phi(A_k) ------------------------------------------

def phi_into(act_name: str, act: Activation, A: np.ndarray, Z: np.ndarray,
             positive: np.ndarray) -> None:
    """Z = phi(A); ReLU as A * (A > 0), keeping A > 0 for phi'; others through their function."""
    if act_name == "relu":
        np.greater(A, 0, out=positive)                                 # (m, h) phi'(A), 0 or 1
        np.multiply(A, positive, out=Z)                                # (m, h) max(A, 0)
    else:
        np.copyto(Z, act.phi(A))                                       # (m, h)


def forward_into(gemm: Callable, params: Params, X: np.ndarray, masks: tuple, buf: Buffers,
                 act_name: str, act: Activation) -> None:
    """Fill buf.A and buf.Z for the batch X (m, d), as model.forward does."""
    Z_in, last = X, len(params.W) - 1
    for k, (Wk, bk) in enumerate(zip(params.W, params.b)):
        A = buf.A[k]
        np.copyto(A, bk)                                               # (m, fan_out) b_k
        gemm_into(gemm, 1.0, Z_in, Wk, 1.0, A)                        # (m, fan_out) + Z_in @ W_k
        if k < last:
            phi_into(act_name, act, A, buf.Z[k], buf.positive[k])      # (m, h_k)
            if masks:
                np.multiply(buf.Z[k], masks[k], out=buf.Z[k])          # inverted dropout
            Z_in = buf.Z[k]


# ---- softmax and cross-entropy, fused --------------------------------------------------------------

def softmax_ce_into(buf: Buffers, y: np.ndarray, smoothing: float) -> tuple[Any, Any]:
    """L (mean cross-entropy from log-sum-exp), dA2 = (Z2 - Y) / m into buf.dA[-1], correct count.

    With label smoothing e, Y = (1 - e) one-hot + e / c, and for each row
    -sum_j Y_ij log Z2_ij = lse_i - (1 - e) S[i, y_i] - (e / c) sum_j S_ij, S the shifted logits.
    The rows are worked on as the columns of S = A2.T (see Buffers.S).
    """
    A2, dA2, S = buf.A[-1], buf.dA[-1], buf.S                          # (m, c), (m, c), (c, m)
    m, c = A2.shape
    lse, loss_i = buf.rowmax, buf.at_label                             # (1, m), (m,)
    np.copyto(S, A2.T)                                                 # (c, m) A2.T
    np.maximum.reduce(S, axis=0, keepdims=True, out=buf.rowmax)        # (1, m) row maxima
    np.subtract(S, buf.rowmax, out=S)                                  # (c, m) S = A2 - max
    np.add(buf.row_start, y, out=buf.label_pos)                        # (m,) flat index of y_i
    np.take(A2.reshape(-1), buf.label_pos, out=loss_i, mode="clip")    # (m,) A2[i, y_i]
    np.subtract(loss_i, buf.rowmax.reshape(-1), out=loss_i)            # (m,) S[i, y_i]
    S_sum = np.add.reduce(S.reshape(-1)) if smoothing else 0.0         # () sum of S, for e / c
    np.exp(S, out=S)                                                   # (c, m) exp(S)
    np.add.reduce(S, axis=0, keepdims=True, out=buf.rowsum)            # (1, m)
    np.log(buf.rowsum, out=lse)                                        # (1, m) log-sum-exp of S
    if smoothing:
        np.multiply(loss_i, 1 - smoothing, out=loss_i)                 # (m,) (1 - e) S[i, y_i]
    np.subtract(lse.reshape(-1), loss_i, out=loss_i)                   # (m,) the rows' losses
    L = (np.add.reduce(loss_i) - smoothing / c * S_sum) / m            # ()
    np.multiply(buf.rowsum, m, out=buf.rowsum)                         # (1, m) m sum_j exp(S)
    np.divide(S, buf.rowsum, out=dA2.T)                                # (m, c) Z2 / m
    dA2.reshape(-1)[buf.label_pos] -= (1 - smoothing) / m              # (Z2 - Y) / m at labels
    if smoothing:
        dA2 -= smoothing / (c * m)                                     # and e / c everywhere
    return A2.dtype.type(L), correct_into(buf, y)


def correct_into(buf: Buffers, y: np.ndarray) -> Any:
    """How many rows of the logits put their maximum on the label, as model.correct_count."""
    np.argmax(buf.A[-1], axis=1, out=buf.pred)                         # (m,)
    np.equal(buf.pred, y, out=buf.hit)                                 # (m,)
    return np.int64(np.count_nonzero(buf.hit))


# ---- backward with the update folded in ------------------------------------------------------------

def phi_prime_into(act_name: str, act: Activation, A: np.ndarray, dA: np.ndarray,
                   positive: np.ndarray) -> None:
    """dA = dZ * phi'(A), in place: dA holds dZ on entry (and `positive` A > 0, for ReLU)."""
    if act_name == "relu":
        np.multiply(dA, positive, out=dA)                              # (m, h)
    else:
        np.multiply(dA, act.phi_prime(A), out=dA)                      # (m, h)


def update_weights(lib: Blas, cfg: OptimConfig, Z_in: np.ndarray, dA: np.ndarray, Wk: np.ndarray,
                   vel: np.ndarray, lr: float) -> None:
    """W_k updated by SGD with dW_k = Z_in.T @ dA folded into the gemm (see the module docstring)."""
    mu, wd = cfg.momentum, cfg.weight_decay
    W, V = Wk.reshape(-1), vel.reshape(-1)                             # flat views for axpy
    if mu == 0:
        gemm_add(lib, -lr, Z_in, dA, 1.0 - lr * wd, Wk)                  # W = (1-lr wd) W - lr dW
    elif not cfg.nesterov:
        gemm_add(lib, 1.0, Z_in, dA, mu, vel)                            # vel = mu vel + dW
        if wd:
            lib.axpy(W, V, a=wd)                                         # vel += wd W
        lib.axpy(V, W, a=-lr)                                            # W -= lr vel
    else:
        lib.axpy(V, W, a=lr * mu)                                        # W += lr mu vel_old
        gemm_add(lib, 1.0, Z_in, dA, mu, vel)                            # vel = mu vel + dW
        lib.axpy(V, W, a=-lr * (1 + mu))                                 # W -= lr (1+mu) vel_new


def backward_update(lib: Blas, cfg: OptimConfig, params: Params, state: OptState,
                    X: np.ndarray, masks: tuple, buf: Buffers, lr: float, act_name: str,
                    act: Activation) -> None:
    """From dA_L = buf.dA[-1] down to layer 1: dZ_{k-1} with the old W_k, then update layer k."""
    for k in reversed(range(len(params.W))):
        dA = buf.dA[k]                                                 # (m, fan_out)
        if k > 0:
            below = buf.dA[k - 1]
            gemm_into(lib.gemm, 1.0, dA, params.W[k], 0.0, below, trans_b=True)  # dZ (m, h)
            if masks:
                np.multiply(below, masks[k - 1], out=below)            # through the dropout mask
            phi_prime_into(act_name, act, buf.A[k - 1], below, buf.positive[k - 1])
        Z_in = X if k == 0 else buf.Z[k - 1]
        update_weights(lib, cfg, Z_in, dA, params.W[k], state.m[2 * k], lr)
        b, vel_b = params.b[k], state.m[2 * k + 1]                     # (fan_out,)
        update_weights(lib, cfg, buf.ones, dA, b.reshape(1, -1), vel_b.reshape(1, -1), lr)


# ---- the step ------------------------------------------------------------------------------------------

def writable_in_place(params: Params, state: OptState) -> bool:
    """True when BLAS can write W_k, b_k and their velocities in place (C-ordered, writeable).

    A Fortran-ordered W (say, from an --init file saved that way) would be copied by the
    wrapper and the update lost; such arrays take the generic step instead.
    """
    return all(a.flags.c_contiguous and a.flags.writeable
               for a in (*params.W, *params.b, *state.m))



def fast_step(config: Config) -> Callable:
    """step(params, state, X, y, lr, t, masks) -> (L, correct), as generic_step, for `supports`."""
    act_name = config.model.activation
    act = ACTIVATIONS[act_name]
    dtype = np.dtype(config.train.dtype)
    lib = Blas(*blas.get_blas_funcs(("gemm", "axpy", "scal"), dtype=dtype))
    widths = (784, *config.model.widths, 10)
    buffers: dict[int, Buffers] = {}  # one set per batch size: the full one and the last, shorter
    generic = generic_step(config)

    def step(params: Params, state: OptState, X: Any, y: Any, lr: float, t: int,
             masks: tuple = ()) -> tuple[Any, Any]:
        if not writable_in_place(params, state):
            return generic(params, state, X, y, lr, t, masks)
        m = X.shape[0]
        buf = buffers.get(m) or buffers.setdefault(m, new_buffers(m, widths, dtype))
        forward_into(lib.gemm, params, X, masks, buf, act_name, act)
        L, correct = softmax_ce_into(buf, y, config.train.label_smoothing)
        backward_update(lib, config.optim, params, state, X, masks, buf, lr, act_name, act)
        apply_max_norm(params, config.model.max_norm)
        return L, correct

    return step


class BatchLoader:
    """(X, y) of the shuffled rows idx, gathered as uint8 and scaled into reused buffers.

    X is the same as data.to_inputs(data.gather(...)) without augmentation; it is overwritten
    by the next call, so a step must be done with it before then (the training loop is).
    """

    def __init__(self, config: Config):
        self.normalize, self.dtype = config.data.normalize, np.dtype(config.train.dtype)
        self.scale = self.dtype.type(1.0 / 255.0)
        self.rows = 0
        self.U = self.X = self.y = None

    def reserve(self, m: int, split: DeviceSplit) -> None:
        if m > self.rows:
            self.rows = m
            self.U = np.empty((m, split.images.shape[1]), dtype=np.uint8)  # (m, d) pixels
            self.X = np.empty((m, split.images.shape[1]), dtype=self.dtype)  # (m, d) inputs
            self.y = np.empty(m, dtype=split.labels.dtype)             # (m,) labels

    def __call__(self, split: DeviceSplit, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = len(idx)
        self.reserve(m, split)
        U, X, y = self.U[:m], self.X[:m], self.y[:m]
        np.take(split.images, idx, axis=0, out=U, mode="clip")         # (m, d) uint8
        np.take(split.labels, idx, out=y, mode="clip")                 # (m,)
        np.copyto(X, U)                                                # (m, d) as float
        np.multiply(X, self.scale, out=X)                              # (m, d) x / 255
        if self.normalize == "standard":
            X -= MNIST_MEAN
            X *= 1.0 / MNIST_STD
        return X, y
