"""The fast CPU step: the equations of `model.py`, written into preallocated buffers.

Same signature as `step.generic_step` and the same equations (see model.py for the notation:
A before the nonlinearity, Z after; shape letters m, d, h, c). What differs is only where the
numbers are written:

- **one block per layer**: W_k and b_k are views of one array J_k = [b_k; W_k] of shape
  (fan_in + 1, fan_out) (their velocities likewise), and each layer's input starts with a
  column of ones, [1 | Z_{k-1}] (m, fan_in + 1). Then A_k = [1 | Z_{k-1}] @ J_k is the product
  and the bias in one gemm, and [1 | Z_{k-1}].T @ dA_k is [db_k; dW_k] in one gemm: the biases
  cost no call of their own. `FastStep.prepare` puts a run's parameters into this layout and
  `FastStep.export` gives them back as model.py has them;
- **the zero pixels of a batch are left out of the first layer's products**. A pixel that is 0
  in every image of a set of rows adds 0 to their A_1 and their part of its row of dW_1 is 0,
  so the products for those rows can leave it out. The rows of W_1 (and the inputs' pixels)
  are kept in one order for the run, the pixels most often nonzero in the training set first
  (`PixelOrder`); an image's extent is the position, in that order, of its last nonzero pixel.
  A batch's rows are sorted by extent, and its first input comes in column blocks
  (`extent_blocks`): all rows with the first k_1 columns [1 | X], then the rows from the 60th
  percentile on with the next columns up to k_2, then the last tenth up to the batch's k. Each
  block is one contiguous block of rows of J_1 (no gather), one gemm in the forward pass
  (accumulating into A_1) and one in the backward. In MNIST 67 pixels are 0 in every training
  image, and a batch of 128 needs about 500 of the 785 columns per row on average (635 if the
  batch's widest row set them all): the same sums without their zero terms. This needs inputs
  whose zeros are zeros: data.normalize "unit" and no augmentation; otherwise one block of 785;
- every product is a BLAS gemm (SciPy's wrappers; one per column block in the first layer)
  writing into a buffer allocated once per batch size, and every elementwise line has an
  `out=`;
- softmax and cross-entropy are fused, on the logits transposed, S = A_K.T (c, m): NumPy
  reduces down the columns of S far faster than along rows of only c = 10. S ends as
  m dA_K.T = (Z_K - Y).T; the 1/m goes into the alpha of the products that read it;
- the SGD update is folded into the dJ_k product through gemm's alpha and beta, so dJ_k is
  never stored. The velocity is kept as vel_k = s V_k with one scale s for the run
  (optim.OptState.scale): vel_k *= mu is s *= mu, and no pass over V_k is spent on it:

      plain SGD:   J_k  = (1 - lr wd) J_k - lr dJ_k                    (a gemm; a scal with wd)
      momentum:    s *= mu;  V_k += (dJ_k (+ wd J_k)) / s;  J_k -= lr s V_k    (gemm, axpy)
      Nesterov:    J_k += lr mu vel_k;  s *= mu;  V_k += dJ_k / s;  J_k -= lr (1 + mu) s V_k
                   (= J_k - lr (dJ_k + mu vel_k), since dJ_k = new vel_k - mu old vel_k)

  V_k is multiplied out (V_k *= s, s = 1) before s would fall below 2^-64, once in about 400
  steps at mu = 0.9; checkpoints save s beside V_k, so a resume continues bit for bit;
- the batch loader gathers the shuffled rows as uint8 (from the run's copy of the training
  images in the pixel order above) into one reused buffer and converts them straight into
  the first input's blocks; with data.normalize "unit" it leaves them 0..255 and x / 255 is
  the first products' alpha.

Adam and AdamW need dW_k itself, which the folded update never stores, so they take the
generic step; so does Nesterov with weight decay, since by the time `vel += wd J` would run,
J_k has already been moved by lr mu vel_k. `supports` says which configs come here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
from scipy.linalg import blas

from .activations import ACTIVATIONS
from .augment import make_augment
from .config import Config, OptimConfig
from .data import DeviceSplit, standardize
from .mnist import D
from .model import Params
from .optim import OptState, apply_max_norm, flat, multiply_out
from .step import generic_step

TINY_SCALE = 2.0 ** -64  # the velocity scale is multiplied out before it falls below this


def supports(config: Config) -> bool:
    """True when the fast step computes exactly this config's equations: SGD, and not
    Nesterov with weight decay (its decay would read J_k after the lr mu vel_k shift), and a
    momentum of 0 or one the velocity's scale s (s *= mu) can take: below TINY_SCALE, s = mu
    itself would make the gemms' alpha / s overflow and lr s round to 0 in float32."""
    o = config.optim
    nesterov_wd = o.nesterov and o.momentum > 0 and o.weight_decay > 0
    tiny_momentum = 0 < o.momentum < TINY_SCALE
    return o.name == "sgd" and not nesterov_wd and not tiny_momentum


