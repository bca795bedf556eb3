"""The fast CPU step against the generic step: same equations, float32 tolerance.

Forward outputs, loss, dA2 and correct count, then whole steps (parameters and optimizer state
after several of them, a shorter last batch included) for every optimizer the fast path takes,
also on sparse images whose zero pixels the step leaves out; that `make_step` takes it by
default and the generic step where the fast one cannot follow; the batch loader against
gather + to_inputs; and `gpumlp bench` through click's CliRunner.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.linalg import blas

from gpumlp import fast_cpu
from gpumlp.activations import ACTIVATIONS
from gpumlp.backend import CPU
from gpumlp.bench import executed_gflop, synthetic_split
from gpumlp.cli import main
from gpumlp.config import build_config
from gpumlp.data import DeviceSplit, gather, to_inputs
from gpumlp.gradcheck import EPS, FLOOR, loss_of
from gpumlp.mnist import Mnist, Split, load_mnist
from gpumlp.model import (Params, correct_count, dropout_masks, forward, init_params,
                          loss_and_dA2)
from gpumlp.optim import init_state, multiply_out, unscaled
from gpumlp.step import batch_inputs, generic_step, make_step, prepare_state
from gpumlp.train import new_state, train
from numeric_helpers import central_difference

RTOL, ATOL = 1e-5, 1e-5  # float32: rounding of sums of a few hundred terms of order 1
H256 = "configs/h256.yaml"


def copy_params(params: Params) -> Params:
    return Params(tuple(w.copy() for w in params.W), tuple(b.copy() for b in params.b))


def sparse_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 784) uint8 like MNIST's: each image nonzero only inside a centred square of its own
    size, and there on about half of the pixels; a few blank images."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, half in enumerate(rng.integers(0, 12, n)):
        lo, hi = 14 - half, 14 + half
        square = rng.integers(0, 256, (hi - lo, hi - lo)) * (rng.random((hi - lo, hi - lo)) < 0.5)
        images[i, lo:hi, lo:hi] = square
    return images.reshape(n, 784)


def batch(rng: np.random.Generator, m: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    X = rng.integers(0, 256, (m, 784)).astype(dtype) / dtype(255)   # (m, d) like the inputs
    return X, rng.integers(0, 10, m).astype(np.int32)


def assert_close(actual, expected, what: str, rtol=RTOL, atol=ATOL) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, f"{what}[{i}] dtype"
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what}[{i}]")


# ---- the pieces ------------------------------------------------------------------------------------

@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gemm_into_writes_in_place_the_product_of_c_ordered_arrays(trans_a, trans_b, beta):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((7, 5) if not trans_a else (5, 7)).astype(np.float32)
    B = rng.standard_normal((5, 3) if not trans_b else (3, 5)).astype(np.float32)
    C = rng.standard_normal((7, 3)).astype(np.float32)
    expected = 2.0 * (A.T if trans_a else A) @ (B.T if trans_b else B) + beta * C
    before = C.__array_interface__["data"][0]
    fast_cpu.gemm_into(blas.sgemm, 2.0, A, B, beta, C, trans_a, trans_b)
    assert C.__array_interface__["data"][0] == before
    np.testing.assert_allclose(C, expected, rtol=1e-5, atol=1e-5)


def packed(params: Params, config, split: DeviceSplit | None = None):
    """A fast step, and copies of params and fresh optimizer state in its layout."""
    step = fast_cpu.fast_step(config)
    p, s = step.prepare(params, init_state(config.optim, params), split)
    return step, p, s


def test_pack_makes_each_layer_one_block_bias_first_w1_in_pixel_order_and_unpack_undoes_it():
    rng = np.random.default_rng(9)
    config = build_config(None, ["model.hidden=[32, 16]"])
    params = init_params((784, 32, 16, 10), "he", rng)
    state = init_state(config.optim, params)
    state = state._replace(m=tuple(rng.standard_normal(a.shape).astype(a.dtype) for a in state.m))
    order = rng.permutation(784)
    p, s = fast_cpu.pack(params, state, order)
    Js, Vs = fast_cpu.blocks_of(p, s)
    for k, (J, V) in enumerate(zip(Js, Vs)):
        assert J.shape == (params.W[k].shape[0] + 1, params.W[k].shape[1]) and J.flags.c_contiguous
        rows = order if k == 0 else slice(None)
        np.testing.assert_array_equal(J[1:], params.W[k][rows])
        np.testing.assert_array_equal(J[0], params.b[k])
        np.testing.assert_array_equal(V[1:], state.m[2 * k][rows])
        J[0, 0] = 7.0                                    # the bias is a view of the block
        assert p.b[k][0] == 7.0 and not np.shares_memory(p.b[k], params.b[k])
        J[0, 0] = params.b[k][0]
        assert np.shares_memory(V, s.m[2 * k]) and np.shares_memory(V, s.m[2 * k + 1])
    assert s.scale.tolist() == [1.0]
    back_p, back_s = fast_cpu.unpack(p, s, order)
    for a, e in zip(back_p.W + back_p.b + back_s.m, params.W + params.b + state.m):
        np.testing.assert_array_equal(a, e)              # a permutation: exact
        assert not np.shares_memory(a, p.W[0])


def test_pixel_order_puts_the_most_often_nonzero_pixels_first_and_measures_each_extent():
    rng = np.random.default_rng(13)
    images = sparse_images(rng, 300)
    px = fast_cpu.pixel_order(images, chunk=64)          # several chunks
    counts = np.count_nonzero(images, axis=0)
    assert sorted(px.order.tolist()) == list(range(784))
    assert (np.diff(counts[px.order]) <= 0).all()        # most often nonzero first
    np.testing.assert_array_equal(px.images, images[:, px.order])
    for i in range(300):
        nonzero = np.flatnonzero(px.images[i])
        assert px.extent[i] == (nonzero[-1] + 1 if nonzero.size else 0)
        assert not px.images[i, px.extent[i]:].any()
    assert (px.extent == 0).any() and px.extent.max() <= 22 * 22  # blank images; a zero border
    assert px.source is images


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("hidden", [(32,), (32, 16)])
def test_forward_into_gives_the_generic_pre_activations_activations_and_logits(activation, hidden):
    rng = np.random.default_rng(1)
    config = build_config(None, [f"model.hidden={list(hidden)}"])
    params = init_params((784, *hidden, 10), "he", rng)
    params = params._replace(b=tuple(rng.standard_normal(b.shape, dtype=np.float32)
                                     for b in params.b))
    X, _ = batch(rng, 20)
    masks = tuple((rng.random((20, h)) > 0.3).astype(np.float32) / np.float32(0.7) for h in hidden)
    act = ACTIVATIONS[activation]
    _, p, s = packed(params, config)
    Js, _ = fast_cpu.blocks_of(p, s)
    for ms in ((), masks):
        buf = fast_cpu.new_buffers(20, (784, *hidden, 10), np.dtype(np.float32))
        buf.Z[0][:, 1:] = X
        fast_cpu.forward_into(blas.sgemm, Js, ms, buf, activation, [(0, 0, buf.Z[0])])
        cache = forward(params, X, act, ms)
        assert_close(buf.A, cache.A[:-1], "A")
        assert_close([Z[:, 1:] for Z in buf.Z[1:]], cache.Z[1:-1], "Z")
        assert all((Z[:, 0] == 1).all() for Z in buf.Z)           # the columns of ones
        assert_close([buf.S.T], [cache.A[-1]], "logits")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_softmax_cross_entropy_gives_the_generic_loss_dA2_and_correct_count(smoothing):
    rng = np.random.default_rng(2)
    buf = fast_cpu.new_buffers(64, (784, 32, 10), np.dtype(np.float32))
    A2 = 4 * rng.standard_normal((64, 10)).astype(np.float32)
    A2[0] = 1e4                                          # a huge row: log-sum-exp keeps it finite
    A2[1] = 0.5                                          # a tie: the first maximum counts
    y = rng.integers(0, 10, 64).astype(np.int32)
    y[1] = 3
    buf.S[...] = A2.T
    L, correct = fast_cpu.softmax_ce_into(buf, y, smoothing)
    L_ref, dA2_ref = loss_and_dA2(A2, y, smoothing)
    assert np.isfinite(L) and L.dtype == np.float32
    np.testing.assert_allclose(L, L_ref, rtol=RTOL)
    np.testing.assert_allclose(buf.S.T / 64, dA2_ref, rtol=RTOL, atol=1e-7)  # S = m dA2.T
    assert correct == correct_count(A2, y) and 0 < correct < 64


# ---- whole steps -------------------------------------------------------------------------------------

OPTIMIZERS = {
    "plain": ["optim.momentum=0"],
    "plain_wd": ["optim.momentum=0", "optim.weight_decay=0.01"],
    "momentum": ["optim.nesterov=false"],
    "momentum_wd": ["optim.nesterov=false", "optim.weight_decay=0.01"],
    "nesterov": ["optim.nesterov=true"],
}
NETS = {
    "h1": ["model.hidden=32"],
    "h2": ["model.hidden=[32, 16]"],
    "h1_tanh_smooth_maxnorm": ["model.hidden=32", "model.activation=tanh",
                               "train.label_smoothing=0.1", "model.max_norm=0.5"],
}


def run_both(config, steps, m_last=None, masks_p=0.0, dtype=np.float32):
    """Run the fast and the generic step side by side from the same start; yield after each."""
    rng = np.random.default_rng(3)
    widths = (784, *config.model.hidden_widths, 10)
    gen_p = init_params(widths, "he", rng, np.dtype(dtype).name)
    gen_s = init_state(config.optim, gen_p)
    fast, fast_p, fast_s = packed(gen_p, config)         # copies, in the fast step's layout
    generic = generic_step(config)
    fast.generic = None                                  # the fast path, or fail loudly
    for t in range(1, steps + 1):
        m = m_last if (t == steps and m_last) else 40
        X, y = batch(rng, m, dtype)
        masks = tuple((rng.random((m, h)) >= masks_p).astype(dtype) / dtype(1 - masks_p)
                      for h in config.model.hidden_widths) if masks_p else ()
        lr = 0.1 * (1 + 0.1 * t)                         # changes every step, as a schedule does
        out_fast = fast(fast_p, fast_s, X, y, lr, t, masks)
        out_gen = generic(gen_p, gen_s, X, y, lr, t, masks)
        export_p, export_s = fast.export(fast_p, fast_s)
        yield out_fast, out_gen, (export_p, unscaled(export_s)), (gen_p, gen_s)


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fast_steps_match_the_generic_steps(optimizer, net):
    config = build_config(None, [*NETS[net], *OPTIMIZERS[optimizer]])
    assert fast_cpu.supports(config)
    start = None
    for (L, ok), (L_ref, ok_ref), (p, s), (p_ref, s_ref) in run_both(config, 6, m_last=17):
        start = start if start is not None else copy_params(p_ref)
        np.testing.assert_allclose(L, L_ref, rtol=RTOL)
        assert ok == ok_ref
        assert_close(p.W + p.b, p_ref.W + p_ref.b, "params")
        assert_close(s.m, s_ref.m, "velocity")
    moved = max(np.abs(w - w0).max() for w, w0 in zip(p_ref.W, start.W))
    assert moved > 1e-3                                  # the comparison is not of a standstill


def test_fast_step_with_dropout_masks_matches_the_generic_step():
    config = build_config(None, ["model.hidden=[32, 16]", "model.dropout=0.3"])
    for (L, ok), (L_ref, ok_ref), (p, s), (p_ref, s_ref) in run_both(config, 4, masks_p=0.3):
        np.testing.assert_allclose(L, L_ref, rtol=RTOL)
        assert ok == ok_ref
        assert_close(p.W + p.b, p_ref.W + p_ref.b, "params")
        assert_close(s.m, s_ref.m, "velocity")


def test_momentum_lives_in_a_velocity_scale_and_multiplying_it_out_gives_the_velocity():
    """vel *= mu is the scale's change (s = mu^t), so the stored arrays are vel / s."""
    config = build_config(None, ["model.hidden=32", "optim.nesterov=false"])
    rng = np.random.default_rng(10)
    params = init_params((784, 32, 10), "he", rng)
    ref_p, ref_s = copy_params(params), init_state(config.optim, params)
    step, p, s = packed(params, config)
    for t in range(1, 6):
        X, y = batch(rng, 40)
        step(p, s, X, y, 0.1, t, ())
        generic_step(config)(ref_p, ref_s, X, y, 0.1, t, ())
    assert s.scale[0] == pytest.approx(0.9 ** 5, rel=1e-12)
    assert np.abs(s.m[0] - ref_s.m[0]).max() > 1e-3                # stored: vel / s, not vel
    assert_close(unscaled(s).m, ref_s.m, "velocity")
    multiply_out(s)                                               # in place, as a fallback does
    assert s.scale[0] == 1.0
    assert_close(s.m, ref_s.m, "velocity")


