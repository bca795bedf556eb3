"""The fast CPU step: the equations of `model.py`, written into preallocated buffers.

Same signature as `step.generic_step` and the same equations (see model.py for the notation:
A before the nonlinearity, Z after; shape letters m, d, h, c). What differs is only where the
numbers are written:

- **one block per layer**: W_k and b_k are views of one array J_k = [W_k; b_k] of shape
  (fan_in + 1, fan_out) (their velocities likewise), and each layer's input carries a column of
  ones, [Z_{k-1} | 1] (m, fan_in + 1). Then A_k = [Z_{k-1} | 1] @ J_k is the product and the bias
  in one gemm, and [Z_{k-1} | 1].T @ dA_k is [dW_k; db_k] in one gemm: the biases cost no call
  of their own. `pack` puts parameters into this layout (the training loop calls it once);
  anything else takes the generic step.
- every product is one BLAS gemm (SciPy's wrappers) writing into a buffer allocated once per
  batch size, and every elementwise line has an `out=`;
- softmax and cross-entropy are fused, on the logits transposed, S = A_L.T (c, m): NumPy
  reduces down the columns of S far faster than along rows of only c = 10. S ends as
  m dA_L.T = (Z_L - Y).T; the 1/m goes into the alpha of the products that read it;
- the SGD update is folded into the dJ_k product through gemm's alpha and beta, so dJ_k is
  never stored. The velocity is kept as vel_k = s V_k with one scale s for the run
  (optim.OptState.scale): vel_k *= mu is s *= mu, and no pass over V_k is spent on it:

      plain SGD:   J_k  = (1 - lr wd) J_k - lr dJ_k                    (a gemm; a scal with wd)
      momentum:    s *= mu;  V_k += (dJ_k (+ wd J_k)) / s;  J_k -= lr s V_k    (gemm, axpy)
      Nesterov:    J_k += lr mu vel_k;  s *= mu;  V_k += dJ_k / s;  J_k -= lr (1 + mu) s V_k
                   (= J_k - lr (dJ_k + mu vel_k), since dJ_k = new vel_k - mu old vel_k)

  V_k is multiplied out (V_k *= s, s = 1) before s would fall below 2^-64, once in about 400
  steps at mu = 0.9; checkpoints save s beside V_k, so a resume continues bit for bit;
- the batch loader gathers the shuffled rows as uint8 and scales them straight into the
  first layer's input buffer.

Optimizers that need dW_k itself (Adam, AdamW, Nesterov with weight decay) take the generic step;
`supports` says which configs come here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
from scipy.linalg import blas

from .activations import ACTIVATIONS
from .config import Config, OptimConfig
from .data import DeviceSplit, MNIST_MEAN, MNIST_STD
from .model import Params
from .optim import OptState, apply_max_norm, multiply_out
from .step import generic_step

D, C = 784, 10
TINY_SCALE = 2.0 ** -64  # the velocity scale is multiplied out before it falls below this


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


# ---- the packed layout: J_k = [W_k; b_k] ---------------------------------------------------------

def pack(params: Params, state: OptState) -> tuple[Params, OptState]:
    """Copies of params and SGD state with W_k, b_k (and their velocities) in one block J_k."""
    def blocks(W: tuple, b: tuple) -> tuple[tuple, tuple]:
        Js = []
        for Wk, bk in zip(W, b):
            J = np.empty((Wk.shape[0] + 1, Wk.shape[1]), dtype=Wk.dtype)  # (fan_in + 1, fan_out)
            J[:-1], J[-1] = Wk, bk
            Js.append(J)
        return tuple(J[:-1] for J in Js), tuple(J[-1] for J in Js)

    W, b = blocks(params.W, params.b)
    vel = state.m
    if vel:
        vW, vb = blocks(vel[0::2], vel[1::2])
        vel = tuple(t for pair in zip(vW, vb) for t in pair)
    scale = np.ones(1) if state.scale is None else np.array(state.scale, dtype=np.float64)
    return Params(W, b), OptState(vel, state.v, scale)



def block_of(W: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """J when W = J[:-1] and b = J[-1] of one writeable C-ordered block J, else None."""
    J = W.base
    if (J is None or b.base is not J or J.ndim != 2 or not J.flags.c_contiguous
            or not J.flags.writeable or J.shape != (W.shape[0] + 1, W.shape[1])):
        return None
    start = J.__array_interface__["data"][0]
    if (W.__array_interface__["data"][0] != start or W.strides != J.strides
            or b.__array_interface__["data"][0] != start + W.shape[0] * J.strides[0]):
        return None
    return J


def packed_blocks(params: Params, state: OptState) -> tuple[tuple, tuple] | None:
    """(J_k, vel_k) of every layer when `pack`'s layout holds (vel_k = () without momentum)."""
    Js = tuple(block_of(W, b) for W, b in zip(params.W, params.b))
    if state.scale is None or state.scale.shape != (1,):
        return None
    if state.m:
        Vs = tuple(block_of(W, b) for W, b in zip(state.m[0::2], state.m[1::2]))
    else:
        Vs = tuple(() for _ in Js)
    if any(J is None for J in Js) or any(V is None for V in Vs):
        return None
    return Js, Vs