class ScipyBlas(NamedTuple):
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


# ---- the packed layout: J_k = [b_k; W_k], the rows of W_1 in the pixel order ------------------

class PixelOrder(NamedTuple):
    """The order of the first layer's inputs (and of W_1's rows) for a run, and what it gives."""
    order: np.ndarray     # (d,) position i of the inputs holds pixel order[i]
    images: Any           # (n, d) uint8 the training images, their pixels in that order; or None
    extent: Any           # (n,) how many leading pixels (in order) hold all of an image's
                          # nonzero ones; None: leave no pixel out (k = d + 1 always)
    source: Any           # the split.images that `images` and `extent` were made from


def no_pixel_order(d: int = D) -> PixelOrder:
    """The pixels as they are, none left out: for inputs whose zeros are not zeros."""
    return PixelOrder(np.arange(d), None, None, None)


def pixel_order(images: np.ndarray, chunk: int = 8192) -> PixelOrder:
    """Pixels most often nonzero first, over the (n, d) uint8 training images; their copy in
    that order and each image's extent. Two passes over the images, chunk by chunk (at most
    65,535 rows, for the uint16 counts), so that no temporary is as large as the images."""
    n, d = images.shape
    counts = np.zeros(d, dtype=np.int64)
    for start in range(0, n, chunk):
        nonzero = (images[start:start + chunk] != 0).view(np.uint8)    # (chunk, d) 0/1
        counts += np.add.reduce(nonzero, axis=0, dtype=np.uint16)      # (d,)
    order = np.argsort(-counts, kind="stable")                         # (d,)
    position = np.arange(1, d + 1, dtype=np.uint16 if d < 2 ** 16 else np.int64)  # (d,) 1..d
    permuted = np.empty_like(images)                                   # (n, d)
    extent = np.empty(n, dtype=np.intp)                                # (n,)
    for start in range(0, n, chunk):
        block = permuted[start:start + chunk]
        np.take(images[start:start + chunk], order, axis=1, out=block)
        last = np.multiply(block != 0, position, dtype=position.dtype)  # (chunk, d) i+1 or 0
        extent[start:start + chunk] = last.max(axis=1)                 # 0 for a blank image
    return PixelOrder(order, permuted, extent, images)


def pack(params: Params, state: OptState, order: np.ndarray) -> tuple[Params, OptState]:
    """Copies of params and SGD state in one block J_k = [b_k; W_k] per layer (velocities
    likewise), W_1's rows in `order`; W_k, b_k (and velocities) are views of the blocks."""
    def blocks(W: tuple, b: tuple) -> tuple[tuple, tuple]:
        Js = []
        for k, (Wk, bk) in enumerate(zip(W, b)):
            J = np.empty((Wk.shape[0] + 1, Wk.shape[1]), dtype=Wk.dtype)  # (fan_in + 1, fan_out)
            J[0] = bk
            if k == 0:
                np.take(Wk, order, axis=0, out=J[1:])                  # W_1's rows in pixel order
            else:
                np.copyto(J[1:], Wk)
            Js.append(J)
        return tuple(J[1:] for J in Js), tuple(J[0] for J in Js)

    W, b = blocks(params.W, params.b)
    vel = flat(Params(*blocks(state.m[0::2], state.m[1::2]))) if state.m else ()
    scale = np.ones(1) if state.scale is None else np.array(state.scale, dtype=np.float64)
    return Params(W, b), OptState(vel, state.v, scale)