@pytest.mark.parametrize("optimizer", ["momentum", "momentum_wd", "nesterov"])
def test_velocity_scale_multiplied_out_when_tiny_keeps_the_steps_equal(optimizer, monkeypatch):
    monkeypatch.setattr(fast_cpu, "TINY_SCALE", 0.5)               # every few steps, not every 400
    config = build_config(None, ["model.hidden=32", *OPTIMIZERS[optimizer]])
    scales = []
    next_scale = fast_cpu.FastStep.next_scale
    monkeypatch.setattr(fast_cpu.FastStep, "next_scale",
                        lambda step, state: scales.append(next_scale(step, state)) or scales[-1])
    for (L, ok), (L_ref, ok_ref), (p, s), (p_ref, s_ref) in run_both(config, 8):
        np.testing.assert_allclose(L, L_ref, rtol=RTOL)
        assert_close(p.W + p.b, p_ref.W + p_ref.b, "params")
        assert_close(s.m, s_ref.m, "velocity")
    # 0.9^7 = 0.48 would be below 0.5: the scale was multiplied out (to 1, then 0.9) on the way
    assert len(scales) == 8 and min(scales) >= 0.5 and scales.count(0.9) == 2, scales


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_steps_matmul_is_the_product_in_c_order_and_mixed_dtypes_go_to_numpy(dtype):
    step = make_step(build_config(None, ["model.hidden=8", f"train.dtype={dtype}"]), CPU)
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((37, 19)).astype(dtype), rng.standard_normal((19, 11)).astype(dtype)
    product = step.matmul(A, B)
    assert product.flags.c_contiguous and product.dtype == A.dtype
    np.testing.assert_allclose(product, A @ B, rtol=1e-5 if dtype == "float32" else 1e-12)
    other = np.float64 if dtype == "float32" else np.float32
    np.testing.assert_array_equal(step.matmul(A, B.astype(other)), A @ B.astype(other))
    for row, column in ((A[:1], B), (A, B[:, :1]), (A[:1], B[:, :1])):   # NumPy's gemv: its
        np.testing.assert_array_equal(step.matmul(row, column), row @ column)   # bits, kept


def test_the_epochs_evaluation_runs_on_the_steps_blas(tiny_mnist, monkeypatch, tmp_path):
    """NumPy's matmul runs on a second OpenBLAS (NumPy's), whose threads spin on for about
    0.1 s after the evaluation and took the cores from the next epoch's first steps: the
    evaluation goes through the step's own gemm, every product of it."""
    calls = []
    matmul = fast_cpu.FastStep.matmul
    monkeypatch.setattr(fast_cpu.FastStep, "matmul",
                        lambda step, A, B: calls.append(A.shape[0]) or matmul(step, A, B))
    config = build_config(None, ["model.hidden=[8, 8]", "data.val_size=50", "train.epochs=1",
                                 "train.batch_size=50", "train.eval_batch_size=40"])
    result = train(config, CPU, tiny_mnist.mnist)
    assert sum(calls) == 3 * (50 + 100) and result.history[0]["test_accuracy"] > 0
    calls.clear()                          # the probe before each mid-epoch checkpoint too
    checked = build_config(None, ["model.hidden=[8, 8]", "data.val_size=50", "train.epochs=1",
                                  "train.batch_size=50", "train.checkpoint_every=2"])
    train(checked, CPU, tiny_mnist.mnist, out_dir=tmp_path / "probed")
    assert sum(calls) == 3 * (2 * 100 + 50 + 100)       # two probes of the first 100 rows


def test_prepare_state_multiplies_the_scale_out_for_the_generic_step():
    config = build_config(None, ["model.hidden=8", "optim.name=adam"])
    state = new_state(config, CPU)
    state.opt = state.opt._replace(m=tuple(np.ones_like(a) for a in state.opt.m),
                                   scale=np.array([0.25]))
    prepare_state(make_step(config, CPU), state)
    assert state.opt.scale is None and all((a == 0.25).all() for a in state.opt.m)


def sparse_split(rng: np.random.Generator, n: int) -> DeviceSplit:
    return DeviceSplit(sparse_images(rng, n), rng.integers(0, 10, n).astype(np.int32))


@pytest.mark.parametrize("normalize,x_scale", [("unit", np.float32(1 / 255)),
                                               ("standard", np.float32(1))])