# ---- buffers -------------------------------------------------------------------------------------

class Buffers(NamedTuple):
    """Everything one step writes, for one batch size m and L layers (L - 1 hidden)."""
    Z: tuple            # [Z_{k-1} | 1] (m, fan_in + 1), k = 1..L: each layer's input, X first
    A: tuple            # A_k (m, h_k) of the hidden layers
    dA: tuple           # dA_k (m, h_k) of the hidden layers; dZ_k is computed in place in them
    positive: tuple     # (A_k > 0) (m, h_k) bool: phi'(A_k) of ReLU, set by the forward pass
    logits: np.ndarray  # A_L (m, c), as its gemm writes it fastest
    S: np.ndarray       # (c, m) the logits transposed, then shifted, exp'd, normalised: m dA_L.T
    colmax: np.ndarray  # (m,) max of each column of S, then log-sum-exp
    colsum: np.ndarray  # (m,) sum of exp of each shifted column
    at_label: np.ndarray  # (m,) shifted logit of the label, S[y_i, i]
    label_pos: np.ndarray  # (m,) flat index y_i m + i of each label in S
    col: np.ndarray     # (m,) 0..m-1
    pred: np.ndarray    # (m,) argmax of each column of S
    hit: np.ndarray     # (m,) bool, pred == y
    y: np.ndarray       # (m,) the labels, when the step's own loader gathers the batch
    x_scale: np.ndarray  # (1,) what Z[0] holds is X / x_scale: 1, or 1/255 when it holds the
                         # pixels themselves (the step's loader, data.normalize "unit"); its
                         # column of ones then holds 255, and x_scale is the first gemms' alpha


def new_buffers(m: int, widths: tuple[int, ...], dtype: np.dtype) -> Buffers:
    """Buffers for a batch of m rows through the layers `widths` = (d, h1, ..., c)."""
    hidden, c = widths[1:-1], widths[-1]
    empty = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
    Z = tuple(empty(m, w + 1) for w in widths[:-1])
    for Zk in Z:
        Zk[:, -1] = 1                                                  # the column of ones
    return Buffers(
        Z=Z, A=tuple(empty(m, h) for h in hidden), dA=tuple(empty(m, h) for h in hidden),
        positive=tuple(np.empty((m, h), dtype=bool) for h in hidden), logits=empty(m, c),
        S=empty(c, m), colmax=empty(m),
        colsum=empty(m), at_label=empty(m), label_pos=np.empty(m, dtype=np.intp),
        col=np.arange(m, dtype=np.intp), pred=np.empty(m, dtype=np.intp),
        hit=np.empty(m, dtype=bool), y=np.empty(m, dtype=np.int32), x_scale=np.ones(1))


def set_x_scale(buf: Buffers, x_scale: float) -> None:
    """Say what buf.Z[0] holds (see Buffers.x_scale), rewriting its column of ones to match."""
    if buf.x_scale[0] != x_scale:
        buf.Z[0][:, -1] = 1.0 / x_scale
        buf.x_scale[0] = x_scale


# ---- forward: A_k = [Z_{k-1} | 1] @ J_k, Z_k = phi(A_k) ------------------------------------------

