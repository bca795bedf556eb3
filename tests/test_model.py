"""The model's equations against independent oracles: central differences in float64 (every
activation; dropout, label smoothing, weight decay; up to three hidden layers; m = 1),
per-example gradients, the seed's literal (erroneous) first-layer formulas, and the
numerics of softmax and the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpumlp import gradcheck
from gpumlp.activations import ACTIVATIONS
from gpumlp.config import OptimConfig
from gpumlp.gradcheck import ParamCheck, check_gradients, gradcheck_config, passes, worst_error
from gpumlp.model import (Grads, Params, backward, dropout_masks, forward, init_params,
                          log_softmax, loss_and_dA2, softmax, targets)
from gpumlp.optim import apply_max_norm, flat, init_state, update
from numeric_helpers import central_difference

TOL = 1e-6  # largest relative error a float64 central-difference check may show
NETS = {"1-hidden": (7, 6, 4), "2-hidden": (7, 6, 5, 4),   # (d, h1, ..., c): every entry checked
        "3-hidden": (7, 6, 5, 4, 3)}
REGULARISERS = {"dropout": (0.3, 0.0), "label-smoothing": (0.0, 0.1),  # (p, alpha)
                "dropout-and-label-smoothing": (0.3, 0.1)}


def small_net(widths, seed=0, m=5, dtype="float64"):
    """Params with nonzero biases, inputs X in [0, 1) and labels y, from one generator."""
    rng = np.random.default_rng(seed)
    params = init_params(widths, "xavier", rng, dtype)
    params = Params(params.W, tuple(rng.normal(0, 0.1, v.shape).astype(dtype) for v in params.b))
    X = rng.random((m, widths[0])).astype(dtype)
    y = rng.integers(0, widths[-1], size=m)
    return params, X, y


def gradients(params, X, y, act, masks=(), smoothing=0.0):
    cache = forward(params, X, act, masks)
    _, dA2 = loss_and_dA2(cache.A[-1], y, smoothing)
    return backward(params, cache, dA2, act)


def n_entries(widths):
    """How many numbers the W_k and b_k of a net of these widths hold."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def rel(a, b):
    """The largest relative error, with gradcheck's floor for entries near zero."""
    return np.max(np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), gradcheck.FLOOR))


# --- central differences through gpumlp.gradcheck, every entry --------------------------------

@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gradients_match_central_differences_float64(activation, net):
    results = gradcheck_config(NETS[net], ACTIVATIONS[activation], "he", seed=1, m=6,
                               samples=None)
    assert sum(r.checked for r in results) == n_entries(NETS[net])  # every entry
    assert [r.name for r in results][-2:] == [f"W{len(NETS[net]) - 1}", f"b{len(NETS[net]) - 1}"]
    assert passes(results, TOL), results


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gradcheck_config_with_dropout_and_label_smoothing_matches_central_differences_float64(
        activation, net):
    """The CLI's path: gradcheck_config draws the masks and passes the smoothing through."""
    results = gradcheck_config(NETS[net], ACTIVATIONS[activation], "he", seed=2, m=6,
                               dropout=0.3, smoothing=0.1, samples=None)
    assert passes(results, TOL), results


def backward_without_the_masks(params, cache, dA2, act):
    """model.backward with dZ_k not taken through the dropout masks (the forward pass was)."""
    return backward(params, cache._replace(masks=()), dA2, act)


def loss_and_unsmoothed_dA2(A2, y, smoothing=0.0):
    """The smoothed loss L with the one-hot target's dA2, whatever the smoothing."""
    return loss_and_dA2(A2, y, smoothing)[0], loss_and_dA2(A2, y)[1]


WRONG_WITHOUT = {"dropout": ("backward", backward_without_the_masks, {"dropout": 0.3}),
                 "label-smoothing": ("loss_and_dA2", loss_and_unsmoothed_dA2, {"smoothing": 0.1})}


@pytest.mark.parametrize("regulariser", WRONG_WITHOUT)
def test_gradcheck_config_fails_a_gradient_that_ignores_its_regulariser_central_differences_float64(
        regulariser, monkeypatch):
    """The CLI's path checks through its dropout masks and label smoothing: a backward pass that
    leaves one out passes the check without it and fails it with it. Had gradcheck_config not
    passed the option on (`gpumlp gradcheck --set model.dropout=0.3` checking a net without
    dropout), the wrong gradient would pass both."""
    name, wrong, option = WRONG_WITHOUT[regulariser]
    monkeypatch.setattr(gradcheck, name, wrong)
    check = lambda **kw: gradcheck_config(NETS["2-hidden"], ACTIVATIONS["tanh"], "he",  # noqa: E731
                                          seed=2, m=6, samples=None, **kw)
    assert passes(check(), TOL)                          # right where the regulariser is off
    results = check(**option)
    assert worst_error(results) > 1e-3 and not passes(results, TOL), results


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("regulariser", REGULARISERS)
def test_gradients_with_dropout_or_label_smoothing_match_central_differences_float64(
        regulariser, activation, net):
    """Dropout alone, label smoothing alone and both, every activation, every entry."""
    p, alpha = REGULARISERS[regulariser]
    widths, act = NETS[net], ACTIVATIONS[activation]
    params, X, y = small_net(widths, seed=9, m=6)
    masks = dropout_masks(np.random.default_rng(9), 6, widths[1:-1], p, X.dtype)
    assert len(masks) == (len(widths) - 2 if p else 0)
    assert all((M == 0).any() and (M > 0).any() for M in masks)  # some units dropped, some kept
    plain, regularised = gradients(params, X, y, act), gradients(params, X, y, act, masks, alpha)
    assert all(rel(a, b) > 1e-3 for a, b in zip(plain.W, regularised.W))  # it changes every dW_k
    results = check_gradients(params, X, y, act, masks, alpha)
    assert sum(r.checked for r in results) == n_entries(widths)
    assert passes(results, TOL), results


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gradients_for_a_batch_of_one_match_central_differences_float64(activation, net):
    """m = 1: dA2 = Z2 - Y with nothing to average, the seed's single-example equations."""
    params, X, y = small_net(NETS[net], seed=11, m=1)
    assert X.shape == (1, NETS[net][0]) and y.shape == (1,)
    results = check_gradients(params, X, y, ACTIVATIONS[activation])
    assert sum(r.checked for r in results) == n_entries(NETS[net])
    assert passes(results, TOL), results