def test_step_batch_writes_the_inputs_in_column_blocks_without_the_rows_zero_pixels(
        normalize, x_scale):
    """The first input comes in column blocks (lo, col0, Z): the rows fewest pixels first, the
    pixels in the step's order; block by block, rows lo:m and the columns col0:col0 + w of
    [1 | X], the pixels past each row's last block all zero in that row and left out (only
    where zeros stay zeros: "unit"). With "unit" the buffer holds the pixels and x / 255 is the
    first gemms' alpha: the blocks times x_scale are the inputs, bit for bit, and the column of
    ones holds 1 / x_scale."""
    rng = np.random.default_rng(11)
    split, other = sparse_split(rng, 100), sparse_split(rng, 40)
    config = build_config(None, ["model.hidden=16", f"data.normalize={normalize}"])
    step = make_step(config, CPU)
    params = init_params((784, 16, 10), "he", rng)
    step.prepare(params, init_state(config.optim, params), split)
    order = step.pixels.order
    shapes = {}
    blank = np.flatnonzero(~split.images.any(axis=1))[:3]
    assert blank.size
    for name, source, idx in (("sparse", split, rng.permutation(100)[:96]),
                              ("small", split, np.arange(10)), ("blank", split, blank),
                              ("other", other, np.arange(40))):
        X, y = step.batch(source, idx)
        buf = step.buffers_for(len(idx))
        if source is split and normalize == "unit":
            idx = fast_cpu.extent_blocks(idx, step.pixels.extent)[0]   # the rows as loaded
        images, y_ref = gather(source, idx)
        inputs = to_inputs(images, normalize, "float32")[:, order]     # (m, d) in pixel order
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(step.as_given(buf)[:, order], inputs)
        assert X.shape == (len(idx), 784) and X.base is buf.Z[0]
        (lo, col0, Z0), end = buf.parts[0], 0
        assert lo == col0 == 0 and Z0.shape[0] == len(idx) and (Z0[:, 0] * x_scale == 1).all()
        for lo, col0, Z in buf.parts:
            assert col0 == end and Z.flags.c_contiguous and np.shares_memory(Z, buf.Z[0])
            pixels = Z[:, 1:] if col0 == 0 else Z
            first = max(col0 - 1, 0)
            np.testing.assert_array_equal(pixels * x_scale,
                                          inputs[lo:, first:first + pixels.shape[1]])
            assert not inputs[:lo, first:].any() or normalize != "unit"  # rows above: zeros
            end = col0 + Z.shape[1]
        assert not images[:, order[end - 1:]].any()                    # only zeros left out
        shapes[name] = [(lo, col0, Z.shape[1]) for lo, col0, Z in buf.parts]
    if normalize == "unit":
        sparse = shapes["sparse"]                        # blocks from rows 0, 57 and 86
        assert [lo for lo, _, _ in sparse] == [0, int(96 * 0.6), int(96 * 0.9)]
        assert sparse[-1][1] + sparse[-1][2] < 785
        assert len(shapes["small"]) == 1 and shapes["small"][0][2] < 785  # too few rows to split
        assert shapes["blank"] == [(0, 0, 1)] and shapes["other"] == [(0, 0, 785)]
    else:
        assert all(s == [(0, 0, 785)] for s in shapes.values())   # zeros are not zeros


SPARSE_HIDDEN = {"h1": (16,), "h2": (16, 8), "h3": (16, 8, 8)}


@pytest.mark.parametrize("net,optimizer", [("h1", "momentum"),
                                           *(("h2", name) for name in OPTIMIZERS),
                                           ("h3", "momentum"), ("h3", "nesterov")])
@pytest.mark.parametrize("dtype,rtol,atol", [("float32", RTOL, ATOL), ("float64", 1e-12, 1e-13)])
def test_fast_step_on_its_own_sparse_batches_given_inputs_or_falling_back_matches_generic(
        dtype, rtol, atol, net, optimizer):
    """On its own batches the step holds the pixels x and scales by 1 / 255 only the first
    layer's products ([1 | X]); every layer above reads [1 | Z], unscaled: with two and three
    hidden layers, each layer's update must still be the generic step's."""
    rng = np.random.default_rng(12)
    split = sparse_split(rng, 200)
    hidden = SPARSE_HIDDEN[net]
    config = build_config(None, [f"model.hidden={list(hidden)}", f"train.dtype={dtype}",
                                 *OPTIMIZERS[optimizer]])
    params = init_params((784, *hidden, 10), "he", rng, dtype)
    ref_p, ref_s = copy_params(params), init_state(config.optim, params)
    step, p, s = packed(params, config, split)
    assert fast_cpu.supports(config)
    unpacked_p, unpacked_s = copy_params(params), init_state(config.optim, params)
    assert step.pixels.source is split.images
    for t, own in enumerate([True, False, True, False], start=1):
        idx = rng.permutation(200)[:100]
        X_ref = to_inputs(split.images[idx], "unit", dtype)
        X, y = step.batch(split, idx) if own else (X_ref, split.labels[idx])
        if own:                                          # zero pixels left out; rows reordered
            parts = step.buffers_for(100).parts
            assert len(parts) == 3 and parts[-1][1] + parts[-1][2].shape[1] < 785
            assert sorted(y.tolist()) == sorted(split.labels[idx].tolist())
        out = step(p, s, X, y, 0.1, t, ())
        if own:                                          # not prepared: the generic step's turn
            step(unpacked_p, unpacked_s, *step.batch(split, idx), 0.1, t, ())
        else:
            generic_step(config)(unpacked_p, unpacked_s, X_ref, split.labels[idx], 0.1, t, ())
        ref = generic_step(config)(ref_p, ref_s, X_ref, split.labels[idx], 0.1, t, ())
        np.testing.assert_allclose(out[0], ref[0], rtol=rtol)
        assert out[1] == ref[1]
        export_p, export_s = step.export(p, s)
        assert_close(export_p.W + export_p.b, ref_p.W + ref_p.b, "params", rtol, atol)
        assert_close(unscaled(export_s).m, ref_s.m, "velocity", rtol, atol)
        assert_close(unpacked_p.W + unpacked_p.b, ref_p.W + ref_p.b, "generic params", rtol, atol)


@pytest.mark.parametrize("hidden, m", [((12,), 48), ((12, 8), 48), ((12, 8, 6), 1)])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fast_step_gradients_are_the_central_differences_float64(activation, hidden, m):
    """The fast step's own gradients against central differences of the loss, not against the
    generic step: in float64, plain SGD with lr 1 moves every parameter by minus its gradient,
    so theta_before - theta_after is the step's dtheta. On its own sparse batch (zero pixels
    left out, rows reordered), with dropout masks and label smoothing; entries sampled per
    parameter, every W_k and b_k; three hidden layers on a batch of one too."""
    rng = np.random.default_rng(13)
    split = sparse_split(rng, 64)
    config = build_config(None, [f"model.hidden={list(hidden)}", f"model.activation={activation}",
                                 "train.dtype=float64", "optim.momentum=0", "model.dropout=0.25",
                                 "train.label_smoothing=0.1"])
    widths = (784, *hidden, 10)
    params = init_params(widths, "xavier", rng, "float64")
    params = Params(params.W, tuple(rng.normal(0, 0.1, v.shape) for v in params.b))
    before = copy_params(params)
    step, p, s = packed(params, config, split)
    step.generic = None                                  # the fast path, or fail loudly
    idx = rng.permutation(64)[:m]
    X, y = step.batch(split, idx)                        # rows sorted by extent
    masks = dropout_masks(rng, m, hidden, 0.25, np.float64)
    step(p, s, X, y, 1.0, 1, masks)
    after, _ = step.export(p, s)
    assert step.buffers_for(m).parts[-1][1] + step.buffers_for(m).parts[-1][2].shape[1] < 785

    # the loss of the batch in the loop's row order: the step sorts rows and masks alike
    if m > 1:
        assert step.row_order is not None and (step.row_order != np.arange(m)).any()
    X_ref, y_ref = to_inputs(split.images[idx], "unit", np.float64), split.labels[idx]
    act = ACTIVATIONS[activation]
    loss = lambda: loss_of(before, X_ref, y_ref, act, masks, 0.1)[0]  # noqa: E731
    for k in range(len(widths) - 1):
        for name, theta, new in ((f"W{k + 1}", before.W[k], after.W[k]),
                                 (f"b{k + 1}", before.b[k], after.b[k])):
            step_grad = (theta - new).reshape(-1)
            flat_theta = theta.reshape(-1)
            entries = rng.choice(flat_theta.size, min(25, flat_theta.size), replace=False)
            if name == "W1":                             # and the rows of pixels in the batch
                entries = np.concatenate([entries, np.flatnonzero(step_grad)[:25]])
            numeric = np.array([central_difference(loss, flat_theta, i, EPS) for i in entries])
            analytic = step_grad[entries]
            assert np.abs(analytic).max() > 1e-6, name  # the comparison is not of zeros
            error = np.abs(analytic - numeric) / np.maximum(
                np.maximum(np.abs(analytic), np.abs(numeric)), FLOOR)
            assert error.max() < 1e-6, (name, error.max())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fast_step_weight_decay_is_the_central_difference_of_the_decayed_loss_float64(momentum):
    """The fast step's own weight decay (J_k = [b_k; W_k] decayed whole: a scal without
    momentum, an axpy into the scaled velocity with it) against central differences of
    L + wd/2 sum ||theta||^2, not against the generic step: in float64, from zero velocity, one
    SGD step with lr 0.5 moves every parameter, biases included, by minus lr times that loss's
    gradient."""
    wd, lr, rng = 0.3, 0.5, np.random.default_rng(14)
    config = build_config(None, ["model.hidden=[12, 8]", "model.activation=tanh",
                                 "train.dtype=float64", f"optim.momentum={momentum}",
                                 "optim.nesterov=false", f"optim.weight_decay={wd}"])
    params = init_params((784, 12, 8, 10), "xavier", rng, "float64")
    params = Params(params.W, tuple(rng.normal(0, 0.5, v.shape) for v in params.b))
    before = copy_params(params)
    step, p, s = packed(params, config)
    step.generic = None                                  # the fast path, or fail loudly
    X, y = batch(rng, 16, np.float64)
    step(p, s, X, y, lr, 1)
    after, _ = step.export(p, s)
    act = ACTIVATIONS["tanh"]

    def decayed():
        return loss_of(before, X, y, act)[0] + wd / 2 * sum(
            float((theta * theta).sum()) for theta in before.W + before.b)

    for theta, new in zip(before.W + before.b, after.W + after.b):
        step_grad, flat_theta = (theta - new).reshape(-1) / lr, theta.reshape(-1)
        entries = rng.choice(flat_theta.size, min(25, flat_theta.size), replace=False)
        numeric = np.array([central_difference(decayed, flat_theta, i, EPS) for i in entries])
        analytic, decay = step_grad[entries], wd * flat_theta[entries]
        error = lambda g: np.abs(g - numeric) / np.maximum(  # noqa: E731
            np.maximum(np.abs(g), np.abs(numeric)), FLOOR)
        assert error(analytic).max() < 1e-6, (theta.shape, error(analytic).max())
        assert error(analytic - decay).max() > 1e-2      # the decay is no rounding error