def unpack(params: Params, state: OptState, order: np.ndarray) -> tuple[Params, OptState]:
    """`pack` undone: copies with W_1's rows back in pixel order, the velocity scale kept."""
    def restore(W: tuple, b: tuple) -> tuple[tuple, tuple]:
        W_out = [Wk.copy() for Wk in W]
        W_out[0][order] = W[0]
        return tuple(W_out), tuple(bk.copy() for bk in b)

    W, b = restore(params.W, params.b)
    vel = flat(Params(*restore(state.m[0::2], state.m[1::2]))) if state.m else ()
    return Params(W, b), OptState(vel, state.v, state.scale.copy())


def blocks_of(params: Params, state: OptState) -> tuple[tuple, tuple]:
    """(J_k, vel_k) of every layer of `pack`'s result (vel_k = () without momentum)."""
    Js = tuple(W.base for W in params.W)
    Vs = tuple(V.base for V in state.m[0::2]) if state.m else tuple(() for _ in Js)
    return Js, Vs


# ---- buffers -------------------------------------------------------------------------------------

class Buffers(NamedTuple):
    """Everything one step writes, for one batch size m and K layers (K - 1 hidden)."""
    Z: tuple            # [1 | Z_{k-1}] (m, fan_in + 1), k = 1..K: each layer's input. Z[0] is
                        # storage for the first input's column blocks (`first_parts`)
    A: tuple            # A_k (m, h_k) of the hidden layers
    dA: tuple           # dA_k (m, h_k) of the hidden layers; dZ_k is computed in place in them
    positive: tuple     # (A_k > 0) (m, h_k) as 0/1 floats: phi'(A_k) of ReLU, from the forward
                        # pass (a float mask multiplies 2-3x faster than a bool one)
    logits: np.ndarray  # A_K (m, c), as its gemm writes it fastest
    S: np.ndarray       # (c, m) the logits transposed, then shifted, exp'd, normalised: m dA_K.T
    colmax: np.ndarray  # (m,) max of each column of S, then log-sum-exp
    colsum: np.ndarray  # (m,) sum of exp of each shifted column
    at_label: np.ndarray  # (m,) shifted logit of the label, S[y_i, i]
    label_pos: np.ndarray  # (m,) flat index y_i m + i of each label in S
    col: np.ndarray     # (m,) 0..m-1
    pred: np.ndarray    # (m,) argmax of each column of S
    hit: np.ndarray     # (m,) bool, pred == y
    y: np.ndarray       # (m,) the labels, when the step's own loader gathers the batch
    x_scale: np.ndarray  # (1,) what the first input holds is X / x_scale: 1, or 1/255 when it
                         # holds the pixels themselves (data.normalize "unit"); its column of
                         # ones then holds 255, and x_scale is the first gemms' alpha
    parts: list         # the first input of the batch `FastStep.batch` loaded last, in blocks


def new_buffers(m: int, widths: tuple[int, ...], dtype: np.dtype) -> Buffers:
    """Buffers for a batch of m rows through the layers `widths` = (d, h1, ..., c)."""
    hidden, c = widths[1:-1], widths[-1]
    empty = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
    Z = tuple(empty(m, w + 1) for w in widths[:-1])
    for Zk in Z:
        Zk[:, 0] = 1                                                   # the column of ones
    return Buffers(
        Z=Z, A=tuple(empty(m, h) for h in hidden), dA=tuple(empty(m, h) for h in hidden),
        positive=tuple(empty(m, h) for h in hidden), logits=empty(m, c),
        S=empty(c, m), colmax=empty(m),
        colsum=empty(m), at_label=empty(m), label_pos=np.empty(m, dtype=np.intp),
        col=np.arange(m, dtype=np.intp), pred=np.empty(m, dtype=np.intp),
        hit=np.empty(m, dtype=bool), y=np.empty(m, dtype=np.int32), x_scale=np.ones(1),
        parts=[])