@pytest.mark.parametrize("optim", ["sgd", "sgd-nesterov", "adam", "adamw"])
def test_weight_decay_gradient_is_the_central_difference_of_the_decayed_loss_float64(optim):
    """SGD (heavy-ball and Nesterov) and Adam step on g + lambda theta for every parameter,
    biases included: the central difference of L + lambda/2 sum ||theta||^2. AdamW's decay is
    decoupled: its step sees g alone.

    After one step from zero state, SGD's velocity is the gradient it used, and Adam's first
    moment is (1 - beta1) times it; the step itself is lr times that gradient (heavy-ball),
    lr (1 + mu) times it (Nesterov: g + mu v with v = g), lr g / (|g| + eps) (Adam's first).
    """
    lam, lr, act = 0.3, 0.1, ACTIVATIONS["tanh"]
    params, X, y = small_net((5, 4, 3, 3), seed=10, m=4)
    before = Params(tuple(W.copy() for W in params.W), tuple(b.copy() for b in params.b))
    cfg = OptimConfig(name=optim.split("-")[0], momentum=0.9, weight_decay=lam,
                      nesterov=optim == "sgd-nesterov")
    state = init_state(cfg, params)
    update(cfg, params, gradients(params, X, y, act), state, lr, 1)
    used = [g if cfg.name == "sgd" else g / (1 - cfg.beta1) for g in state.m]  # (W1, b1, ...)
    for theta, g_used, after in zip(flat(before), used, flat(params)):
        step = {"sgd": lr * g_used, "sgd-nesterov": lr * (1 + cfg.momentum) * g_used}.get(
            optim, lr * g_used / (np.abs(g_used) + cfg.eps))
        decayed_theta = (1 - lr * lam) * theta if optim == "adamw" else theta
        np.testing.assert_allclose(after, decayed_theta - step, rtol=1e-12, atol=1e-15)

    def L():
        return float(loss_and_dA2(forward(before, X, act).A[-1], y)[0])

    def decayed():
        return L() + lam / 2 * sum(float((theta * theta).sum()) for theta in flat(before))

    for theta, g_used in zip(flat(before), used):
        numeric = {name: np.array([central_difference(f, theta, i, eps=gradcheck.EPS)
                                   for i in range(theta.size)]).reshape(theta.shape)
                   for name, f in (("L", L), ("decayed", decayed))}
        assert rel(numeric["decayed"], numeric["L"]) > 1e-3  # lambda theta is not negligible
        expected, other = ("L", "decayed") if optim == "adamw" else ("decayed", "L")
        assert rel(g_used, numeric[expected]) < TOL
        assert rel(g_used, numeric[other]) > 1e-3


def test_dropout_masks_are_inverted_and_drop_units():
    rng = np.random.default_rng(0)
    (M,) = dropout_masks(rng, 200, (50,), 0.25, np.dtype("float32"))
    assert M.dtype == np.float32
    assert set(np.unique(M).tolist()) == {0.0, np.float32(1 / 0.75)}
    assert 0.15 < (M == 0).mean() < 0.35
    assert dropout_masks(rng, 10, (5,), 0.0, np.dtype("float32")) == ()


def plain_numpy_loss(params, X, y):
    """Mean cross-entropy of a tanh MLP written from scratch (no gpumlp code)."""
    Z = X
    for k, (W, b) in enumerate(zip(params.W, params.b)):
        A = Z @ W + b
        Z = np.tanh(A) if k < len(params.W) - 1 else A
    log_probs = Z - Z.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(y)), y].mean()


def test_backward_matches_a_central_difference_computed_here_float64():
    """The checker itself is checked: finite differences of a loss written in this test."""
    params, X, y = small_net((5, 4, 3, 3), seed=3, m=4)
    grads = gradients(params, X, y, ACTIVATIONS["tanh"])
    for theta, analytic in zip((*params.W, *params.b), (*grads.W, *grads.b)):
        numeric = np.array([central_difference(lambda: plain_numpy_loss(params, X, y), theta, i)
                            for i in range(theta.size)]).reshape(theta.shape)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-10)
        assert np.abs(numeric).max() > 1e-3  # a real gradient, not zeros compared with zeros