def test_fast_step_refuses_prepared_params_with_another_optimizer_state():
    config = build_config(None, ["model.hidden=8"])
    rng = np.random.default_rng(14)
    step, p, s = packed(init_params((784, 8, 10), "he", rng), config)
    X, y = batch(rng, 5)
    with pytest.raises(ValueError, match="prepare"):
        step(p, init_state(config.optim, p), X, y, 0.1, 1, ())


def test_fast_step_in_float64_matches_the_generic_step_to_float64_precision():
    config = build_config(None, ["model.hidden=32", "train.dtype=float64"])
    for (L, _), (L_ref, _), (p, s), (p_ref, s_ref) in run_both(config, 4, dtype=np.float64):
        np.testing.assert_allclose(L, L_ref, rtol=1e-12)
        assert_close(p.W + p.b, p_ref.W + p_ref.b, "params", rtol=1e-12, atol=1e-13)
        assert_close(s.m, s_ref.m, "velocity", rtol=1e-12, atol=1e-13)


def test_fast_step_given_unpacked_fortran_ordered_weights_still_updates_them():
    """Arrays not in `pack`'s layout take the generic step; the update must not be lost, and
    `export` gives them back as they are (a checkpoint of them holds the update)."""
    config = build_config(None, ["model.hidden=16"])
    rng = np.random.default_rng(7)
    params = init_params((784, 16, 10), "he", rng)
    params = Params(tuple(np.asfortranarray(w) for w in params.W), params.b)
    start, expected = copy_params(params), copy_params(params)
    state, state_ref = init_state(config.optim, params), init_state(config.optim, expected)
    X, y = batch(rng, 30)
    step = fast_cpu.fast_step(config)
    step(params, state, X, y, 0.1, 1, ())
    generic_step(config)(expected, state_ref, X, y, 0.1, 1, ())
    assert np.abs(params.W[0] - start.W[0]).max() > 1e-4
    assert_close(params.W + params.b, expected.W + expected.b, "params")
    for prepared in (False, True):   # model.py's layout already, not what prepare returned
        if prepared:
            step.prepare(copy_params(params), init_state(config.optim, params))
        exported_p, exported_s = step.export(params, state)
        assert exported_p is params and exported_s is state                # as they are


def test_fast_step_given_an_unpacked_strided_bias_and_velocity_still_updates_them():
    """A strided b or velocity is not `pack`'s layout either: the generic step, same result."""
    config = build_config(None, ["model.hidden=16"])
    rng = np.random.default_rng(8)
    params = init_params((784, 16, 10), "he", rng)
    strided = lambda v: np.repeat(v, 2)[::2]  # noqa: E731  (same values, not contiguous)
    params = Params(params.W, tuple(strided(v + 0.1) for v in params.b))
    expected = copy_params(params)
    state, state_ref = init_state(config.optim, params), init_state(config.optim, expected)
    state = state._replace(m=tuple(strided(v) if v.ndim == 1 else v for v in state.m))
    X, y = batch(rng, 30)
    for t in (1, 2):
        fast_cpu.fast_step(config)(params, state, X, y, 0.1, t, ())
        generic_step(config)(expected, state_ref, X, y, 0.1, t, ())
    assert_close(params.W + params.b, expected.W + expected.b, "params")
    assert_close(state.m, state_ref.m, "velocity")


# ---- the choice of step ------------------------------------------------------------------------------

def test_make_step_takes_the_fast_path_by_default_for_h256_on_the_cpu():
    step = make_step(build_config(H256), CPU)
    assert step.kind == "fast_cpu"
    assert step.batch is not None


@pytest.mark.parametrize("overrides", [["optim.name=adam"], ["optim.name=adamw"],
                                       ["optim.nesterov=true", "optim.weight_decay=0.001"]])
def test_make_step_keeps_the_generic_step_where_dW_itself_is_needed(overrides):
    config = build_config(H256, overrides)
    assert not fast_cpu.supports(config)
    assert make_step(config, CPU).kind == "generic"


@pytest.mark.parametrize("momentum", ["1e-30", "1e-46"])
def test_a_momentum_below_the_velocitys_scale_floor_trains_on_the_generic_step(momentum):
    """s = mu after a multiply-out: a momentum below TINY_SCALE would make the fold's alpha / s
    overflow and lr s round to 0 in float32 (the weights never moved, the velocity went NaN).
    Such a config takes the generic step, which trains as with a momentum of 0."""
    rng = np.random.default_rng(16)
    images = sparse_images(rng, 160)
    labels = rng.integers(0, 10, 160).astype(np.uint8)
    mnist = Mnist(Split(images[:128], labels[:128]), Split(images[128:], labels[128:]))
    base = ["model.hidden=24", "train.epochs=1", "train.batch_size=32", "optim.nesterov=false"]
    config = build_config(None, [*base, f"optim.momentum={momentum}"])
    assert config.optim.momentum > 0 and not fast_cpu.supports(config)
    assert make_step(config, CPU).kind == "generic"
    tiny = train(config, CPU, mnist)
    none = train(build_config(None, [*base, "optim.momentum=0"]), CPU, mnist)
    assert_close(tiny.params.W + tiny.params.b, none.params.W + none.params.b, "params")
    start = new_state(config, CPU).params
    assert not np.array_equal(tiny.params.b[0], start.b[0])       # it trained


@pytest.mark.parametrize("extra", [[], ["model.dropout=0.3"], ["model.hidden=[24, 12]"],
                                   ["model.hidden=[24, 12, 8]", "model.dropout=0.3"],
                                   ["model.hidden=[24, 12]", "optim.nesterov=false",
                                    "optim.momentum=0", "optim.weight_decay=0.01"]])
def test_trained_run_with_the_fast_step_matches_the_generic_step(extra, monkeypatch):
    """The whole loop (loader included) against the generic step with gather + to_inputs;
    with dropout, each example gets the mask the loop drew for its row of the shuffled batch
    (the fast step sorts the rows; the masks follow). With two and three hidden layers, the
    layers above the first (which read activations, not the pixels) train as the generic
    step trains them."""
    import gpumlp.train as train_module

    rng = np.random.default_rng(4)
    images = sparse_images(rng, 250)                    # zero pixels left out, batch by batch
    labels = rng.integers(0, 10, 250).astype(np.uint8)
    mnist = Mnist(Split(images[:200], labels[:200]), Split(images[200:], labels[200:]))
    config = build_config(None, ["model.hidden=24", "train.epochs=2", "train.batch_size=64",
                                 "optim.nesterov=true", "optim.schedule=cosine", *extra])
    assert make_step(config, CPU).kind == "fast_cpu"

    def fast_only(config, backend):                     # no silent fallback to the generic step
        step = make_step(config, backend)
        step.generic = None
        return step

    monkeypatch.setattr(train_module, "make_step", fast_only)
    fast = train(config, CPU, mnist)                    # 200 = 3 x 64 + a last batch of 8
    monkeypatch.setattr(train_module, "make_step", lambda config, backend: generic_step(config))
    generic = train(config, CPU, mnist)
    assert_close(fast.params.W + fast.params.b, generic.params.W + generic.params.b, "params",
                 atol=1e-5)
    for row, ref in zip(fast.history, generic.history):
        np.testing.assert_allclose(row["train_loss"], ref["train_loss"], rtol=1e-5)
        assert row["train_accuracy"] == ref["train_accuracy"]


@pytest.mark.parametrize("overrides", [["data.augment.shift=2"], ["data.normalize=standard"]])
def test_fast_step_keeps_every_pixel_where_zeros_do_not_stay_zero(overrides, monkeypatch):
    """Augmented or standardised inputs have no zeros to skip: no pixel order, one full block,
    and the whole run still matches the generic step."""
    import gpumlp.train as train_module

    rng = np.random.default_rng(15)
    images = sparse_images(rng, 160)
    labels = rng.integers(0, 10, 160).astype(np.uint8)
    mnist = Mnist(Split(images[:128], labels[:128]), Split(images[128:], labels[128:]))
    config = build_config(None, ["model.hidden=16", "train.epochs=1", "train.batch_size=32",
                                 *overrides])
    step = make_step(config, CPU)
    params = init_params((784, 16, 10), "he", rng)
    step.prepare(params, init_state(config.optim, params), DeviceSplit(images, labels))
    assert step.pixels.source is None and (step.pixels.order == np.arange(784)).all()
    fast = train(config, CPU, mnist)
    monkeypatch.setattr(train_module, "make_step", lambda config, backend: generic_step(config))
    generic = train(config, CPU, mnist)
    assert_close(fast.params.W + fast.params.b, generic.params.W + generic.params.b, "params")