# A column block of a layer's input: (lo, col0, Z), Z (m - lo, w) C-ordered the columns
# col0:col0 + w of the rows lo:m, to be multiplied by the rows col0:col0 + w of J_k. The first
# block of an input has lo = col0 = 0 and starts with the column of ones.
Part = tuple[int, int, np.ndarray]


def first_parts(buf: Buffers, blocks: list[tuple[int, int, int]]) -> list[Part]:
    """Parts (lo, col0, Z (m - lo, w)) for the blocks (lo, col0, w), one after the other in
    buf.Z[0]'s storage, each contiguous."""
    storage, start, parts, m = buf.Z[0].reshape(-1), 0, [], buf.Z[0].shape[0]
    for lo, col0, w in blocks:
        parts.append((lo, col0, storage[start:start + (m - lo) * w].reshape(m - lo, w)))
        start += (m - lo) * w
    return parts


def set_ones(parts: list[Part], buf: Buffers, x_scale: float) -> None:
    """Say what the first input holds (Buffers.x_scale) and write its column of ones to match."""
    parts[0][2][:, 0] = 1.0 / x_scale
    buf.x_scale[0] = x_scale


def products_into(gemm: Callable, alpha: float, parts: list[Part], J: np.ndarray,
                  out: np.ndarray) -> None:
    """out = alpha [1 | Z] @ J, block by block: out[lo:] += alpha Z @ J[col0:col0 + w]."""
    beta = 0.0                                                         # the first block: all rows
    for lo, col0, Z in parts:
        gemm_into(gemm, alpha, Z, J[col0:col0 + Z.shape[1]], beta, out[lo:])  # (m - lo, fan_out)
        beta = 1.0


# ---- forward: A_k = [1 | Z_{k-1}] @ J_k, Z_k = phi(A_k) ------------------------------------------

def forward_into(gemm: Callable, Js: tuple, masks: tuple, buf: Buffers, act_name: str,
                 first: list[Part]) -> None:
    """buf.A, buf.Z and buf.S = A_K.T from the first input's parts `first`, as model.forward.

    Every gemm writes its output (m, fan_out), the layout OpenBLAS writes fastest (for the
    logits at h = 1024 twice as fast as (c, m)); the logits are then copied transposed.
    """
    act = ACTIVATIONS[act_name]
    alpha, parts = float(buf.x_scale[0]), first                        # x_scale for [1 | X]
    for k, A in enumerate(buf.A):
        products_into(gemm, alpha, parts, Js[k], A)                    # (m, h_k) [1 | Z] @ J_k
        alpha, parts = 1.0, [(0, 0, buf.Z[k + 1])]
        Z = buf.Z[k + 1][:, 1:]                                        # (m, h_k) view of [1 | Z_k]
        if act_name == "relu":
            np.greater(A, 0, out=buf.positive[k])                      # (m, h_k) phi'(A), 0/1
            np.multiply(A, buf.positive[k], out=Z)                     # (m, h_k) max(A, 0)
        else:
            np.copyto(Z, act.phi(A))
        if masks:
            np.multiply(Z, masks[k], out=Z)                            # inverted dropout
    products_into(gemm, alpha, parts, Js[-1], buf.logits)              # (m, c) [1 | Z] @ J_K
    np.copyto(buf.S, buf.logits.T)                                     # (c, m)


# ---- softmax and cross-entropy, fused, on S = A_K.T ----------------------------------------------

