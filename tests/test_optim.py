"""Each optimizer's step, schedule and max-norm against values computed by hand."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from gpumlp.config import OptimConfig
from gpumlp.model import Grads, Params
from gpumlp.optim import (OptState, apply_max_norm, flat, init_state, learning_rate, update,
                          warmup_warning)

LR = 0.1


def tiny(w=(1.0, -2.0), b=(0.5,)):
    """A one-layer Params of two weights and one bias, float64."""
    return Params((np.array([w]),), (np.array(b),))


def grads(w, b):
    return Grads((np.array([w]),), (np.array(b),))


def run(cfg, steps, params=None):
    """Apply `steps` (a list of Grads) at t = 1, 2, ...; the final params and state."""
    params = params or tiny()
    state = init_state(cfg, params)
    for t, g in enumerate(steps, start=1):
        update(cfg, params, g, state, LR, t)
    return params, state


def values(params):
    return [*params.W[0].ravel(), *params.b[0]]


G1 = grads((0.5, 0.25), (-1.0,))
G2 = grads((-0.5, 1.0), (-1.0,))


def test_state_is_named_and_shaped_like_the_parameters():
    p = tiny()
    sgd, adam = init_state(OptimConfig(name="sgd"), p), init_state(OptimConfig(name="adam"), p)
    assert isinstance(sgd, OptState) and sgd.v == () and len(sgd.m) == 2
    assert [a.shape for a in adam.m] == [a.shape for a in adam.v] == [(1, 2), (1,)]
    assert not any(a.any() for a in adam.m + adam.v)
    assert [a.shape for a in flat(p)] == [(1, 2), (1,)]


def test_plain_sgd():
    params, _ = run(OptimConfig(name="sgd", momentum=0.0), [G1])
    # p - lr g: 1 - 0.05, -2 - 0.025, 0.5 + 0.1
    np.testing.assert_allclose(values(params), [0.95, -2.025, 0.6], rtol=1e-15)


def test_sgd_with_momentum_two_steps():
    params, state = run(OptimConfig(name="sgd", momentum=0.9), [G1, G1])
    # step 1: v = g = (0.5, 0.25, -1); p = (0.95, -2.025, 0.6)
    # step 2: v = 0.9 v + g = (0.95, 0.475, -1.9); p -= 0.1 v -> (0.855, -2.0725, 0.79)
    np.testing.assert_allclose(values(params), [0.855, -2.0725, 0.79], rtol=1e-14)
    np.testing.assert_allclose([*state.m[0].ravel(), *state.m[1]], [0.95, 0.475, -1.9], rtol=1e-14)


def test_sgd_with_nesterov_momentum_two_steps():
    params, _ = run(OptimConfig(name="sgd", momentum=0.9, nesterov=True), [G1, G2])
    # step 1: v = g; p -= 0.1 (g + 0.9 v) = 0.1 * 1.9 g -> (0.905, -2.0475, 0.69)
    # step 2: g = (-0.5, 1, -1); v = 0.9 (0.5, 0.25, -1) + g = (-0.05, 1.225, -1.9)
    #         p -= 0.1 (g + 0.9 v) = 0.1 (-0.545, 2.1025, -2.71) -> (0.9595, -2.25775, 0.961)
    np.testing.assert_allclose(values(params), [0.9595, -2.25775, 0.961], rtol=1e-14)


def test_sgd_weight_decay_adds_wd_times_p_to_the_gradient():
    params, _ = run(OptimConfig(name="sgd", momentum=0.0, weight_decay=0.01), [G1])
    # g + 0.01 p = (0.51, 0.23, -0.995); p - 0.1 (that) = (0.949, -2.023, 0.5995)
    np.testing.assert_allclose(values(params), [0.949, -2.023, 0.5995], rtol=1e-14)


def test_adam_first_step_moves_each_entry_by_lr_times_the_sign():
    params, state = run(OptimConfig(name="adam", eps=1e-8), [G1])
    # t = 1: m = 0.1 g, v = 0.001 g^2; m_hat = g, v_hat = g^2; p -= lr g / (|g| + eps)
    np.testing.assert_allclose(values(params), [0.9, -2.1, 0.6], rtol=1e-8)
    np.testing.assert_allclose(state.m[0], [[0.05, 0.025]], rtol=1e-14)
    np.testing.assert_allclose(state.v[0], [[0.00025, 0.0000625]], rtol=1e-12)


def test_adam_second_step_uses_the_bias_corrections():
    params, _ = run(OptimConfig(name="adam", eps=1e-8), [G1, G2])
    # first weight: m = 0.9 * 0.05 - 0.05 = -0.005, m_hat = -0.005 / (1 - 0.9^2) = -1/38;
    # v = 0.999 * 0.00025 + 0.001 * 0.25 = 0.00049975, v_hat = v / (1 - 0.999^2) = 0.25;
    # p = 0.9 - 0.1 * (-1/38) / 0.5 = 0.9 + 1/190.
    # bias: g = -1 twice, so m_hat = -1, v_hat = 1 and p = 0.6 + 0.1 = 0.7.
    assert params.W[0][0, 0] == pytest.approx(0.9 + 1 / 190, rel=1e-8)
    assert params.b[0][0] == pytest.approx(0.7, rel=1e-8)
    # second weight, by the same formulas written out with scalars (eps kept exactly)
    p1 = -2.0 - LR * 0.25 / (0.25 + 1e-8)
    m = 0.9 * 0.025 + 0.1 * 1.0
    v = 0.999 * (0.001 * 0.25 ** 2) + 0.001 * 1.0 ** 2
    expected = p1 - LR * (m / (1 - 0.9 ** 2)) / (math.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    assert params.W[0][0, 1] == pytest.approx(expected, rel=1e-12)


def test_adam_weight_decay_is_l2_added_to_the_gradient():
    params, _ = run(OptimConfig(name="adam", weight_decay=0.5, eps=1e-8), [G1, G2])
    # t = 1: g' = g + 0.5 p = (1.0, -0.75, -0.75); p -= 0.1 sign(g') -> (0.9, -1.9, 0.6)
    # t = 2 on the first weight: g' = -0.5 + 0.5 p1 = -0.05 (up to eps)
    p1 = 1.0 - LR * 1.0 / (1.0 + 1e-8)
    g2 = -0.5 + 0.5 * p1
    m = 0.9 * (0.1 * 1.0) + 0.1 * g2
    v = 0.999 * (0.001 * 1.0) + 0.001 * g2 ** 2
    expected = p1 - LR * (m / 0.19) / (math.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    assert params.W[0][0, 0] == pytest.approx(expected, rel=1e-12)


def test_adamw_decays_the_weights_before_the_adam_step():
    params, _ = run(OptimConfig(name="adamw", weight_decay=0.5, eps=1e-8), [G1])
    # p *= 1 - 0.1 * 0.5 -> (0.95, -1.9, 0.475); then p -= 0.1 sign(g) -> (0.85, -2.0, 0.575)
    np.testing.assert_allclose(values(params), [0.85, -2.0, 0.575], rtol=1e-8)
    params, _ = run(OptimConfig(name="adamw", weight_decay=0.5, eps=1e-8), [G1, G2])
    # t = 2, first weight: p = 0.85 * 0.95 = 0.8075, then the plain Adam step 1/190
    assert params.W[0][0, 0] == pytest.approx(0.8075 + 1 / 190, rel=1e-8)


# --- schedules --------------------------------------------------------------------------------

def lr_at(step, steps_per_epoch=10, total_steps=100, **kwargs):
    return learning_rate(OptimConfig(lr=0.1, **kwargs), step, steps_per_epoch, total_steps)


def test_constant_schedule():
    assert [lr_at(s) for s in (0, 37, 99)] == [0.1, 0.1, 0.1]


def test_step_schedule_multiplies_by_gamma_every_step_epochs():
    kw = dict(schedule="step", step_epochs=2, gamma=0.5)
    assert lr_at(0, **kw) == lr_at(19, **kw) == 0.1
    assert lr_at(20, **kw) == pytest.approx(0.05) and lr_at(39, **kw) == pytest.approx(0.05)
    assert lr_at(40, **kw) == pytest.approx(0.025)


def test_cosine_schedule_from_lr_to_min_lr():
    kw = dict(schedule="cosine")
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(25, **kw) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr_at(50, **kw) == pytest.approx(0.05)
    assert lr_at(100, **kw) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(50, min_lr=0.02, **kw) == pytest.approx(0.06)


def test_linear_warmup_then_cosine():
    kw = dict(schedule="cosine", warmup_epochs=1, total_steps=110)
    # warm-up over the first 10 steps: lr (step + 1) / 10
    assert [round(lr_at(s, **kw), 12) for s in (0, 4, 9)] == [0.01, 0.05, 0.1]
    assert lr_at(10, **kw) == pytest.approx(0.1)      # cosine starts after the warm-up
    assert lr_at(60, **kw) == pytest.approx(0.05)     # halfway through the remaining 100
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-15)


def test_warmup_with_a_constant_schedule():
    kw = dict(warmup_epochs=0.5)  # 5 steps
    assert [round(lr_at(s, **kw), 12) for s in (0, 1, 4, 5, 50)] == [0.02, 0.04, 0.1, 0.1, 0.1]


def test_a_warmup_of_a_fraction_of_a_step_never_overshoots_the_peak():
    # warm-up 0.35 steps: step 0 is inside it, and lr (0 + 1) / 0.35 would be 2.9 times the peak
    assert lr_at(0, warmup_epochs=0.035) == 0.1
    # 2.5 steps: 0.04, 0.08, then step 2 (still inside) would be 0.12
    assert [round(lr_at(s, warmup_epochs=0.25), 12) for s in (0, 1, 2, 3)] == [0.04, 0.08, 0.1, 0.1]


def test_step_schedule_with_a_tiny_step_epochs_decays_to_zero_without_overflow():
    for tiny in (1e-308, 5e-324):  # epoch / step_epochs beyond float (inf) and near its top
        assert [lr_at(s, schedule="step", step_epochs=tiny, gamma=0.5) for s in (0, 1, 99)] \
            == [0.1, 0.0, 0.0]
        assert lr_at(99, schedule="step", step_epochs=tiny, gamma=1.0) == 0.1
    # the count of decays is the plain quotient: at epoch 1, step_epochs 0.1 is 10 decays
    assert lr_at(10, schedule="step", step_epochs=0.1, gamma=0.5) == pytest.approx(0.1 / 1024)


@pytest.mark.parametrize("step_epochs", [0.1, 0.2, 0.3, 0.7, 1.1, 2.2, 0.05, 1.5, 3])
@pytest.mark.parametrize("steps_per_epoch", [10, 100, 469, 600])
def test_step_schedule_decays_at_each_exact_multiple_of_a_fractional_step_epochs(
        step_epochs, steps_per_epoch):
    # the count of decays in exact rational arithmetic, as PyTorch's StepLR counts whole steps
    # (0.6 / 0.2 is 2.9999999999999996 in floats, and that step's decay came one step late)
    from fractions import Fraction
    period = Fraction(str(step_epochs))
    for step in range(20 * steps_per_epoch):
        decays = math.floor(Fraction(step, steps_per_epoch) / period)
        assert lr_at(step, steps_per_epoch, schedule="step", step_epochs=step_epochs,
                     gamma=0.5) == 0.1 * 0.5 ** decays, step


def test_step_schedule_never_decays_early_where_the_quotient_is_just_below_a_multiple():
    # 100007 steps of 2381 over 0.6667 epochs is 62.99999994 decays: the 63rd comes a step
    # later (a tolerance of 1e-9 took it one step early)
    from fractions import Fraction
    for step in (100007, 100008):
        exact = math.floor(Fraction(step, 2381) / Fraction("0.6667"))
        assert lr_at(step, 2381, schedule="step", step_epochs=0.6667, gamma=0.9) \
            == 0.1 * 0.9 ** exact, step
    assert [math.floor(Fraction(s, 2381) / Fraction("0.6667")) for s in (100007, 100008)] \
        == [62, 63]


def test_step_decays_inside_the_warm_up_take_effect_when_it_ends():
    rates = [lr_at(s, schedule="step", step_epochs=1, gamma=0.5, warmup_epochs=2)
             for s in (0, 9, 10, 19, 20, 29, 30)]
    assert rates == pytest.approx([0.005, 0.05, 0.055, 0.1, 0.025, 0.025, 0.0125])


# --- max-norm ---------------------------------------------------------------------------------

def test_max_norm_rescales_hidden_columns_only():
    W1 = np.array([[3.0, 0.1], [4.0, 0.1]])      # column norms 5 and 0.14
    W2 = np.array([[30.0], [40.0]])              # the output layer is left alone
    params = Params((W1, W2), (np.zeros(2), np.zeros(1)))
    apply_max_norm(params, 1.0)
    np.testing.assert_allclose(params.W[0], [[0.6, 0.1], [0.8, 0.1]], rtol=1e-12)
    np.testing.assert_array_equal(params.W[1], [[30.0], [40.0]])
    apply_max_norm(params, None)
    np.testing.assert_allclose(params.W[0], [[0.6, 0.1], [0.8, 0.1]], rtol=1e-12)


def test_max_norm_caps_the_columns_of_every_hidden_layer_of_a_deeper_net():
    """Three weight layers (two hidden): W1's and W2's columns over max_norm are scaled down to
    it, those under it kept, each column by its own factor; W3 (the output layer) and the
    biases are left alone."""
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((6, 5)), rng.standard_normal((5, 4)), rng.standard_normal((4, 3)))
    W = (W[0] * [[0.1, 3.0, 0.2, 5.0, 1.0]], W[1] * [[4.0, 0.1, 2.0, 0.2]], W[2] * 10.0)
    params = Params(tuple(w.copy() for w in W), tuple(np.full(w.shape[1], 9.0) for w in W))
    max_norm = 1.5
    apply_max_norm(params, max_norm)
    for k in (0, 1):
        norms = np.sqrt((W[k] ** 2).sum(axis=0))                          # (fan_out,)
        assert (norms > max_norm).any() and (norms < max_norm).any()       # both kinds
        expected = W[k] * np.minimum(1.0, max_norm / norms)                # column by column
        np.testing.assert_allclose(params.W[k], expected, rtol=1e-14)
        np.testing.assert_allclose(np.linalg.norm(params.W[k], axis=0),
                                   np.minimum(norms, max_norm), rtol=1e-14)
    assert np.linalg.norm(W[2], axis=0).min() > max_norm                  # would be capped
    np.testing.assert_array_equal(params.W[2], W[2])
    assert all((b == 9.0).all() for b in params.b)


def test_the_cosine_schedule_stays_at_its_floor_past_the_last_step():
    """progress is clamped at 1: a rate asked for at or past the run's end is min_lr, not the
    cosine climbing back up."""
    for step in (100, 150, 199):
        assert lr_at(step, schedule="cosine", min_lr=0.01) == pytest.approx(0.01, abs=1e-15)


def test_the_warmup_warning_never_rounds_up_to_the_rate_and_skips_a_step_decay_past_the_run():
    from gpumlp.config import OptimConfig
    from gpumlp.optim import warmup_warning
    for epochs, warmup, share in ((57, 100, "0.57"), (1, 20000, "5e-05"), (1, 3, "0.333")):
        said = warmup_warning(OptimConfig(lr=0.1, warmup_epochs=warmup), epochs, 10)
        assert f"ends at {share} of optim.lr" in said, said
    late = OptimConfig(lr=0.1, warmup_epochs=2, schedule="step", step_epochs=5)
    assert warmup_warning(late, 2, 10) is None    # its first decay was past the run anyway
    early = OptimConfig(lr=0.1, warmup_epochs=2, schedule="step", step_epochs=1)
    assert "the step decays never come" in warmup_warning(early, 2, 10)
    # 1.99 epochs is not below 2, but its first decay (at step 89.55) falls after the last step
    assert warmup_warning(replace(early, warmup_epochs=2.5, step_epochs=1.99), 2, 45) == (
        "optim.warmup_epochs (2.5) is not below train.epochs (2): the rate rises all run and "
        "ends at 0.8 of optim.lr (0.08); shorten the warm-up, or give more epochs")


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_the_warmup_warning_is_decided_in_steps_as_learning_rate_decides(schedule):
    """Warned exactly where the run's last step is still inside the warm-up: 1.99 of smoke.yaml's
    2 epochs of 45 steps is 89.55 steps, so the rate reaches optim.lr only at step 89 of 0..89
    and the decay never begins; in epochs it was below the run, and nothing was said."""
    from gpumlp.config import OptimConfig
    from gpumlp.optim import warmup_warning
    cfg = OptimConfig(lr=0.1, schedule=schedule, step_epochs=1, gamma=0.5)
    said = warmup_warning(replace(cfg, warmup_epochs=1.99), 2, 45)
    never = ("the cosine decay never begins" if schedule == "cosine" else
             "the step decays never come")
    assert said == ("optim.warmup_epochs (1.99) ends within a step of train.epochs (2), at step "
                    "89.55 of 90: the rate rises all run and reaches optim.lr only at its last "
                    f"step, and {never}; shorten the warm-up, or give more epochs")
    for warmup in (1.5, 1.9, 1.97, 1.98, 89 / 45, 1.978, 1.99, 1.9999999, 2, 2.0000001, 3):
        c = replace(cfg, warmup_epochs=warmup)
        rates = [learning_rate(c, s, 45, 90) for s in range(90)]
        rises_all_run = all(a < b for a, b in zip(rates, rates[1:]))
        assert (warmup_warning(c, 2, 45) is not None) == rises_all_run, (warmup, rates[-3:])


def test_the_warmup_warning_prints_what_does_not_read_as_the_run_or_the_rate():
    """2.0000001 epochs once read "(2) is not below train.epochs (2)", and its last step's
    0.99999995 of the rate read "0.999"; 1.9999999 epochs read as 2 and its 89.9999955 steps
    as 90."""
    from gpumlp.config import OptimConfig
    from gpumlp.optim import warmup_warning
    said = warmup_warning(OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=2.0000001), 2, 45)
    assert said.startswith("optim.warmup_epochs (2.0000001) is not below train.epochs (2): the "
                           "rate rises all run and ends at 0.99999995 of optim.lr (0.099999995), "
                           "and the cosine decay never begins"), said
    said = warmup_warning(OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=1.9999999), 2, 45)
    assert said.startswith("optim.warmup_epochs (1.9999999) ends within a step of train.epochs "
                           "(2), at step 89.9999955 of 90: "), said
    said = warmup_warning(OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=2.0001), 2, 1)
    assert "ends at 0.9999500025 of optim.lr (0.099995)," in said, said    # not "1" at 3 digits


def test_a_constant_rate_within_a_tenth_of_a_percent_of_the_peak_is_not_warned_of():
    """Nothing for the user to change: 2.0000001 epochs once warned of a rate 5e-8 short of
    optim.lr. A decay that never comes is still warned of however close the rate came."""
    from gpumlp.config import OptimConfig
    from gpumlp.optim import warmup_warning
    for warmup in (2.0000001, 2.0001, 2.0019, 1.99):
        assert warmup_warning(OptimConfig(lr=0.1, warmup_epochs=warmup), 2, 45) is None, warmup
        late = OptimConfig(lr=0.1, warmup_epochs=warmup, schedule="step", step_epochs=5)
        assert warmup_warning(late, 2, 45) is None, warmup
        early = replace(late, step_epochs=1)
        assert "the step decays never come" in warmup_warning(early, 2, 45)
    said = warmup_warning(OptimConfig(lr=0.1, warmup_epochs=2.01), 2, 45)
    assert "ends at 0.995 of optim.lr (0.0995025)" in said, said

def test_a_step_decay_due_at_the_runs_end_is_no_decay_the_warning_names():
    """step_epochs == train.epochs: the first decay would come after the last step, so a
    warm-up of the run's length misses no decay: no warning; one just inside is warned of."""
    at_end = OptimConfig(lr=0.1, warmup_epochs=2, schedule="step", step_epochs=2)
    assert warmup_warning(at_end, 2, 45) is None
    just_in = OptimConfig(lr=0.1, warmup_epochs=2, schedule="step", step_epochs=1.9)
    assert "the step decays never come" in warmup_warning(just_in, 2, 45)


def test_no_warmup_warning_where_the_warmup_changes_nothing():
    """A one-step run takes optim.lr at its step, warm-up or not; a cosine down to a floor
    of optim.lr is a constant rate, 5e-8 short of which is nothing to warn of."""
    assert warmup_warning(OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=0.5), 1, 1) is None
    assert "ends at 0.2 of optim.lr" in warmup_warning(OptimConfig(lr=0.1, warmup_epochs=5), 1, 1)
    flat_cosine = OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=2.0000001, min_lr=0.1)
    assert warmup_warning(flat_cosine, 2, 45) is None
    assert "cosine decay never begins" in warmup_warning(
        OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=2.0000001, min_lr=0.05), 2, 45)