# ---- the batch loader --------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["unit", "standard"])
def test_batch_loader_gives_gather_and_to_inputs_also_for_a_shorter_last_batch(normalize):
    rng = np.random.default_rng(5)
    split = DeviceSplit(rng.integers(0, 256, (100, 784), dtype=np.uint8),
                        rng.integers(0, 10, 100).astype(np.int32))
    config = build_config(None, [f"data.normalize={normalize}"])
    loader = fast_cpu.BatchLoader(config)
    perm = rng.permutation(100)
    for idx in (perm[:64], perm[64:]):
        X, y = loader(split, idx)
        images, y_ref = gather(split, idx)
        assert X.dtype == np.float32 and X.shape == (len(idx), 784)
        np.testing.assert_array_equal(X, to_inputs(images, normalize, "float32"))
        np.testing.assert_array_equal(y, y_ref)


def test_batch_inputs_falls_back_to_gather_when_augmenting_or_without_a_loader():
    rng = np.random.default_rng(6)
    split = DeviceSplit(rng.integers(0, 256, (30, 784), dtype=np.uint8),
                        rng.integers(0, 10, 30).astype(np.int32))
    config = build_config(None, ["model.hidden=8"])
    step, idx = make_step(config, CPU), np.arange(10, 20)
    seen = []

    def augment(X, rng):
        seen.append(X.shape)
        return 1 - X

    X, _ = batch_inputs(step, split, idx, config, augment, None)
    assert seen == [(10, 784)]
    unit = to_inputs(split.images[10:20], "unit", "float32")
    np.testing.assert_array_equal(X, 1 - unit)
    plain_function = lambda *args: None  # noqa: E731  (a step with no loader)
    X2, y2 = batch_inputs(plain_function, split, idx, config, None, None)
    np.testing.assert_array_equal(X2, unit)
    np.testing.assert_array_equal(y2, split.labels[10:20])


# ---- the benchmark -------------------------------------------------------------------------------------

def test_executed_flops_of_an_h256_epoch_are_the_issue_s_49_1_gflop():
    assert executed_gflop((784, 256, 10), 60000) == pytest.approx(49.09, abs=0.01)


def separable_split(n: int = 640, seed: int = 0) -> DeviceSplit:
    """uint8 images whose label k lights pixels 78 k to 78 k + 77, over noise: a net learns it
    in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 784)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 78 * k:78 * k + 78] = 255
    return DeviceSplit(images, labels)


def torch_or_skip():
    """PyTorch, or a skip that says why: not installed, or installed but not loadable (as the
    bench says; pytest's importorskip skips only the first before pytest 8.2)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 (a broken install raises OSError, as bench says)
        pytest.skip(f"PyTorch is not installed or cannot be loaded ({e}): the bench's "
                    "comparison side was not run")
    return torch


def test_the_benchs_pytorch_side_trains_the_same_784_h_10_relu_net():
    """What the bench times against: PyTorch eager training the seed's net (784-h-10, ReLU),
    which learns. Skipped where PyTorch is not installed (CI: its wheel with CUDA's libraries is
    gigabytes); the GPU check runs it on the GPU host through the bench."""
    torch = torch_or_skip()
    from gpumlp.bench import torch_runner

    split = separable_split()
    epoch = torch_runner(torch, "cpu", split, 16, 32, seed=0)
    shapes = [tuple(p.shape) for p in epoch.net.parameters()]
    assert shapes == [(16, 784), (16,), (10, 16), (10,)]
    assert [type(m).__name__ for m in epoch.net] == ["Linear", "ReLU", "Linear"]

    def accuracy() -> float:
        with torch.no_grad():
            X = torch.from_numpy(split.images.astype(np.float32) / 255)
            return float((epoch.net(X).argmax(1).numpy() == split.labels).mean())
    before = accuracy()
    for _ in range(3):
        epoch()
    assert before < 0.5 < 0.95 < accuracy(), (before, accuracy())


def test_bench_with_pytorch_on_the_cpu_gives_both_rows_and_their_ratio():
    torch = torch_or_skip()
    args = ["bench", "--device", "cpu", "--data", "synthetic", "--hidden", "8", "--batch", "16",
            "--samples", "64", "--repeats", "2", "--torch", "--threads", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| 8 |")]
    assert [[c.strip() for c in row[:3]] for row in rows] == [["8", "16", "gpumlp"],
                                                               ["8", "16", "torch"]]
    assert float(rows[0][-1]) > 0 and rows[1][-1].strip() == "-"  # gpumlp's epoch / torch's
    assert int(rows[1][4].replace(",", "")) > 0                   # torch's samples/s
    assert f"torch {torch.__version__}" in result.stdout           # its version
    assert "; torch 1; gpumlp step:" in result.stdout              # and its threads
    assert "--torch --threads 1" in result.stdout.split("reproduce:")[1]


def test_bench_prints_a_table_and_the_command_that_reproduces_it():
    args = ["bench", "--device", "cpu", "--data", "synthetic", "--hidden", "8", "--batch", "16",
            "--batch", "24", "--samples", "64", "--repeats", "2", "--no-torch"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "| h | batch | impl | s/epoch | samples/s | GFLOP/s | % of sgemm | gpumlp/torch |" in out
    rows = [line for line in out.splitlines() if line.startswith("| 8 |")]
    assert [row.split("|")[2:4] for row in rows] == [[" 16 ", " gpumlp "], [" 24 ", " gpumlp "]]
    assert "sgemm" in out and "synthetic uint8 64x784" in out
    assert "median of 2 timings of 1 epoch (no torch to compare)" in out
    assert "gpumlp/torch" not in out.split("| h |")[0]      # the header: no ratio to explain
    assert ("reproduce: gpumlp bench --device cpu --data synthetic --hidden 8 --batch 16 "
            "--batch 24 --epochs 1 --repeats 2 --samples 64 --no-torch") in out


def test_the_bench_header_explains_the_ratio_when_torch_was_timed():
    from gpumlp.bench import BenchSpec
    from gpumlp.cli_bench import header_lines

    result = {"torch": "2.13.0", "torch_note": "", "torch_threads": 2, "blas_threads": [],
              "sgemm_gflops": 100.0, "gpumlp_step": "fast_cpu"}
    lines = header_lines(CPU, result, BenchSpec(hidden=(8,), batch=(16,), repeats=3))
    data = next(line for line in lines if line.startswith("data "))
    assert data.endswith("median of 3 interleaved timings of 1 epoch; gpumlp/torch: median "
                         "of the 3 rounds' ratios of gpumlp's epoch to torch's (below 1: gpumlp "
                         "is faster)")
    lines = header_lines(CPU, result, BenchSpec(hidden=(8,), batch=(16,), repeats=1, epochs=2))
    data = next(line for line in lines if line.startswith("data "))
    assert data.endswith("one timing of 2 epochs; gpumlp/torch: the round's ratio of gpumlp's "
                         "epoch to torch's (below 1: gpumlp is faster)")


def stub_cupy(runtime: int = 13000, driver: int = 13020, version: str = "14.2.0"):
    """What cuda_versions reads of CuPy."""
    import types
    versions = types.SimpleNamespace(runtimeGetVersion=lambda: runtime,
                                     driverGetVersion=lambda: driver)
    return types.SimpleNamespace(__version__=version, cuda=types.SimpleNamespace(runtime=versions))


def test_cuda_versions_reads_cudas_encoding_and_says_what_is_missing(monkeypatch):
    from gpumlp import backend
    from gpumlp.backend import cuda_versions

    assert cuda_versions(stub_cupy(12080, 13020)) == "CUDA runtime 12.8, driver 13.2"
    assert cuda_versions(stub_cupy(13000, 0)) == "CUDA runtime 13.0, driver none"  # no driver
    broken = stub_cupy()
    broken.cuda.runtime.driverGetVersion = lambda: (_ for _ in ()).throw(
        RuntimeError("libcudart.so.13: cannot open\nmore"))
    assert cuda_versions(broken) == "unknown (RuntimeError: libcudart.so.13: cannot open)"
    monkeypatch.setattr(backend, "_import_cupy", lambda: None)
    monkeypatch.setattr(backend, "CUPY_IMPORT", [])
    assert cuda_versions() == "- (no CuPy)"
    monkeypatch.setattr(backend, "CUPY_IMPORT", ["OSError: libcuda.so.1: cannot open"])
    assert cuda_versions() == "- (CuPy cannot be loaded)"     # installed: not "no CuPy"


def test_the_bench_header_on_a_gpu_names_cupy_and_the_cuda_versions():
    """The GPU's table is recorded with its versions: CuPy's and CUDA's are in its header."""
    from gpumlp.backend import Backend
    from gpumlp.bench import BenchSpec
    from gpumlp.cli_bench import header_lines

    gpu = Backend(stub_cupy(), "cuda:0", "cuda:0 (NVIDIA H200)")
    result = {"torch": "2.11.0+cu130", "torch_note": "", "torch_threads": 16, "blas_threads": [],
              "sgemm_gflops": 50000.0, "gpumlp_step": "fused_cuda"}
    lines = header_lines(gpu, result, BenchSpec(hidden=(256,), batch=(128,), repeats=3))
    versions = next(line for line in lines if line.startswith("versions "))
    assert versions.endswith(", cupy 14.2.0 (CUDA runtime 13.0, driver 13.2), torch 2.11.0+cu130")
    assert lines[1].startswith("device    cuda:0 (NVIDIA H200); CPU ")
    cpu = header_lines(CPU, result, BenchSpec(hidden=(256,), batch=(128,), repeats=3))
    assert "cupy" not in next(line for line in cpu if line.startswith("versions "))


def test_bench_runs_on_the_first_mnist_images_by_default(tiny_data_dir, monkeypatch):
    """MNIST's zero pixels are what the fast step skips: the benchmark trains on MNIST itself."""
    import gpumlp.bench as bench_module

    seen = []
    real = bench_module.gpumlp_runner
    monkeypatch.setattr(bench_module, "gpumlp_runner",
                        lambda backend, split, *rest: seen.append(split) or real(backend, split,
                                                                                   *rest))
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data-dir", str(tiny_data_dir),
                                       "--hidden", "8", "--batch", "16", "--samples", "200",
                                       "--repeats", "1", "--no-torch"])
    assert result.exit_code == 0, result.output
    assert "MNIST, the first 200 training images" in result.stdout
    assert "reproduce: gpumlp bench --device cpu --data mnist --hidden 8" in result.stdout
    first = load_mnist(tiny_data_dir).train
    np.testing.assert_array_equal(seen[0].images, first.images[:200])
    np.testing.assert_array_equal(seen[0].labels, first.labels[:200])
    too_many = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data-dir",
                                         str(tiny_data_dir), "--samples", "301", "--batch", "64",
                                         "--no-torch"])
    assert too_many.exit_code == 2
    assert "--samples 301" in too_many.output and "300" in too_many.output
    assert "Traceback" not in too_many.output