def test_gradcheck_catches_a_wrong_backward_central_differences_float64(monkeypatch):
    def dW1_doubled(params, cache, dA2, act):
        grads = backward(params, cache, dA2, act)
        return Grads((2 * grads.W[0], *grads.W[1:]), grads.b)

    monkeypatch.setattr(gradcheck, "backward", dW1_doubled)
    params, X, y = small_net((6, 5, 4), seed=4)
    results = {r.name: r for r in check_gradients(params, X, y, ACTIVATIONS["sigmoid"])}
    assert results["W1"].max_rel_error > 0.4  # |2g - g| / |2g| = 0.5
    assert max(results[n].max_rel_error for n in ("b1", "W2", "b2")) < TOL


def kinked_net(distance=3e-6, widths=(6, 5, 4), unit=2):
    """A net whose hidden pre-activation A1[1, unit] is `distance` above 0. At 3e-6 the EPS steps
    of b1[unit], and of W1[i, unit] where X[1, i] > 0.3, straddle the kink and the step EPS/10
    does not; at 3e-9 b1[unit] and W1[i, unit] where X[1, i] > 0.03 straddle at every step."""
    params, X, y = small_net(widths, seed=4)
    b1 = params.b[0].copy()
    b1[unit] += distance - (X @ params.W[0] + b1)[1, unit]
    return Params(params.W, (b1, *params.b[1:])), X, y


def straddle_counts(moves, distance):
    """(rescued, left out): entries whose step h moves a pre-activation `distance` from 0 by
    moves * h, straddling at EPS but not at EPS/100 (rescued) or at EPS/100 too (left out)."""
    crosses = {h: np.abs(moves) * h > distance for h in (gradcheck.EPS, gradcheck.EPS / 100)}
    return (int((crosses[gradcheck.EPS] & ~crosses[gradcheck.EPS / 100]).sum()),
            int(crosses[gradcheck.EPS / 100].sum()))


def counts(results):
    """name -> (rescued, straddling, checked)."""
    return {r.name: (r.rescued, r.straddling, r.checked) for r in results}


def loss_at(params, X, y, act):
    return lambda: float(loss_and_dA2(forward(params, X, act).A[-1], y)[0])


@pytest.mark.parametrize("distance", [3e-6, 3e-9])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_entries_whose_step_straddles_the_kink_are_measured_again_or_left_out(activation,
                                                                              distance):
    params, X, y = kinked_net(distance)
    act = ACTIVATIONS[activation]
    assert 0 < forward(params, X, act).A[0][1, 2] < gradcheck.EPS
    db1 = gradients(params, X, y, act).b[0][2]
    straddled = central_difference(loss_at(params, X, y, act), params.b[0], 2, eps=gradcheck.EPS)
    assert rel(np.array(db1), np.array(straddled)) > 1e-3  # no derivative: it would fail
    checks = check_gradients(params, X, y, act)          # every entry
    rescued, left_out = straddle_counts(X[1], distance)  # W1[i, 2] moves A1[1, 2] by X[1, i] h
    assert (rescued, left_out) == ((4, 0) if distance == 3e-6 else (0, 6))
    b1 = (1, 0) if distance == 3e-6 else (0, 1)
    assert counts(checks) == {"W1": (rescued, left_out, 30 - left_out), "b1": (*b1, 5 - b1[1]),
                              "W2": (0, 0, 20), "b2": (0, 0, 4)}
    assert passes(checks, TOL), checks


def test_only_relu_and_leaky_relu_have_a_kink_a_smooth_activation_is_compared_across_0():
    """A step across 0 moves a smooth phi along one curve: its central difference is a
    derivative, and every entry is compared at EPS."""
    assert {name for name, act in ACTIVATIONS.items() if act.kink} == {"relu", "leaky_relu"}
    params, X, y = kinked_net(3e-9)
    for name in ("sigmoid", "tanh", "gelu"):
        act = ACTIVATIONS[name]
        b1 = params.b[0]
        b1[2] -= gradcheck.EPS
        assert forward(params, X, act).A[0][1, 2] < 0  # b1[2]'s step crosses 0
        b1[2] += gradcheck.EPS
        db1 = gradients(params, X, y, act).b[0][2]
        across = central_difference(loss_at(params, X, y, act), b1, 2, eps=gradcheck.EPS)
        assert rel(np.array(db1), np.array(across)) < TOL
        results = check_gradients(params, X, y, act)
        assert {r.name: (r.rescued, r.straddling) for r in results if r.rescued or r.straddling} \
            == {}
        assert sum(r.checked for r in results) == n_entries((6, 5, 4))
        assert passes(results, TOL), results


@pytest.mark.parametrize("kept", [False, True])
def test_a_unit_dropout_drops_excludes_nothing_and_the_same_unit_kept_excludes_its_entries(kept):
    """A1[1, 2] is 3e-9 from 0: a dropped unit's kink does not reach the loss."""
    params, X, y = kinked_net(3e-9)
    M = dropout_masks(np.random.default_rng(6), 5, (5,), 0.3, np.dtype("float64"))[0]
    M[1, 2] = 1 / 0.7 if kept else 0.0
    checks = check_gradients(params, X, y, ACTIVATIONS["relu"], (M,))
    if kept:
        assert counts(checks) == {"W1": (0, 6, 24), "b1": (0, 1, 4), "W2": (0, 0, 20),
                                  "b2": (0, 0, 4)}  # as without dropout (test above)
    else:
        assert sum(r.rescued + r.straddling for r in checks) == 0
    assert passes(checks, TOL), checks