def softmax_ce_into(buf: Buffers, y: np.ndarray, smoothing: float) -> tuple[Any, Any]:
    """L (mean cross-entropy from log-sum-exp) and the correct count; S becomes (Z_K - Y).T.

    With label smoothing e, Y = (1 - e) one-hot + e / c, and for each example i
    -sum_j Y_ij log Z_K,ij = lse_i - (1 - e) S[y_i, i] - (e / c) sum_j S_ji, S the shifted logits.
    """
    S = buf.S                                                          # (c, m)
    lse = buf.colmax  # (m,): the column maxima's buffer, free once S is shifted, reused
    c, m = S.shape
    S_flat = S.reshape(-1)
    np.maximum.reduce(S, axis=0, out=buf.colmax)                       # (m,) max logit
    np.subtract(S, buf.colmax, out=S)                                  # (c, m) shifted
    S.argmax(axis=0, out=buf.pred)                                     # (m,) as model.correct_count
    correct = np.count_nonzero(np.equal(buf.pred, y, out=buf.hit))
    np.multiply(y, m, out=buf.label_pos, dtype=np.intp)
    np.add(buf.label_pos, buf.col, out=buf.label_pos)                  # (m,) y_i m + i
    S_flat.take(buf.label_pos, out=buf.at_label)                       # (m,) S[y_i, i]
    t = S.dtype.type  # scalars in S's dtype: NumPy 1 would widen float32 ones to float64
    S_sum = np.add.reduce(S_flat) if smoothing else t(0)               # () for the e / c term
    np.exp(S, out=S)                                                   # (c, m)
    np.add.reduce(S, axis=0, out=buf.colsum)                           # (m,)
    np.log(buf.colsum, out=lse)                                        # (m,) log-sum-exp
    L = (np.add.reduce(lse) - t(1 - smoothing) * np.add.reduce(buf.at_label)
         - t(smoothing / c) * S_sum) / t(m)                            # ()
    np.divide(S, buf.colsum, out=S)                                    # (c, m) Z_K.T
    if smoothing:
        np.subtract(S, smoothing / c, out=S)
    S_flat[buf.label_pos] -= 1 - smoothing                             # (c, m) (Z_K - Y).T
    return t(L), np.int64(correct)


# ---- backward with the update folded in ----------------------------------------------------------

def sgd_fold(lib: ScipyBlas, cfg: OptimConfig, lr: float, J: np.ndarray, V: Any, s: float,
             alpha: float, parts: list[Part], Q: np.ndarray, trans_q: bool) -> None:
    """J updated by SGD with dJ = alpha P.T @ op(Q) folded into the gemms (module docstring),
    P the layer's input in column blocks `parts`: a gemm per block, into its rows of the
    target, with its rows of op(Q) (rows of J no block has have dJ = 0; only the passes over
    the whole of J reach them). With momentum the velocity is s V (s = mu s_old already, see
    `FastStep`): vel *= mu is then the change of s, and vel += dJ is V += dJ / s, so no pass
    is spent on it.
    """
    mu, wd = cfg.momentum, cfg.weight_decay
    Jf = J.reshape(-1)                                                 # flat views for scal, axpy

    def fold(a: float, target: np.ndarray) -> None:                   # target += a dJ
        for lo, col0, P in parts:
            Q_rows = Q[:, lo:] if trans_q else Q[lo:]
            gemm_into(lib.gemm, a, P, Q_rows, 1.0, target[col0:col0 + P.shape[1]], True, trans_q)

    if mu == 0:
        if wd:
            lib.scal(1.0 - lr * wd, Jf)                                # J *= 1 - lr wd
        fold(-lr * alpha, J)                                           # J -= lr dJ
        return
    Vf = V.reshape(-1)
    if cfg.nesterov:
        lib.axpy(Vf, Jf, a=lr * s)                                     # J += lr mu vel_old
    fold(alpha / s, V)                                                 # vel = mu vel + dJ
    if wd:
        lib.axpy(Jf, Vf, a=wd / s)                                     # vel += wd J
    lib.axpy(Vf, Jf, a=-lr * (1 + mu) * s if cfg.nesterov else -lr * s)
    # J -= lr (1 + mu) vel with Nesterov, else J -= lr vel