def test_bench_counts_the_flops_the_fast_step_executes_not_those_it_skips():
    from gpumlp.bench import BenchSpec, run_bench

    rng = np.random.default_rng(16)
    spec = BenchSpec(hidden=(8,), batch=(32,), repeats=2, samples=160, torch=False)
    model = executed_gflop((784, 8, 10), 160)
    sparse = run_bench(spec, CPU, sparse_split(rng, 160))["rows"][0]
    dense = run_bench(spec, CPU)["rows"][0]                        # random pixels: none skipped
    assert sparse.impl == dense.impl == "gpumlp"
    assert 0.2 * model < sparse.gflop < 0.8 * model
    assert 0.99 * model <= dense.gflop <= model


def test_bench_takes_the_best_sgemm_rate_of_the_start_and_the_end(monkeypatch):
    """One reference taken in a slow phase at the start gave shares of it above 100%."""
    import gpumlp.bench as bench_module

    rates = iter([50.0, 80.0])
    monkeypatch.setattr(bench_module, "sgemm_rate", lambda backend: next(rates))
    spec = bench_module.BenchSpec(hidden=(8,), batch=(32,), repeats=1, samples=64, torch=False)
    assert bench_module.run_bench(spec, CPU)["sgemm_gflops"] == 80.0
    assert next(rates, None) is None                               # measured twice, no more


def test_bench_refuses_more_rows_per_batch_than_samples():
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data", "synthetic",
                                       "--hidden", "8", "--batch", "128", "--samples", "64",
                                       "--no-torch"])
    assert result.exit_code == 2
    assert "--samples 64" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, said", [
    (["--samples", "70000"], "Error: --samples 70000: MNIST has 60000 training images; give at "
                             "most 60000, or --data synthetic for more\n"),
    (["--data", "synthetic", "--data-dir", "nowhere"],
     "Error: --data-dir is read with --data mnist only; drop it, or drop --data synthetic\n")])
def test_bench_refuses_data_options_it_cannot_use_before_reading_any_data(monkeypatch, args,
                                                                          said):
    """--samples 70000 was refused only once the training files were read (or downloaded), and
    a --data-dir beside --data synthetic went unused without a word."""
    import gpumlp.cli_bench as cli_bench

    monkeypatch.setattr(cli_bench, "load_mnist_for", lambda *a, **k: pytest.fail("data read"))
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", *args])
    assert (result.exit_code, result.stderr) == (2, said)


def test_bench_on_synthetic_data_leaves_a_data_dir_set_in_the_environment_alone():
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data", "synthetic",
                                       "--hidden", "8", "--batch", "100", "--samples", "200",
                                       "--repeats", "1", "--no-torch"],
                                env={"GPUMLP_DATA_DIR": "nowhere"})
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("threads, said", [
    ("4000", "--threads 4000: lib"),                               # past OpenBLAS's maximum
    ("4294967297", "'--threads': 4294967297 is not in the range")])  # would wrap to 1 in a C int
def test_bench_refuses_more_threads_than_the_blas_runs_rather_than_time_another_count(
        threads, said):
    """In a child process: OpenBLAS keeps the count it was set to, which would slow the tests
    after this one."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "gpumlp", "bench", "--device", "cpu",
                             "--data", "synthetic", "--hidden", "8", "--batch", "64", "--samples",
                             "128", "--repeats", "1", "--no-torch", "--threads", threads],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert len(result.stderr.splitlines()) == 1 and said in result.stderr
    if threads == "4000":  # NumPy 2's libscipy_openblas64_, SciPy 1.9's libopenblasp, ...
        assert re.search(r"--threads 4000: lib\S*openblas\S* runs at most \d+ threads; give "
                         r"--threads \d+ or fewer$", result.stderr.rstrip()), result.stderr


def test_bench_ratio_is_the_median_of_each_round_s_ratio_not_the_ratio_of_medians():
    """A round's two epochs run back to back: their ratio sees one state of the machine."""
    from gpumlp.bench import Row, paired_ratio
    from gpumlp.cli_bench import table_lines

    ours = Row("gpumlp", 256, 128, seconds=[1.0, 10.0, 1.0], gflop=49.1, samples=60000)
    theirs = Row("torch", 256, 128, seconds=[2.0, 20.0, 20.0], gflop=49.1, samples=60000)
    assert paired_ratio(ours, theirs) == 0.5             # rounds: 0.5, 0.5, 0.05
    assert ours.epoch_s / theirs.epoch_s == 0.05         # what the medians alone would say
    lines = table_lines({"rows": [ours, theirs], "sgemm_gflops": 200.0})
    assert lines[2].endswith("| 0.500 |") and lines[3].endswith("| - |")


def test_fast_step_given_exported_params_and_a_scaled_velocity_continues_as_the_generic_step():
    """`export` gives the velocity back as stored, vel / s with its scale s beside it; a step
    on those arrays (not `prepare`'s, so the generic step) must multiply s out first."""
    config = build_config(None, ["model.hidden=16", "optim.nesterov=false"])
    rng = np.random.default_rng(11)
    step, p, s = packed(init_params((784, 16, 10), "he", rng), config)
    for t in (1, 2, 3):
        step(p, s, *batch(rng, 30), 0.1, t, ())
    p_out, s_out = step.export(p, s)
    assert s_out.scale[0] == pytest.approx(0.9 ** 3)                 # a scaled velocity
    p_ref, s_ref = copy_params(p_out), unscaled(s_out)
    for t in (4, 5):
        X, y = batch(rng, 30)
        step(p_out, s_out, X, y, 0.1, t, ())                          # the generic fallback
        generic_step(config)(p_ref, s_ref, X, y, 0.1, t, ())
    assert_close(p_out.W + p_out.b, p_ref.W + p_ref.b, "params")
    assert_close(unscaled(s_out).m, s_ref.m, "velocity")


# ---- the benchmark's numbers, from a mutation run of the use side -------------------------------

def test_the_bench_table_s_rates_are_over_the_median_epoch():
    from gpumlp.bench import Row
    from gpumlp.cli_bench import table_lines

    row = Row("gpumlp", 256, 128, seconds=[2.0, 1.0, 4.0], gflop=50.0, samples=60000)
    line = table_lines({"rows": [row], "sgemm_gflops": 100.0})[2]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    #            h    batch   impl     s/epoch  samples/s GFLOP/s % of sgemm  ratio
    assert cells == ["256", "128", "gpumlp", "2.000", "30,000", "25.0", "25%", "-"]


def test_a_skipped_pixel_saves_the_forward_and_the_dw1_product_of_its_row():
    from gpumlp.bench import skipped_gflop
    assert skipped_gflop((784, 8, 10), 2, 2 * 784 - 100) == pytest.approx(4 * 8 * 100 / 1e9)


def test_the_sgemm_rate_counts_two_flops_per_multiply_add_over_the_best_try(monkeypatch):
    import itertools
    from types import SimpleNamespace

    import gpumlp.bench as bench_module
    steps = itertools.chain([0.0, 9.0], itertools.count(10.0, 0.25))  # a slow warm-up, then 0.25 s
    monkeypatch.setattr(bench_module, "time", SimpleNamespace(perf_counter=lambda: next(steps)))
    assert bench_module.sgemm_rate(CPU, size=64, tries=2) == pytest.approx(2 * 64 ** 3 / 0.25 / 1e9)


def test_time_epochs_gives_seconds_per_epoch(monkeypatch):
    from types import SimpleNamespace

    import gpumlp.bench as bench_module
    clock, lengths = [0.0], iter([1.0, 2.0, 3.0, 6.0])    # mean 3; first 1, median 2.5, last 6

    def epoch():
        clock[0] += next(lengths)
    monkeypatch.setattr(bench_module, "time", SimpleNamespace(   # an idle process: no wait
        perf_counter=lambda: clock[0], process_time=lambda: 0.0, sleep=lambda s: None))
    assert bench_module.time_epochs(epoch, 4, CPU) == 3.0
    assert next(lengths, None) is None                     # all four epochs ran, no fifth