@pytest.mark.parametrize("distance", [3e-6, 3e-9])
def test_a_kink_in_the_second_hidden_layer_excludes_the_entries_that_move_it(distance):
    """6-5-4-3 relu, A2[1, 2] `distance` above 0: b2[2] moves it by the step, W2[i, 2] by Z1[1, i]
    times it, b1[i] and W1[k, i] through Z1[1, i] by W2[i, 2] and X[1, k] W2[i, 2] times it
    (where A1[1, i] > 0); W3 and b3 come after it."""
    params, X, y = small_net((6, 5, 4, 3), seed=4)
    act = ACTIVATIONS["relu"]
    A1 = forward(params, X, act).A[0]
    b2 = params.b[1].copy()
    b2[2] += distance - (np.maximum(A1, 0) @ params.W[1] + b2)[1, 2]
    params = Params(params.W, (params.b[0], b2, params.b[2]))
    A = forward(params, X, act).A
    others = np.abs(np.concatenate([A[0].ravel(), np.delete(A[1].ravel(), 1 * 4 + 2)]))
    assert 0 < A[1][1, 2] < 1e-5 and others.min() > 1e-3  # the only pre-activation near 0
    to_A2 = params.W[1][:, 2] * (A1[1] > 0)               # dA2[1, 2] / dZ1[1, i] Z1'
    e2 = np.eye(4)[2]
    moves = {"W1": np.outer(X[1], to_A2), "b1": to_A2, "W2": np.outer(np.maximum(A1[1], 0), e2),
             "b2": e2, "W3": np.zeros((4, 3)), "b3": np.zeros(3)}
    expected = {name: straddle_counts(m, distance) for name, m in moves.items()}
    assert expected == {3e-6: {"W1": (6, 0), "b1": (3, 0), "W2": (2, 0), "b2": (1, 0),  # (rescued,
                               "W3": (0, 0), "b3": (0, 0)},                         # left out)
                        3e-9: {"W1": (7, 17), "b1": (1, 3), "W2": (0, 4), "b2": (0, 1),
                               "W3": (0, 0), "b3": (0, 0)}}[distance]
    checks = check_gradients(params, X, y, act)          # every entry
    assert counts(checks) == {name: (r, s, moves[name].size - s)
                              for name, (r, s) in expected.items()}
    assert passes(checks, TOL), checks


def rescued_net():
    """A 6-5-4 net whose A1[1, 2] is 3e-9 from relu's kink, with X[:, 0] = 0.01: W1[0, 2]
    moves it by 0.01 h, so only EPS/100 keeps its sign (a rescued entry, gradient ~2e-5)."""
    params, X, y = small_net((6, 5, 4), seed=4)
    X[:, 0] = 0.01
    b1 = params.b[0].copy()
    b1[2] += 3e-9 - (X @ params.W[0] + b1)[1, 2]
    return Params(params.W, (b1, *params.b[1:])), X, y


def test_a_rescued_entry_is_judged_with_a_floor_raised_as_its_step_shrinks():
    """W1[0, 2] with X[:, 0] = 0.01: its gradient is 2e-5 and the rounding error of its central
    difference at EPS/100 ~1e-9, 7e-6 of the floor 1e-4 (a right gradient failing) but 7e-8 of
    the floor 1e-2 that EPS/100 gives it."""
    params, X, y = rescued_net()
    checks = check_gradients(params, X, y, ACTIVATIONS["relu"])
    assert abs(gradients(params, X, y, ACTIVATIONS["relu"]).W[0][0, 2]) < 1e-4
    assert counts(checks)["W1"] == (1, 5, 25)  # W1[0, 2] moves A1[1, 2] by 0.01 h: EPS/100 keeps
    assert passes(checks, TOL), checks


def test_a_rescued_entry_with_a_wrong_gradient_still_fails(monkeypatch):
    """The mirror of the test above: the same rescued W1[0, 2] with its gradient doubled (an
    error of 2e-5, 2e-3 of the raised floor) fails."""
    params, X, y = rescued_net()

    def doubled_entry(params, cache, dA2, act):
        grads = backward(params, cache, dA2, act)
        dW1 = grads.W[0].copy()
        dW1[0, 2] *= 2
        return Grads((dW1, *grads.W[1:]), grads.b)

    monkeypatch.setattr(gradcheck, "backward", doubled_entry)
    checks = check_gradients(params, X, y, ACTIVATIONS["relu"])
    assert counts(checks)["W1"] == (1, 5, 25)
    W1 = next(c for c in checks if c.name == "W1")
    assert W1.max_rel_error > 1e-3 and not passes(checks, TOL)


@pytest.mark.parametrize("wrong", ["dW1 doubled", "db1 NaN at the straddling entry"])
def test_a_wrong_gradient_still_fails_the_full_check_when_kinks_are_left_out(wrong, monkeypatch):
    def wrong_backward(params, cache, dA2, act):
        grads = backward(params, cache, dA2, act)
        if wrong == "dW1 doubled":
            return Grads((2 * grads.W[0], *grads.W[1:]), grads.b)
        db1 = grads.b[0].copy()
        db1[2] = np.nan                                  # b1[2]'s difference straddles the kink
        return Grads(grads.W, (db1, *grads.b[1:]))

    monkeypatch.setattr(gradcheck, "backward", wrong_backward)
    params, X, y = kinked_net(3e-9)
    results = check_gradients(params, X, y, ACTIVATIONS["relu"])  # every entry
    assert sum(r.straddling for r in results) > 1
    assert not passes(results, TOL)
    if wrong == "dW1 doubled":
        assert results[0].max_rel_error > 0.4
    else:
        assert math.isnan(worst_error(results))