def backward_update(lib: ScipyBlas, cfg: OptimConfig, lr: float, Js: tuple, Vs: tuple, s: float,
                    masks: tuple, buf: Buffers, act_name: str, first: list[Part]) -> None:
    """From S = m dA_K.T down to layer 1: dZ_{k-1} with the old W_k, then update layer k.
    `first` is the first input's parts, as forward_into had them."""
    m = buf.S.shape[1]
    top = len(buf.A)                                                   # index of the last layer
    inputs = (first, *([(0, 0, Z)] for Z in buf.Z[1:]))                # [1 | Z_{k-1}] of layer k
    if top:
        gemm_into(lib.gemm, 1.0 / m, buf.S, Js[top][1:], 0.0, buf.dA[-1], True, True)  # (m, h)
    alpha = 1.0 if top else float(buf.x_scale[0])                     # x_scale for [1 | X]
    sgd_fold(lib, cfg, lr, Js[top], Vs[top], s, alpha / m, inputs[top], buf.S, True)
    for k in reversed(range(top)):
        dA = buf.dA[k]                                                 # (m, h_k) dZ_k on entry
        if masks:
            np.multiply(dA, masks[k], out=dA)                          # through the dropout mask
        if act_name == "relu":
            np.multiply(dA, buf.positive[k], out=dA)                   # dA = dZ * phi'(A)
        else:
            np.multiply(dA, ACTIVATIONS[act_name].phi_prime(buf.A[k]), out=dA)
        if k:
            gemm_into(lib.gemm, 1.0, dA, Js[k][1:], 0.0, buf.dA[k - 1], trans_b=True)  # dZ_{k-1}
        alpha = 1.0 if k else float(buf.x_scale[0])
        sgd_fold(lib, cfg, lr, Js[k], Vs[k], s, alpha, inputs[k], dA, False)


# ---- a batch's first input in column blocks by extent -------------------------------------------

BLOCK_STARTS = (0.6, 0.9)  # the shares of a batch's rows (fewest pixels first) where a block starts
MIN_BLOCK_ROWS = 8         # no block starts closer than this to the first or the last row


def extent_blocks(idx: np.ndarray, extent: np.ndarray) -> tuple[np.ndarray, list, Any]:
    """The rows idx, fewest pixels first, the first input's blocks (lo, col0, w), and the
    sort: row j of the result is row by_extent[j] of idx (None when left unsorted).

    The rows sorted by extent, the rows lo:m of a block are those that need its columns
    col0:col0 + w: the first block has all rows and k_1 = 1 + the largest extent below the
    first start, the next the rows from that start on and the columns up to k_2, and so on.
    The order of a batch's rows changes no sum's terms, only their order.
    """
    rows = extent.take(idx)                                            # (m,)
    m = len(idx)
    starts = sorted({int(m * share) for share in BLOCK_STARTS
                     if MIN_BLOCK_ROWS <= int(m * share) <= m - MIN_BLOCK_ROWS})
    if not starts:
        return idx, [(0, 0, int(rows.max()) + 1)], None
    by_extent = rows.argsort(kind="stable")
    idx, rows = idx.take(by_extent), rows.take(by_extent)
    blocks, col0 = [], 0
    for lo, hi in zip([0, *starts], [*starts, m]):
        k = int(rows[hi - 1]) + 1                                      # [1 | pixels to extent]
        if k > col0:
            blocks.append((lo, col0, k - col0))
            col0 = k
    return idx, blocks, by_extent


# ---- the batch loader ----------------------------------------------------------------------------