def forward_into(gemm: Callable, Js: tuple, masks: tuple, buf: Buffers, act_name: str) -> None:
    """buf.A, buf.Z and buf.S = A_L.T from the input [X | 1] in buf.Z[0], as model.forward.

    Every gemm writes its output (m, fan_out), the layout OpenBLAS writes fastest (for the
    logits at h = 1024 twice as fast as (c, m)); the logits are then copied transposed.
    """
    act = ACTIVATIONS[act_name]
    alpha = float(buf.x_scale[0])                                      # for [X | 1] (1 after it)
    for k, A in enumerate(buf.A):
        gemm_into(gemm, alpha, buf.Z[k], Js[k], 0.0, A)                # (m, h_k) [Z | 1] @ J_k
        alpha = 1.0
        Z = buf.Z[k + 1][:, :-1]                                       # (m, h_k) view of [Z_k | 1]
        if act_name == "relu":
            np.greater(A, 0, out=buf.positive[k])                      # (m, h_k) phi'(A), bool
            np.multiply(A, buf.positive[k], out=Z)                     # (m, h_k) max(A, 0)
        else:
            np.copyto(Z, act.phi(A))
        if masks:
            np.multiply(Z, masks[k], out=Z)                            # inverted dropout
    gemm_into(gemm, alpha, buf.Z[-1], Js[-1], 0.0, buf.logits)        # (m, c) [Z | 1] @ J_L
    np.copyto(buf.S, buf.logits.T)                                     # (c, m)


# ---- softmax and cross-entropy, fused, on S = A_L.T ----------------------------------------------

def softmax_ce_into(buf: Buffers, y: np.ndarray, smoothing: float) -> tuple[Any, Any]:
    """L (mean cross-entropy from log-sum-exp) and the correct count; S becomes (Z_L - Y).T.

    With label smoothing e, Y = (1 - e) one-hot + e / c, and for each example i
    -sum_j Y_ij log Z_L,ij = lse_i - (1 - e) S[y_i, i] - (e / c) sum_j S_ji, S the shifted logits.
    """
    S, lse = buf.S, buf.colmax                                         # (c, m), (m,)
    c, m = S.shape
    flat = S.reshape(-1)
    np.maximum.reduce(S, axis=0, out=buf.colmax)                       # (m,) max logit
    np.subtract(S, buf.colmax, out=S)                                  # (c, m) shifted
    np.argmax(S, axis=0, out=buf.pred)                                 # (m,) as model.correct_count
    correct = np.count_nonzero(np.equal(buf.pred, y, out=buf.hit))
    np.multiply(y, m, out=buf.label_pos, dtype=np.intp)
    np.add(buf.label_pos, buf.col, out=buf.label_pos)                  # (m,) y_i m + i
    flat.take(buf.label_pos, out=buf.at_label)                         # (m,) S[y_i, i]
    S_sum = np.add.reduce(flat) if smoothing else 0.0                  # () for the e / c term
    np.exp(S, out=S)                                                   # (c, m)
    np.add.reduce(S, axis=0, out=buf.colsum)                           # (m,)
    np.log(buf.colsum, out=lse)                                        # (m,) log-sum-exp
    L = (np.add.reduce(lse) - (1 - smoothing) * np.add.reduce(buf.at_label)
         - smoothing / c * S_sum) / m                                  # ()
    np.divide(S, buf.colsum, out=S)                                    # (c, m) Z_L.T
    if smoothing:
        np.subtract(S, smoothing / c, out=S)
    flat[buf.label_pos] -= 1 - smoothing                               # (c, m) (Z_L - Y).T
    return S.dtype.type(L), np.int64(correct)


# ---- backward with the update folded in ----------------------------------------------------------

def sgd_fold(lib: Blas, cfg: OptimConfig, lr: float, J: np.ndarray, V: Any, s: float,
             alpha: float, P: np.ndarray, Q: np.ndarray, trans_q: bool) -> None:
    """J updated by SGD with dJ = alpha P.T @ op(Q) folded into the gemm (module docstring).

    With momentum the velocity is s V (s = mu s_old already, see `FastStep`): vel *= mu is
    then the change of s, and vel += dJ is V += dJ / s, so no pass is spent on it.
    """
    mu, wd = cfg.momentum, cfg.weight_decay
    Jf = J.reshape(-1)                                                 # flat views for scal, axpy
    if mu == 0:
        if wd:
            lib.scal(1.0 - lr * wd, Jf)                                # J *= 1 - lr wd
        gemm_into(lib.gemm, -lr * alpha, P, Q, 1.0, J, True, trans_q)  # J -= lr dJ
        return
    Vf = V.reshape(-1)
    if cfg.nesterov:
        lib.axpy(Vf, Jf, a=lr * s)                                     # J += lr mu vel_old
    gemm_into(lib.gemm, alpha / s, P, Q, 1.0, V, True, trans_q)        # vel = mu vel + dJ
    if wd:
        lib.axpy(Jf, Vf, a=wd / s)                                     # vel += wd J
    lib.axpy(Vf, Jf, a=-lr * (1 + mu) * s if cfg.nesterov else -lr * s)  # J -= lr (1+mu) vel