def db1_times_100(params, cache, dA2, act):
    grads = backward(params, cache, dA2, act)
    return Grads(grads.W, (100 * grads.b[0], *grads.b[1:]))


@pytest.mark.parametrize("right", [True, False])
def test_a_parameter_with_no_entry_compared_fails(right, monkeypatch):
    """6-1-4 relu: the only entry of b1 straddles the kink at every step, so nothing of b1 is
    compared: its error is unknown (inf) and the check fails, a right db1 as a wrong one."""
    if not right:
        monkeypatch.setattr(gradcheck, "backward", db1_times_100)
    params, X, y = kinked_net(3e-9, (6, 1, 4), unit=0)
    results = {r.name: r for r in check_gradients(params, X, y, ACTIVATIONS["relu"])}
    assert (results["b1"].checked, results["b1"].straddling) == (0, 1)
    assert results["b1"].max_rel_error == results["b1"].max_abs_error == math.inf
    assert worst_error(results.values()) == math.inf
    assert not passes(list(results.values()), TOL)
    assert not passes([results["b1"]._replace(max_rel_error=0.0)], math.inf)  # checked == 0


@pytest.mark.parametrize("right", [True, False])
def test_a_rescued_entry_is_compared_a_right_gradient_passes_a_wrong_one_fails(right, monkeypatch):
    """6-1-4 relu, the only entry of b1 3e-6 from the kink: measured with the step EPS/10."""
    if not right:
        monkeypatch.setattr(gradcheck, "backward", db1_times_100)
    params, X, y = kinked_net(3e-6, (6, 1, 4), unit=0)
    results = check_gradients(params, X, y, ACTIVATIONS["relu"])
    b1 = {r.name: r for r in results}["b1"]
    assert (b1.checked, b1.rescued, b1.straddling, b1.nonzero) == (1, 1, 0, 1)
    assert passes(results, TOL) == right
    assert (b1.max_rel_error < TOL) if right else (b1.max_rel_error > 0.9)