def test_bench_pair_warms_each_up_then_alternates_the_order_each_round():
    from gpumlp.bench import BenchSpec, Row, bench_pair

    calls = []
    runners = {impl: (lambda impl=impl: calls.append(impl)) for impl in ("gpumlp", "torch")}
    rows = {impl: Row(impl, 8, 16) for impl in runners}
    bench_pair(runners, BenchSpec(hidden=(8,), batch=(16,), repeats=3), CPU, rows)
    assert calls == ["gpumlp", "torch"] + ["gpumlp", "torch", "torch", "gpumlp", "gpumlp", "torch"]
    assert [len(row.seconds) for row in rows.values()] == [3, 3]


def spin_outside_the_gil(done: Callable[[], bool]) -> None:
    """Burn CPU as OpenBLAS's threads do after a product, without Python's GIL (hashing a
    large block releases it): a Python loop would wait for the GIL whenever the main thread
    holds it, and then not count as running."""
    import hashlib
    block = bytes(1 << 20)
    while not done():
        hashlib.sha256(block)


def test_each_timed_epoch_waits_until_the_last_sides_threads_stop_spinning():
    """OpenBLAS's threads spin for about 0.1 s after gpumlp's epoch: on two cores PyTorch's
    epoch timed next lost a core for that long (its ratio came out 10-15% too slow). A side
    that leaves a thread busy is waited for before the other is timed."""
    import threading
    import time

    from gpumlp.bench import time_epochs

    spinning = []

    def leaves_a_thread_spinning():
        until = time.perf_counter() + 0.3
        spinning.append(threading.Thread(target=spin_outside_the_gil,
                                         args=(lambda: time.perf_counter() >= until,)))
        spinning[-1].start()

    def sees_no_other_thread_busy():
        assert not spinning[-1].is_alive(), "timed while the other side's thread spun"

    time_epochs(leaves_a_thread_spinning, 1, CPU)
    time_epochs(sees_no_other_thread_busy, 1, CPU)
    spinning[-1].join()


def test_a_spinning_thread_counts_as_runnable_whatever_the_load_and_a_sleeping_one_not():
    """What settle() waits on: a thread that spins is runnable (state R) whether or not it has
    a core; the CPU time it burns in a window, the earlier sign, shrank to nothing on a loaded
    machine, and the bench timed while it spun."""
    import threading
    import time

    from gpumlp import bench as bench_module

    if bench_module.runnable_threads() is None:
        pytest.skip("no /proc/self/task here: settle() falls back on the CPU time")
    stop = threading.Event()
    spinner = threading.Thread(target=spin_outside_the_gil, args=(stop.is_set,))
    sleeper = threading.Thread(target=stop.wait)
    sleeper.start()
    bench_module.settle()               # OpenBLAS's threads, spinning after an earlier test
    idle = bench_module.runnable_threads()
    spinner.start()
    try:
        time.sleep(0.05)
        assert bench_module.runnable_threads() == idle + 1
    finally:
        stop.set()
        spinner.join()
        sleeper.join()
    assert idle == 0


def test_settle_without_proc_waits_while_the_cpu_time_grows(monkeypatch):
    from gpumlp import bench as bench_module

    clock = {"cpu": 0.0, "wall": 0.0, "sleeps": 0}

    def sleep(seconds):
        clock["sleeps"] += 1
        clock["wall"] += seconds
        clock["cpu"] += seconds if clock["sleeps"] <= 3 else 0.0   # busy for three windows

    monkeypatch.setattr(bench_module, "runnable_threads", lambda: None)
    monkeypatch.setattr(bench_module.time, "sleep", sleep)
    monkeypatch.setattr(bench_module.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(bench_module.time, "perf_counter", lambda: clock["wall"])
    bench_module.settle()
    assert clock["sleeps"] == 4
    clock.update(sleeps=-1000)                                   # busy throughout: gives up
    bench_module.settle(max_wait=0.1)
    assert clock["sleeps"] == -1000 + 5


def test_bench_turns_pytorchs_out_of_memory_into_the_one_line_error(monkeypatch):
    """PyTorch's allocator raises RuntimeError ("DefaultCPUAllocator: can't allocate memory",
    "CUDA out of memory"): it printed 48 lines of traceback, gpumlp's own shortage one line."""
    torch = torch_or_skip()
    from gpumlp.bench import torch_runner

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 12800000000 bytes.")

    epoch = torch_runner(torch, "cpu", synthetic_split(CPU, 64, 0), 8, 32, seed=0)
    monkeypatch.setattr(torch, "randperm", refuse)
    with pytest.raises(MemoryError, match="^PyTorch: .*can't allocate memory"):
        epoch()
    monkeypatch.setattr(torch, "from_numpy", refuse)          # its copy of the data, too
    with pytest.raises(MemoryError, match="^PyTorch: .*can't allocate memory"):
        torch_runner(torch, "cpu", synthetic_split(CPU, 64, 0), 8, 32, seed=0)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "randperm", refuse)
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data", "synthetic",
                                       "--samples", "64", "--batch", "32", "--hidden", "8",
                                       "--repeats", "1", "--torch"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: out of memory (PyTorch: ")


def test_bench_times_each_size_once_and_refuses_a_small_samples_before_reading_data(
        monkeypatch):
    """--hidden 8 --hidden 8 timed the pair twice and paired the first gpumlp row with the
    second pair's torch epochs; a --samples below a --batch was refused after MNIST was read."""
    import gpumlp.cli_bench as cli_bench

    monkeypatch.setattr(cli_bench, "load_mnist_for", lambda *a, **k: pytest.fail("data read"))
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--samples", "50",
                                       "--batch", "64", "--no-torch"])
    assert result.exit_code == 2 and "--samples 50 is smaller than the largest --batch 64" \
        in result.output
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data", "synthetic",
                                       "--samples", "64", "--batch", "32", "--hidden", "8",
                                       "--hidden", "8", "--batch", "32", "--repeats", "1",
                                       "--no-torch"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stdout.splitlines() if line.startswith("| 8 |")] != []
    assert len([line for line in result.stdout.splitlines() if line.startswith("| 8 |")]) == 1
    assert "--hidden 8 --batch 32 " in result.stdout  # the reproduce command: once each