def backward_update(lib: Blas, cfg: OptimConfig, lr: float, Js: tuple, Vs: tuple, s: float,
                    masks: tuple, buf: Buffers, act_name: str) -> None:
    """From S = m dA_L.T down to layer 1: dZ_{k-1} with the old W_k, then update layer k."""
    m = buf.S.shape[1]
    top = len(buf.A)                                                   # index of the last layer
    if top:
        gemm_into(lib.gemm, 1.0 / m, buf.S, Js[top][:-1], 0.0, buf.dA[-1], True, True)  # (m, h)
    alpha = 1.0 if top else float(buf.x_scale[0])                     # x_scale for [X | 1]
    sgd_fold(lib, cfg, lr, Js[top], Vs[top], s, alpha / m, buf.Z[top], buf.S, True)
    for k in reversed(range(top)):
        dA = buf.dA[k]                                                 # (m, h_k) dZ_k on entry
        if masks:
            np.multiply(dA, masks[k], out=dA)                          # through the dropout mask
        if act_name == "relu":
            np.multiply(dA, buf.positive[k], out=dA)                   # dA = dZ * phi'(A)
        else:
            np.multiply(dA, ACTIVATIONS[act_name].phi_prime(buf.A[k]), out=dA)
        if k:
            gemm_into(lib.gemm, 1.0, dA, Js[k][:-1], 0.0, buf.dA[k - 1], trans_b=True)  # dZ_{k-1}
        alpha = 1.0 if k else float(buf.x_scale[0])
        sgd_fold(lib, cfg, lr, Js[k], Vs[k], s, alpha, buf.Z[k], dA, False)


# ---- the batch loader ----------------------------------------------------------------------------