class BatchLoader:
    """(X, y) of the shuffled rows idx: gathered as uint8, then scaled into a float buffer.

    X is bit for bit data.to_inputs(data.gather(...)) without augmentation. `load` writes into
    the arrays it is given; calling the loader writes into its own reused buffers. Either way
    X is overwritten by the next batch. The fast step gathers with `rows` and converts itself.
    """

    def __init__(self, config: Config):
        self.normalize, self.dtype = config.data.normalize, np.dtype(config.train.dtype)
        self.scale = self.dtype.type(1.0 / 255.0)
        self.U = np.empty((0, D), dtype=np.uint8)
        self.X = np.empty((0, D), dtype=self.dtype)
        self.y = np.empty(0, dtype=np.int32)

    def rows(self, images: np.ndarray, labels: np.ndarray, idx: np.ndarray,
             y: np.ndarray) -> np.ndarray:
        """The images' rows idx (m, d) uint8, in a reused buffer; their labels into y (m,)."""
        m = len(idx)
        if m > self.U.shape[0] or self.U.shape[1] != images.shape[1]:
            self.U = np.empty((m, images.shape[1]), dtype=np.uint8)
        U = self.U[:m]
        images.take(idx, axis=0, out=U, mode="clip")                   # (m, d) uint8
        labels.take(idx, out=y, mode="clip")                           # (m,)
        return U

    def scale_into(self, X: np.ndarray) -> None:
        """Pixels 0..255 to the inputs, in place: x / 255, standardised if asked."""
        np.multiply(X, self.scale, out=X)                              # x / 255
        standardize(X, self.normalize)

    def load(self, split: DeviceSplit, idx: np.ndarray, X: np.ndarray, y: np.ndarray) -> None:
        """X (m, d) and y (m,) of the rows idx, written in place."""
        np.copyto(X, self.rows(split.images, split.labels, idx, y))    # (m, d) as float
        self.scale_into(X)

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

    `prepare(params, state, split)` returns copies in the step's layout (module docstring), the
    pixel order taken from the training split; those take the fast path, and `export` gives
    them back as model.py has them. Any other parameters (say, arrays a test made) take the
    generic step, with the same result. `batch(split, idx)` loads a batch into the step's
    input buffer (through one reused uint8 buffer).
    """

    kind = "fast_cpu"

    def __init__(self, config: Config):
        self.config = config
        self.act_name = config.model.activation
        self.dtype = np.dtype(config.train.dtype)
        self.lib = ScipyBlas(*blas.get_blas_funcs(("gemm", "axpy", "scal"), dtype=self.dtype))
        self.widths = config.model.layer_widths
        self.buffers: dict[int, Buffers] = {}  # one set per batch size: the full and the last
        self.generic = generic_step(config)
        self.loader = BatchLoader(config)
        self.unit = config.data.normalize == "unit"
        # zero pixels may be left out only where the inputs keep them zero
        self.skips_zeros = self.unit and make_augment(config.data.augment) is None
        self.pixels = no_pixel_order()
        self.layout: tuple | None = None  # (params, state, Js, Vs) that `prepare` returned
        self.pixels_used = 0  # pixels the fast path multiplied, row by row, over all its steps
        self.row_order: Any = None  # the last batch's sort (extent_blocks), for dropout masks

    def prepare(self, params: Params, state: OptState,
                split: DeviceSplit | None = None) -> tuple[Params, OptState]:
        """Copies of params and SGD state in the step's layout, for the training split `split`."""
        if split is not None and self.skips_zeros:
            self.pixels = pixel_order(np.asarray(split.images))
        else:
            self.pixels = no_pixel_order()
        p, s = pack(params, state, self.pixels.order)
        self.layout = (p, s, *blocks_of(p, s))
        return p, s

    def export(self, params: Params, state: OptState) -> tuple[Params, OptState]:
        """Copies of what `prepare` returned, as model.py lays them out; others as they are."""
        if self.layout is None or params is not self.layout[0]:
            return params, state
        return unpack(params, state, self.pixels.order)

    def buffers_for(self, m: int) -> Buffers:
        buf = self.buffers.get(m)
        if buf is None:
            buf = self.buffers[m] = new_buffers(m, self.widths, self.dtype)
        return buf

    def batch(self, split: DeviceSplit, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of the rows idx, the inputs written into the step's first input.

        X (m, d) is the step's own handle on the batch, for this step only: a view of the
        buffer that holds the parts of the first input (`first_parts`, `as_given`): the rows
        fewest pixels first (y in the same order), the pixels in the run's order, zeros past
        each group's extent left out, and with data.normalize "unit" the pixels 0..255
        themselves (x / 255 is the alpha of the first products).
        """
        m, px = len(idx), self.pixels
        buf = self.buffers_for(m)
        y = buf.y if buf.y.dtype == split.labels.dtype else np.empty(m, split.labels.dtype)
        self.row_order = None
        if split.images is px.source:                                  # the prepared split
            idx, blocks, self.row_order = extent_blocks(idx, px.extent)
            U = self.loader.rows(px.images, split.labels, idx, y)      # (m, d) in pixel order
        else:
            U = self.loader.rows(split.images, split.labels, idx, y)   # (m, d)
            if px.source is not None:
                U = U.take(px.order, axis=1)                           # (m, d) in pixel order
            blocks = [(0, 0, U.shape[1] + 1)]
        parts = first_parts(buf, blocks)
        for lo, col0, Z in parts:                                      # pixels col0-1.. of U
            if col0:
                np.copyto(Z, U[lo:, col0 - 1:col0 - 1 + Z.shape[1]])   # (m - lo, w)
            else:
                np.copyto(Z[:, 1:], U[:, :Z.shape[1] - 1])             # (m, k_1 - 1)
        if not self.unit:
            self.loader.scale_into(parts[0][2])                        # the one block
        set_ones(parts, buf, float(self.loader.scale) if self.unit else 1.0)
        buf.parts[:] = parts
        return buf.Z[0][:, 1:], y

    def as_given(self, buf: Buffers) -> np.ndarray:
        """The inputs X (m, d) of the batch `batch` loaded last, as the generic step takes them."""
        X = np.zeros((buf.Z[0].shape[0], D), dtype=buf.Z[0].dtype)
        for lo, col0, Z in buf.parts:
            pixels = Z[:, 1:] if col0 == 0 else Z                      # (m - lo, w) pixels
            first = max(col0 - 1, 0)                                   # in the run's pixel order
            X[lo:, self.pixels.order[first:first + pixels.shape[1]]] = \
                pixels * Z.dtype.type(buf.x_scale[0])
        return X

    def matmul(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """A @ B (C-ordered, new) through the step's BLAS, for the evaluation (train.evaluate);
        NumPy's matmul where the two differ in dtype, or for one row or column."""
        if A.dtype != B.dtype or A.dtype != self.dtype or A.shape[0] == 1 or B.shape[1] == 1:
            return A @ B  # a row or a column: NumPy's gemv, whose bits a gemm does not give
        return self.lib.gemm(1.0, B.T, A.T).T                          # (m, n) C-ordered

    def next_scale(self, state: OptState) -> float:
        """s *= mu for this step's velocity (state.scale), multiplying V out before s gets tiny."""
        mu = self.config.optim.momentum
        if mu == 0:
            return 1.0
        if float(state.scale[0]) * mu < TINY_SCALE:                   # once in ~400 steps
            multiply_out(state)                                        # V *= s, s = 1
        state.scale[0] *= mu
        return float(state.scale[0])

    def __call__(self, params: Params, state: OptState, X: Any, y: Any, lr: float, t: int,
                 masks: tuple = ()) -> tuple[Any, Any]:
        buf = self.buffers_for(X.shape[0])
        own = X.base is buf.Z[0]                                       # from self.batch
        if own and masks and self.row_order is not None:  # the training loop drew row i's mask
            masks = tuple(M.take(self.row_order, axis=0) for M in masks)  # for shuffled row i
        if self.layout is None or params is not self.layout[0]:
            multiply_out(state)
            return self.generic(params, state, self.as_given(buf) if own else X, y, lr, t, masks)
        _, prepared_state, Js, Vs = self.layout
        if state is not prepared_state:
            raise ValueError("the optimizer state is not the one `prepare` returned with params")
        if not own:
            Z0 = buf.Z[0]                                              # (m, d + 1)
            np.copyto(Z0[:, 1:], X if self.pixels.source is None else X[:, self.pixels.order])
            buf.parts[:] = [(0, 0, Z0)]
            set_ones(buf.parts, buf, 1.0)
        first = buf.parts
        self.pixels_used += sum(Z.shape[0] * Z.shape[1] for _, _, Z in first) - X.shape[0]
        s = self.next_scale(state)
        forward_into(self.lib.gemm, Js, masks, buf, self.act_name, first)
        L, correct = softmax_ce_into(buf, y, self.config.train.label_smoothing)
        backward_update(self.lib, self.config.optim, lr, Js, Vs, s, masks, buf, self.act_name,
                        first)
        apply_max_norm(params, self.config.model.max_norm)
        return L, correct


def fast_step(config: Config) -> FastStep:
    """The fast step for a config that `supports` accepts."""
    return FastStep(config)