def test_the_bench_header_names_blas_variables_set_in_the_environment(monkeypatch):
    """OPENBLAS_CORETYPE=Haswell halved the sgemm rate here (SkylakeX kernels otherwise), and
    the header said only '(Haswell)'."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data", "synthetic",
                                       "--samples", "64", "--batch", "32", "--hidden", "8",
                                       "--repeats", "1", "--no-torch"])
    assert result.exit_code == 0, result.output
    env = [line for line in result.stdout.splitlines() if line.startswith("env ")]
    assert len(env) == 1 and "OPENBLAS_CORETYPE=Haswell" in env[0]
    assert "OMP_NUM_THREADS" not in env[0]


def test_ctrl_c_during_the_bench_prints_the_sizes_measured_so_far(monkeypatch):
    """A grid takes minutes; Ctrl-C in its last size threw away every row measured."""
    import gpumlp.bench as bench_module

    real, pairs = bench_module.bench_pair, []

    def stopped_at_the_second(runners, spec, backend, rows):
        pairs.append(rows)
        if len(pairs) == 2:
            raise KeyboardInterrupt
        real(runners, spec, backend, rows)

    monkeypatch.setattr(bench_module, "bench_pair", stopped_at_the_second)
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data", "synthetic",
                                       "--samples", "64", "--batch", "32", "--hidden", "8",
                                       "--hidden", "16", "--repeats", "1", "--no-torch"])
    assert result.exit_code == 130 and result.stderr.splitlines()[-1] == "interrupted"
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["8"]
    assert result.stdout.rstrip().endswith("(interrupted: the sizes measured before it was "
                                           "stopped)")
    assert ("GFLOP/s (best 2048^3 float32 product, measured at the start; stopped before the "
            "end)") in result.stdout


def test_ctrl_c_during_the_closing_sgemm_still_prints_every_row(monkeypatch):
    """After the last size, the bench measures sgemm again: a stop there lost every row."""
    import gpumlp.bench as bench_module

    real, calls = bench_module.sgemm_rate, []

    def stopped_the_second_time(backend):
        calls.append(backend)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(backend)

    monkeypatch.setattr(bench_module, "sgemm_rate", stopped_the_second_time)
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data", "synthetic",
                                       "--samples", "64", "--batch", "32", "--hidden", "8",
                                       "--hidden", "16", "--repeats", "1", "--no-torch"])
    assert result.exit_code == 130 and len(calls) == 2
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["8", "16"]
    assert "measured at the start; stopped before the end" in result.stdout


def test_bench_seconds_below_a_hundredth_keep_three_significant_digits():
    from gpumlp.cli_bench import seconds

    assert [seconds(v) for v in (1.23456, 0.0123, 0.000412, 0.0)] == [
        "1.235", "0.012", "0.000412", "0"]


def test_bench_threads_where_no_openblas_can_be_set_is_refused(monkeypatch):
    import gpumlp.bench as bench_module

    real = bench_module.loaded_openblas()
    monkeypatch.setattr(bench_module, "loaded_openblas", lambda: [])
    with pytest.raises(bench_module.BenchError, match="--threads 2: no OpenBLAS found"):
        bench_module.blas_threads(2)
    assert bench_module.blas_threads(None) == []
    monkeypatch.setattr(bench_module, "loaded_openblas", lambda: real)   # set, but unnamed:
    monkeypatch.setattr(bench_module, "CORE_NAMES", ())                   # no core to say
    assert bench_module.blas_threads(1) == []


def test_bench_gflop_is_per_epoch_with_several_epochs_a_timing():
    from gpumlp.bench import BenchSpec, run_bench

    spec = BenchSpec(hidden=(8,), batch=(32,), epochs=3, repeats=1, samples=64, torch=False)
    row = run_bench(spec, CPU)["rows"][0]                          # random pixels: few skipped
    model = executed_gflop((784, 8, 10), 64)
    assert row.gflop == pytest.approx(model, rel=0.01) and row.gflop <= model


def test_bench_refuses_a_samples_below_any_batch_and_takes_all_of_the_data():
    from gpumlp.bench import BenchError, BenchSpec, first_of, run_bench

    with pytest.raises(BenchError, match="--samples 64 is smaller than the largest --batch 128"):
        run_bench(BenchSpec(hidden=(8,), batch=(16, 128), samples=64, torch=False), CPU)
    images, labels = np.zeros((5, 784), np.uint8), np.arange(5, dtype=np.int32)
    assert len(first_of(images, labels, 5, CPU)) == 5
    with pytest.raises(BenchError, match="--samples 6 is more than the 5 images"):
        first_of(images, labels, 6, CPU)


def test_bench_without_pytorch_times_gpumlp_alone_and_says_so_unless_torch_was_asked_for(
        monkeypatch):
    """By default a missing PyTorch leaves the comparison out, and the reproduce command says
    --no-torch (what was timed); an explicit --torch is refused before any data is read."""
    from gpumlp import cli_bench
    from use_helpers import without_module

    without_module(monkeypatch, "torch")
    args = ["bench", "--device", "cpu", "--data", "synthetic", "--hidden", "8", "--batch", "16",
            "--samples", "64", "--repeats", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "torch - (PyTorch is not installed (pip install torch) - no comparison)" in result.stdout
    assert result.stdout.rstrip().endswith("--samples 64 --no-torch")
    assert [row.split("|")[3] for row in result.stdout.splitlines()
            if row.startswith("| 8 |")] == [" gpumlp "]

    def reached(*args, **kwargs):
        raise AssertionError("the data was read")
    monkeypatch.setattr(cli_bench, "load_mnist_for", reached)
    asked = CliRunner().invoke(main, ["bench", "--device", "cpu", "--torch"])
    assert asked.exit_code == 2 and asked.stdout == ""
    assert asked.stderr == ("Error: --torch: PyTorch is not installed (pip install torch); install "
                            "a PyTorch that runs on cpu, or drop --torch (or pass --no-torch)\n")


def test_the_reproduce_command_carries_every_option():
    from gpumlp.cli_bench import reproduce_command
    assert (reproduce_command("cpu", (8, 16), (32, 64), 2, 3, 640, True, 4, "synthetic")
            == "gpumlp bench --device cpu --data synthetic --hidden 8 --hidden 16 --batch 32 "
               "--batch 64 --epochs 2 --repeats 3 --samples 640 --torch --threads 4")


def test_bench_takes_all_of_mnist_s_60000_training_images(monkeypatch):
    from gpumlp import cli_bench

    def reached(*args, **kwargs):
        raise SystemExit(7)                                         # past the option checks
    monkeypatch.setattr(cli_bench, "load_mnist_for", reached)
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--samples", "60000"])
    assert result.exit_code == 7, result.output


def test_the_benchs_pytorch_epoch_takes_the_same_sgd_steps_as_gpumlps_generic_step(monkeypatch):
    """Same work on both sides: from the same weights and the same order, one epoch of the
    bench's PyTorch side ends where gpumlp's generic step ends (lr, momentum, no weight decay,
    the mean loss, x / 255): a torch side with other options times another training."""
    torch = torch_or_skip()
    from gpumlp import bench as bench_module

    split = synthetic_split(CPU, 96, 3)
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: torch.arange(n, device=device))
    epoch = bench_module.torch_runner(torch, "cpu", split, 16, 32, seed=0)
    layers = (epoch.net[0], epoch.net[2])
    params = Params(tuple(np.ascontiguousarray(m.weight.detach().numpy().T) for m in layers),
                    tuple(m.bias.detach().numpy().copy() for m in layers))
    config = build_config(None, ["model.hidden=16", f"optim.lr={bench_module.LR}",
                                 f"optim.momentum={bench_module.MOMENTUM}"])
    state, step = init_state(config.optim, params), generic_step(config)
    for t, start in enumerate(range(0, 96, 32), start=1):
        X = split.images[start:start + 32].astype(np.float32) / np.float32(255)
        step(params, state, X, split.labels[start:start + 32], bench_module.LR, t, ())
    epoch()
    for ours, layer in zip(params.W, layers):
        np.testing.assert_allclose(ours, layer.weight.detach().numpy().T, rtol=0, atol=1e-6)
    for ours, layer in zip(params.b, layers):
        np.testing.assert_allclose(ours, layer.bias.detach().numpy(), rtol=0, atol=1e-6)


def test_a_cuda_pytorch_that_cannot_start_is_not_called_a_build_without_cuda(monkeypatch):
    """A wheel for CUDA 13 under an older driver: torch.cuda.is_available() warns and says
    False. 'this PyTorch build (2.x+cu130) has no CUDA' sent the user to look for another
    build; the driver's reason is what to act on (and its warning is not printed as well)."""
    import warnings

    torch = torch_or_skip()
    from gpumlp.bench import import_torch

    def too_old():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old "
                      "(found version 12080). Please update your GPU driver by downloading and "
                      "installing a new version from the URL: http://www.nvidia.com/Download/"
                      "index.aspx Alternatively, go to: https://pytorch.org/ to install a PyTorch "
                      "version that has been compiled with your version of the CUDA driver. "
                      "(Triggered internally at c10/cuda/CUDAFunctions.cpp:119.)", UserWarning)
        return False
    monkeypatch.setattr(torch.cuda, "is_available", too_old)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # nothing escapes as a warning
        _, why = import_torch("cuda:0")
    assert why == (f"PyTorch {torch.__version__} (built for CUDA 13.0) cannot use the GPU here "
                   "(CUDA initialization: The NVIDIA driver on your system is too old (found "
                   "version 12080))")
    def error_803():
        warnings.warn("CUDA initialization: Unexpected error from cudaGetDeviceCount(). Did you "
                      "run some cuda functions before calling NumCudaDevices() that might have "
                      "already set an error? Error 803: system has unsupported display driver / "
                      "cuda driver combination (Triggered internally at x.cpp:109.)", UserWarning)
        return False
    monkeypatch.setattr(torch.cuda, "is_available", error_803)  # CUDA's own error, not a
    assert import_torch("cuda:0")[1].endswith(                  # fragment before it
        "(CUDA initialization: Error 803: system has unsupported display driver / cuda driver "
        "combination)")
    from gpumlp.bench import first_sentence
    assert first_sentence(                                      # not cut at "e.g."
        "CUDA initialization: CUDA unknown error - this may be due to an incorrectly set up "
        "environment, e.g. changing env variable CUDA_VISIBLE_DEVICES after program start. "
        "Setting the available devices to be zero. (Triggered internally at x.cpp:109.)") == (
        "CUDA initialization: CUDA unknown error - this may be due to an incorrectly set up "
        "environment, e.g. changing env variable CUDA_VISIBLE_DEVICES after program start")
    assert first_sentence("Error 804: forward compatibility was attempted") == (
        "Error 804: forward compatibility was attempted")      # the code once, not twice
    monkeypatch.setattr(torch.version, "cuda", None)         # a CPU-only wheel
    assert import_torch("cuda:0")[1] == f"this PyTorch build ({torch.__version__}) has no CUDA"


def test_the_bench_header_names_gpu_variables_that_change_either_sides_speed(monkeypatch):
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")   # (the bench pins it off)
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data", "synthetic",
                                       "--samples", "64", "--batch", "32", "--hidden", "8",
                                       "--repeats", "1", "--no-torch"])
    assert result.exit_code == 0, result.output
    env = next(line for line in result.stdout.splitlines() if line.startswith("env "))
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1" in env and "CUDA_LAUNCH_BLOCKING=1" in env


def test_the_benchs_pytorch_on_a_gpu_takes_full_float32_products(monkeypatch):
    """TORCH_ALLOW_TF32_CUBLAS_OVERRIDE (set by some launchers) gives PyTorch TF32 products,
    which gpumlp's side (train.tf32: false) does not use: the CUDA runner pins them off."""
    torch = torch_or_skip()
    from gpumlp import bench

    made = []
    real_device = torch.device
    monkeypatch.setattr(torch, "device", lambda name: types.SimpleNamespace(type="cuda"))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", made.append)
    try:
        bench.make_torch_runner(torch, "cuda:0", None, 8, 4, 0)
    except Exception:  # no GPU here: it stops at the first tensor moved to the device
        pass
    monkeypatch.setattr(torch, "device", real_device)
    assert made == ["highest"]