def test_minibatch_gradient_is_the_mean_of_per_example_gradients():
    params, X, y = small_net((6, 5, 4, 3), seed=5, m=7)
    act = ACTIVATIONS["leaky_relu"]
    batch = gradients(params, X, y, act)
    singles = [gradients(params, X[i:i + 1], y[i:i + 1], act) for i in range(len(y))]  # m = 1
    for k in range(len(params.W)):
        np.testing.assert_allclose(batch.W[k], np.mean([g.W[k] for g in singles], axis=0),
                                   rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(batch.b[k], np.mean([g.b[k] for g in singles], axis=0),
                                   rtol=1e-12, atol=1e-15)


def test_seed_literal_first_layer_formulas_are_off_by_m_and_m_squared_central_differences_float64():
    """The seed's erratum, documented by the failing alternative.

    The seed writes dA1 = (1/m) dZ1 * phi'(A1) and dW1 = (1/m) X.T @ dA1 (and db1 as the row
    average). dZ1 = dA2 @ W2.T already holds the 1/m of the mean loss, so read literally these
    shrink dA1 and db1 by m and dW1 by m^2; the finite differences agree with gpumlp, not them.
    """
    m = 8
    params, X, y = small_net((6, 5, 4), seed=6, m=m)
    act = ACTIVATIONS["tanh"]
    cache = forward(params, X, act)
    _, dA2 = loss_and_dA2(cache.A[-1], y)
    grads = backward(params, cache, dA2, act)
    A1, W1, W2 = cache.A[0], params.W[0], params.W[1]

    dZ1 = dA2 @ W2.T                                       # (m, h), as both write it
    dA1 = dZ1 * act.phi_prime(A1)                          # gpumlp
    dA1_seed = (1 / m) * dZ1 * act.phi_prime(A1)           # the seed, literally
    dW1_seed = (1 / m) * X.T @ dA1_seed
    db1_seed = (dZ1 * act.phi_prime(A1)).mean(axis=0)      # "average along rows of" it
    # the seed's dW1 and db1 are the code's divided by m^2 and m (its dA1 by m, as written):
    np.testing.assert_allclose(grads.W[0] / dW1_seed, m ** 2, rtol=1e-12)
    np.testing.assert_allclose(grads.b[0] / db1_seed, m, rtol=1e-12)
    np.testing.assert_allclose(grads.W[0], X.T @ dA1, rtol=1e-12)

    loss = lambda: float(loss_and_dA2(forward(params, X, act).A[-1], y)[0])  # noqa: E731
    numeric_W1 = np.array([central_difference(loss, W1, i)
                           for i in range(W1.size)]).reshape(W1.shape)
    numeric_b1 = np.array([central_difference(loss, params.b[0], i) for i in range(5)])

    assert rel(grads.W[0], numeric_W1) < TOL and rel(grads.b[0], numeric_b1) < TOL
    assert rel(dW1_seed, numeric_W1) > 0.9   # 1 - 1/m^2 = 0.98: fails the check
    assert rel(db1_seed, numeric_b1) > 0.8   # 1 - 1/m = 0.875: fails the check

    # dA1 itself: the loss as a function of the pre-activations A1 (forward from A1 on)
    A1_var = A1.copy()
    loss_of_A1 = lambda: float(loss_and_dA2(act.phi(A1_var) @ W2 + params.b[1], y)[0])  # noqa: E731
    numeric_A1 = np.array([central_difference(loss_of_A1, A1_var, i)
                           for i in range(A1.size)]).reshape(A1.shape)
    assert rel(dA1, numeric_A1) < TOL
    assert rel(dA1_seed, numeric_A1) > 0.8   # 1 - 1/m: fails the check


def test_erratum_numbers_quoted_in_the_derivation_central_differences_float64():
    """docs/derivation.md quotes these: 784-32-10 relu net, float64, m = 8, seed 0."""
    rng = np.random.default_rng(0)
    params = init_params((784, 32, 10), "he", rng, "float64")
    X, y, m = rng.random((8, 784)), rng.integers(0, 10, 8), 8
    act = ACTIVATIONS["relu"]
    cache = forward(params, X, act)
    _, dA2 = loss_and_dA2(cache.A[-1], y)
    dW1 = backward(params, cache, dA2, act).W[0]
    i = int(np.abs(dW1).argmax())
    dA1_seed = (1 / m) * (dA2 @ params.W[1].T) * act.phi_prime(cache.A[0])
    dW1_seed = (1 / m) * X.T @ dA1_seed
    numeric = central_difference(lambda: float(loss_and_dA2(forward(params, X, act).A[-1], y)[0]),
                                 params.W[0], i, eps=1e-5)
    assert dW1.flat[i] == pytest.approx(0.2177029396081, abs=1e-12)
    assert numeric == pytest.approx(0.2177029395867, abs=5e-10)  # roundoff of L / 2 eps
    assert dW1_seed.flat[i] == pytest.approx(0.0034016084, abs=1e-10)
    assert dW1.flat[i] / dW1_seed.flat[i] == pytest.approx(64.0, rel=1e-12)


# --- softmax, loss, targets -------------------------------------------------------------------

HUGE = {
    "positive": np.array([[1e4, 0, -5, 2, 1e4 - 1, 0, 0, 0, 3, 1]]),
    "negative": np.array([[-1e4, -1e4 + 2, -1e4, -1e4, -1e4, -1e4, -1e4, -1e4, -1e4, -1e4]]),
    "mixed": np.array([[1e4, -1e4, 0, 0, 0, 0, 0, 0, 0, 5e3]]),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", HUGE)
def test_softmax_rows_sum_to_one_and_stay_finite_for_huge_logits(case, dtype):
    A2 = np.vstack([HUGE[case], np.zeros((1, 10)), np.arange(10.0)[None]]).astype(dtype)
    Z2 = softmax(A2)
    assert Z2.dtype == dtype
    assert np.isfinite(Z2).all() and (Z2 >= 0).all()
    np.testing.assert_allclose(Z2.sum(axis=1), 1.0, rtol=1e-6)
    assert np.isfinite(log_softmax(A2)).all()
    L, dA2 = loss_and_dA2(A2, np.array([1, 2, 3]))
    assert np.isfinite(L) and np.isfinite(dA2).all()


def test_softmax_of_huge_logits_has_the_exact_limits():
    Z2 = softmax(HUGE["mixed"])
    assert Z2[0, 0] == 1.0 and Z2[0, 1] == 0.0
    np.testing.assert_allclose(softmax(HUGE["negative"])[0, 1], math.exp(2) / (math.exp(2) + 9))


def test_loss_of_equal_logits_is_log_10():
    for value in (0.0, 7.0, -1e4):
        y = np.array([0, 3, 9, 5])
        L, dA2 = loss_and_dA2(np.full((4, 10), value), y)
        assert L == pytest.approx(math.log(10), rel=1e-12)
        expected = np.full((4, 10), 0.1 / 4)             # (Z2 - Y) / m with Z2 = 1/10 everywhere
        expected[np.arange(4), y] = (0.1 - 1) / 4
        assert dA2.shape == (4, 10)
        np.testing.assert_allclose(dA2, expected, rtol=1e-12, atol=1e-15)


def test_loss_from_log_sum_exp_is_finite_and_exact_for_huge_logits():
    A2 = np.array([[1e4, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert float(loss_and_dA2(A2, np.array([0]))[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(loss_and_dA2(A2, np.array([1]))[0]) == pytest.approx(1e4, rel=1e-12)
    L32, _ = loss_and_dA2(A2.astype(np.float32), np.array([1]))
    assert L32.dtype == np.float32 and L32 == pytest.approx(1e4, rel=1e-6)


@pytest.mark.parametrize("dtype, top", [(np.float32, 3e38), (np.float64, 1e308)])
def test_a_logit_spread_past_the_dtypes_range_gives_the_loss_not_nan(dtype, top):
    """A2 - max overflows to -inf for the bottom logit: its target is 0, so its term is 0 (it
    was 0 * -inf = NaN, where the fast CPU step gave the loss, 0 here)."""
    A2 = np.zeros((2, 10), dtype=dtype)
    A2[:, 0], A2[:, 1] = top, -top
    with np.errstate(over="ignore", invalid="ignore"):   # as training runs it (train.py)
        L, dA2 = loss_and_dA2(A2, np.array([0, 0]))
        smoothed = loss_and_dA2(A2, np.array([0, 0]), smoothing=0.1)[0]
    assert float(L) == 0.0 and np.isfinite(dA2).all()
    assert float(smoothed) == np.inf                     # every Y > 0: the loss is that large


def test_loss_and_dA2_against_a_direct_formula():
    rng = np.random.default_rng(7)
    A2, y = rng.normal(size=(5, 10)), rng.integers(0, 10, 5)
    P = np.exp(A2) / np.exp(A2).sum(axis=1, keepdims=True)
    L, dA2 = loss_and_dA2(A2, y)
    assert L == pytest.approx(-np.log(P[np.arange(5), y]).mean(), rel=1e-12)
    Y = np.eye(10)[y]
    np.testing.assert_allclose(dA2, (P - Y) / 5, rtol=1e-12)
    L_s, dA2_s = loss_and_dA2(A2, y, smoothing=0.1)
    Y_s = 0.9 * Y + 0.01
    assert L_s == pytest.approx(-(Y_s * np.log(P)).sum() / 5, rel=1e-12)
    np.testing.assert_allclose(dA2_s, (P - Y_s) / 5, rtol=1e-12)


def test_targets_one_hot_and_label_smoothing():
    y = np.array([2, 0, 9])
    Y = targets(y, 10, np.float32)
    assert Y.dtype == np.float32 and Y.shape == (3, 10)
    np.testing.assert_array_equal(Y, np.eye(10, dtype=np.float32)[y])
    Y_s = targets(y, 10, np.float32, smoothing=0.2)
    assert Y_s.dtype == np.float32
    np.testing.assert_allclose(Y_s[0, 2], 0.8 + 0.02, rtol=1e-6)
    np.testing.assert_allclose(Y_s[0, 0], 0.02, rtol=1e-6)
    np.testing.assert_allclose(Y_s.sum(axis=1), 1.0, rtol=1e-6)


# --- initialisation and dtypes ----------------------------------------------------------------

def test_init_is_seeded_he_and_xavier_scaled():
    a = init_params((784, 300, 10), "he", np.random.default_rng(0))
    b = init_params((784, 300, 10), "he", np.random.default_rng(0))
    assert all(np.array_equal(x, y) for x, y in zip(a.W + a.b, b.W + b.b))
    assert a.W[0].shape == (784, 300) and a.b[0].shape == (300,) and a.W[1].shape == (300, 10)
    assert all(w.dtype == np.float32 for w in a.W + a.b) and not a.b[0].any()
    assert a.W[0].std() == pytest.approx(math.sqrt(2 / 784), rel=0.02)
    x = init_params((784, 300, 10), "xavier", np.random.default_rng(0))
    r = math.sqrt(6 / (784 + 300))
    assert np.abs(x.W[0]).max() <= r and x.W[0].std() == pytest.approx(r / math.sqrt(3), rel=0.02)
    with pytest.raises(ValueError, match="'he' or 'xavier', not 'glorot'"):
        init_params((784, 300, 10), "glorot", np.random.default_rng(0))  # not Xavier silently


@pytest.mark.parametrize("optim", ["sgd", "sgd-nesterov", "adam", "adamw"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_float32_stays_float32_through_forward_backward_and_update(activation, optim):
    params, X, y = small_net((8, 6, 5, 4), seed=8, m=5, dtype="float32")
    act = ACTIVATIONS[activation]
    masks = dropout_masks(np.random.default_rng(0), 5, (6, 5), 0.2, X.dtype)
    cache = forward(params, X, act, masks)
    L, dA2 = loss_and_dA2(cache.A[-1], y, 0.1)
    grads = backward(params, cache, dA2, act)
    name, _, nesterov = optim.partition("-")
    cfg = OptimConfig(name=name, nesterov=bool(nesterov), weight_decay=0.01)
    state = init_state(cfg, params)
    for t in (1, 2):
        update(cfg, params, grads, state, 0.1, t)
    apply_max_norm(params, 1.0)
    tensors = {"L": L, "dA2": dA2, **{f"Z{i}": z for i, z in enumerate(cache.Z)},
               **{f"A{i}": a for i, a in enumerate(cache.A)},
               **{f"mask{i}": a for i, a in enumerate(cache.masks)},
               **{f"dW{i}": g for i, g in enumerate(grads.W)},
               **{f"db{i}": g for i, g in enumerate(grads.b)},
               **{f"W{i}": p for i, p in enumerate(params.W)},
               **{f"b{i}": p for i, p in enumerate(params.b)},
               **{f"opt{i}": s for i, s in enumerate(state.m + state.v)}}
    assert {k: str(v.dtype) for k, v in tensors.items() if v.dtype != np.float32} == {}


def test_a_nan_error_anywhere_is_the_worst_and_fails_any_tolerance():
    """max() steps over a NaN that is not first; a NaN gradient must fail the check."""
    results = [ParamCheck("W1", (2, 2), 4, 1e-9, 1e-12), ParamCheck("b1", (2,), 2, float("nan"),
                                                                     float("nan"))]
    assert np.isnan(worst_error(results)) and not passes(results, 1e-6)
    assert not passes(results, float("inf"))
    assert passes(results[:1], 1e-6) and not passes(results[:1], 1e-10)


def test_check_gradients_refuses_a_net_that_is_not_float64():
    """Central differences in float32 are roundoff: the checker says so instead of failing."""
    params, X, y = small_net((6, 5, 4), seed=12, dtype="float32")
    with pytest.raises(ValueError, match=r"float64 net.*not float64: W1, b1, W2, b2, X$"):
        check_gradients(params, X, y, ACTIVATIONS["tanh"])
    params64, X64, _ = small_net((6, 5, 4), seed=12)
    mixed = Params((params64.W[0], params.W[1]), params64.b)
    with pytest.raises(ValueError, match="not float64: W2$"):
        check_gradients(mixed, X64, y, ACTIVATIONS["tanh"])
    assert worst_error(check_gradients(params64, X64, y, ACTIVATIONS["tanh"])) < TOL


def test_check_gradients_refuses_strided_parameters_and_draws_the_same_entries_each_call():
    """A strided parameter's reshape(-1) is a copy: moving its entries would move nothing and
    every numeric gradient would be 0. Without a generator, the sample is seeded: the same call
    checks the same entries."""
    params, X, y = small_net((30, 20, 4), seed=13)
    strided = Params((np.asfortranarray(params.W[0]), params.W[1]), params.b)
    with pytest.raises(ValueError, match="not C-contiguous: W1$"):
        check_gradients(strided, X, y, ACTIVATIONS["tanh"])
    first = check_gradients(params, X, y, ACTIVATIONS["tanh"], samples=5)
    assert check_gradients(params, X, y, ACTIVATIONS["tanh"], samples=5) == first
    assert first[0].checked == 20 and first[0].max_abs_error > 0   # one in each of 20 columns


def test_drawn_entries_cover_every_column_and_every_bias_entry():
    """--samples below a weight matrix's columns still checks one entry in each (each unit it
    feeds), the rest of the sample at random; every entry of a bias; everything when asked."""
    from gpumlp.gradcheck import drawn_entries
    rng = np.random.default_rng(0)
    idx = drawn_entries((784, 256), 20, rng)
    assert len(idx) == len(set(idx)) == 256 and sorted(set(idx % 256)) == list(range(256))
    idx = drawn_entries((256, 10), 20, rng)
    assert len(set(idx)) == 20 and set(idx % 10) == set(range(10))
    np.testing.assert_array_equal(drawn_entries((256,), 5, rng), np.arange(256))
    np.testing.assert_array_equal(drawn_entries((6, 4), 24, rng), np.arange(24))
    np.testing.assert_array_equal(drawn_entries((6, 4), None, rng), np.arange(24))


@pytest.mark.parametrize("unit", [0, 1, 7])
def test_a_gradient_wrong_for_one_hidden_unit_fails_gradcheck_at_its_default_samples(
        unit, monkeypatch):
    """dA1 doubled for one unit: wrong dW1 and db1 in that unit's column alone. With 20 entries
    drawn from all of W1 and b1, such a bug passed about 5 times in 6."""
    real = gradcheck.backward

    def one_unit_wrong(params, cache, dA2, act):
        dZ = dA2 @ params.W[1].T
        dA1 = dZ * act.phi_prime(cache.A[0])
        dA1[:, unit] *= 2
        right = real(params, cache, dA2, act)
        return right._replace(W=(cache.Z[0].T @ dA1, right.W[1]), b=(dA1.sum(axis=0), right.b[1]))

    monkeypatch.setattr(gradcheck, "backward", one_unit_wrong)
    results = gradcheck_config((784, 8, 10), ACTIVATIONS["tanh"], "he", seed=0, m=8, samples=5)
    assert not passes(results, TOL)
    assert [r.name for r in results if r.max_rel_error > 1e-3] == ["W1", "b1"]


def test_gradient_check_counts_the_entries_whose_numeric_gradient_is_not_zero():
    """A sample of only zero gradients (every hidden unit dead on the batch) checks nothing:
    the count says so, where a live net's does not."""
    rng = np.random.default_rng(3)
    params = init_params((6, 5, 3), "he", rng, "float64")
    X, y = rng.random((4, 6)), rng.integers(0, 3, 4)
    live = {r.name: r.nonzero for r in check_gradients(params, X, y, ACTIVATIONS["relu"])}
    dead = Params(params.W, (np.full(5, -100.0), params.b[1]))        # A1 < 0 everywhere
    counts = {r.name: r.nonzero for r in check_gradients(dead, X, y, ACTIVATIONS["relu"])}
    assert counts["W1"] == counts["b1"] == counts["W2"] == 0 and counts["b2"] == 3
    assert min(live.values()) > 0


def test_a_check_whose_gradients_are_all_zero_does_not_pass():
    """Every hidden unit dead on the batch: W1, b1 and W2 have only zero gradients, which a
    wrong backward that keeps zeros zero matches as well; `passes` refuses such a check even
    though every compared error is 0."""
    rng = np.random.default_rng(3)
    params = init_params((6, 5, 3), "he", rng, "float64")
    X, y = rng.random((4, 6)), rng.integers(0, 3, 4)
    dead = Params(params.W, (np.full(5, -100.0), params.b[1]))        # A1 < 0 everywhere
    results = check_gradients(dead, X, y, ACTIVATIONS["relu"])
    assert worst_error(results) <= 1e-6 and all(r.checked for r in results)
    assert not passes(results, 1e-6)
    assert passes(check_gradients(params, X, y, ACTIVATIONS["relu"]), 1e-6)