class BatchLoader:
    """(X, y) of the shuffled rows idx: gathered as uint8, then scaled into a float buffer.

    X is bit for bit data.to_inputs(data.gather(...)) without augmentation. `load` writes into
    the arrays it is given (the fast step's input buffer; `load_pixels` leaves out the x / 255,
    which the fast step folds into its first products); calling the loader writes into its own
    reused buffers. Either way X is overwritten by the next batch.
    """

    def __init__(self, config: Config):
        self.normalize, self.dtype = config.data.normalize, np.dtype(config.train.dtype)
        self.scale = self.dtype.type(1.0 / 255.0)
        self.U = np.empty((0, D), dtype=np.uint8)
        self.X = np.empty((0, D), dtype=self.dtype)
        self.y = np.empty(0, dtype=np.int32)

    def load(self, split: DeviceSplit, idx: np.ndarray, X: np.ndarray, y: np.ndarray) -> None:
        """X (m, d) or [X | 1] (m, d + 1), and y (m,), of the rows idx, written in place.

        The arithmetic runs over all of X's buffer (contiguous, several times faster in NumPy
        than over a strided view) and then the column of ones, if any, is set again.
        """
        d = split.images.shape[1]
        self.load_pixels(split, idx, X[:, :d], y)
        np.multiply(X, self.scale, out=X)                              # (m, d) x / 255
        if self.normalize == "standard":
            X -= MNIST_MEAN
            X *= 1.0 / MNIST_STD
        if X.shape[1] > d:
            X[:, d:] = 1                                               # the column of ones

    def load_pixels(self, split: DeviceSplit, idx: np.ndarray, X: np.ndarray,
                    y: np.ndarray) -> None:
        """X (m, d) the pixels of the rows idx as floats 0..255 (x / 255 left to the caller)."""
        m = len(idx)
        if m > self.U.shape[0]:
            self.U = np.empty((m, split.images.shape[1]), dtype=np.uint8)
        U = self.U[:m]
        np.take(split.images, idx, axis=0, out=U, mode="clip")         # (m, d) uint8
        np.take(split.labels, idx, out=y, mode="clip")                 # (m,)
        np.copyto(X, U)                                                # (m, d) as float

    def __call__(self, split: DeviceSplit, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = len(idx)
        if m > self.X.shape[0]:
            self.X = np.empty((m, split.images.shape[1]), dtype=self.dtype)
            self.y = np.empty(m, dtype=split.labels.dtype)
        X, y = self.X[:m], self.y[:m]
        self.load(split, idx, X, y)
        return X, y


# ---- the step ------------------------------------------------------------------------------------

class FastStep:
    """step(params, state, X, y, lr, t, masks) -> (L, correct), as generic_step, for `supports`.

    Parameters in `pack`'s layout take the fast path; others (say, arrays a test made) the
    generic step, with the same result. `batch(split, idx)` loads a batch straight into the
    step's input buffer, and `prepare(params, state)` packs.
    """

    kind = "fast_cpu"

    def __init__(self, config: Config):
        self.config = config
        self.act_name = config.model.activation
        self.dtype = np.dtype(config.train.dtype)
        self.lib = Blas(*blas.get_blas_funcs(("gemm", "axpy", "scal"), dtype=self.dtype))
        self.widths = (D, *config.model.widths, C)
        self.buffers: dict[int, Buffers] = {}  # one set per batch size: the full and the last
        self.generic = generic_step(config)
        self.loader = BatchLoader(config)
        self.packed: tuple = (None, None, None)  # (params, state, blocks) last found packed

    def prepare(self, params: Params, state: OptState) -> tuple[Params, OptState]:
        return pack(params, state)

    def buffers_for(self, m: int) -> Buffers:
        buf = self.buffers.get(m)
        if buf is None:
            buf = self.buffers[m] = new_buffers(m, self.widths, self.dtype)
        return buf

    def batch(self, split: DeviceSplit, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of the rows idx, X a view into the input buffer [X | 1] of this batch size.

        X is the step's own form of the inputs, for this step only: with data.normalize "unit"
        it holds the pixels 0..255, and x / 255 is the alpha of the first products.
        """
        buf = self.buffers_for(len(idx))
        y = buf.y if buf.y.dtype == split.labels.dtype else np.empty(len(idx), split.labels.dtype)
        if self.config.data.normalize == "unit":
            self.loader.load_pixels(split, idx, buf.Z[0][:, :-1], y)
            set_x_scale(buf, float(self.loader.scale))
        else:
            set_x_scale(buf, 1.0)
            self.loader.load(split, idx, buf.Z[0], y)
        return buf.Z[0][:, :-1], y

    def blocks(self, params: Params, state: OptState) -> tuple[tuple, tuple] | None:
        last_params, last_state, blocks = self.packed
        if params is not last_params or state is not last_state:
            blocks = packed_blocks(params, state)
            self.packed = (params, state, blocks)
        return blocks

    def next_scale(self, state: OptState, Vs: tuple) -> float:
        """s *= mu for this step's velocity (state.scale), multiplying V out before s gets tiny."""
        mu = self.config.optim.momentum
        if mu == 0:
            return 1.0
        s = float(state.scale[0])
        if s * mu < TINY_SCALE:                                        # once in ~400 steps
            for V in Vs:
                self.lib.scal(s, V.reshape(-1))
            s = 1.0
        state.scale[0] = s * mu
        return s * mu

    def __call__(self, params: Params, state: OptState, X: Any, y: Any, lr: float, t: int,
                 masks: tuple = ()) -> tuple[Any, Any]:
        buf = self.buffers_for(X.shape[0])
        own = X.base is buf.Z[0]                                       # from self.batch
        blocks = self.blocks(params, state)
        if blocks is None or X.dtype != self.dtype:
            multiply_out(state)
            if own and buf.x_scale[0] != 1:
                X = X * X.dtype.type(buf.x_scale[0])                   # the pixels as inputs
            return self.generic(params, state, X, y, lr, t, masks)
        Js, Vs = blocks
        s = self.next_scale(state, Vs)
        if not own:
            set_x_scale(buf, 1.0)
            np.copyto(buf.Z[0][:, :-1], X)
        forward_into(self.lib.gemm, Js, masks, buf, self.act_name)
        L, correct = softmax_ce_into(buf, y, self.config.train.label_smoothing)
        backward_update(self.lib, self.config.optim, lr, Js, Vs, s, masks, buf, self.act_name)
        apply_max_norm(params, self.config.model.max_norm)
        return L, correct


def fast_step(config: Config) -> FastStep:
    """The fast step for a config that `supports` accepts."""
    return FastStep(config)
