"""Each activation phi beside its derivative phi': the derivative is the central difference
of phi (float64), the values match the textbook formulas, and the dtype is kept."""

from __future__ import annotations

import math

import numpy as np
import pytest

from activation_reference import GRID, TERMS, float32_error
from gpumlp.activations import ACTIVATIONS, LEAKY_SLOPE

# Points away from 0, where relu and leaky_relu have their kink, plus large magnitudes.
POINTS = np.concatenate([np.linspace(-6, -0.01, 40), np.linspace(0.01, 6, 40), [-30.0, 30.0]])

REFERENCE = {  # phi written independently, elementwise with math
    "relu": lambda a: max(a, 0.0),
    "leaky_relu": lambda a: a if a > 0 else LEAKY_SLOPE * a,
    "sigmoid": lambda a: 1 / (1 + math.exp(-a)),
    "tanh": math.tanh,
    "gelu": lambda a: 0.5 * a * (1 + math.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))),
}


def test_the_five_activations_are_registered():
    assert sorted(ACTIVATIONS) == ["gelu", "leaky_relu", "relu", "sigmoid", "tanh"]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivative_equals_the_central_difference_float64(name):
    act, eps = ACTIVATIONS[name], 1e-6
    numeric = (act.phi(POINTS + eps) - act.phi(POINTS - eps)) / (2 * eps)
    np.testing.assert_allclose(act.phi_prime(POINTS), numeric, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_phi_matches_its_textbook_formula(name):
    expected = np.array([REFERENCE[name](a) for a in POINTS])
    np.testing.assert_allclose(ACTIVATIONS[name].phi(POINTS), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_phi_and_phi_prime_keep_the_dtype(name, dtype):
    A = POINTS.reshape(2, -1).astype(dtype)
    act = ACTIVATIONS[name]
    assert act.phi(A).dtype == dtype and act.phi(A).shape == A.shape
    assert act.phi_prime(A).dtype == dtype and act.phi_prime(A).shape == A.shape
    for one in (np.array(-3.0, dtype=dtype), dtype(-3.0)):   # a 0-d array and a scalar too
        assert np.isclose(act.phi(one), act.phi(np.full((1, 1), -3.0, dtype=dtype))[0, 0],
                          rtol=1e-6, atol=0)
        assert np.isfinite(act.phi_prime(one))
        if int(np.__version__.split(".")[0]) >= 2:  # NumPy 1: a float32 scalar and a Python
            # number make a float64
            assert act.phi(one).dtype == dtype and act.phi_prime(one).dtype == dtype

RAISE_BUT_UNDERFLOW = dict(over="raise", invalid="raise", divide="raise", under="ignore")


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_phi_and_phi_prime_are_finite_for_extreme_inputs(name):
    A = np.array([-1e4, -100.0, 100.0, 1e4], dtype=np.float32)
    act = ACTIVATIONS[name]
    for huge in (np.array([-3.4e38, -2.2e38, 2.2e38, 3.4e38], dtype=np.float32),
                 np.array([-1.7e308, 1.7e308])):   # gelu' was inf * 0 = NaN here (2 K A)
        # gelu's A^3 overflows (inf, then e^-inf = 0); the others warn of nothing (tanh' did,
        # of 2 A past 1.7e38, with the right value)
        with (np.errstate(all="ignore") if name == "gelu" else np.errstate(**RAISE_BUT_UNDERFLOW)):
            assert not np.isnan(act.phi_prime(huge)).any(), huge.dtype
    # no overflow warning hidden behind a finite answer (e^-1e4 underflowing to 0 is the answer)
    with np.errstate(**RAISE_BUT_UNDERFLOW):
        assert np.isfinite(act.phi(A)).all() and np.isfinite(act.phi_prime(A)).all()


def test_kinked_derivatives_at_and_around_zero():
    A = np.array([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(ACTIVATIONS["relu"].phi_prime(A), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(ACTIVATIONS["leaky_relu"].phi_prime(A),
                                  [LEAKY_SLOPE, LEAKY_SLOPE, 1.0])
    assert ACTIVATIONS["sigmoid"].phi_prime(np.array([0.0]))[0] == 0.25
    assert ACTIVATIONS["tanh"].phi_prime(np.array([0.0]))[0] == 1.0
    assert ACTIVATIONS["gelu"].phi_prime(np.array([0.0]))[0] == 0.5


def test_the_leaky_slope_is_the_documented_0_01():
    """The expected values above are built from LEAKY_SLOPE: this pins its value, the one
    docs/derivation.md and the ONNX export (LeakyRelu alpha) promise."""
    act = ACTIVATIONS["leaky_relu"]
    assert act.phi(np.array([-1.0, 2.0])).tolist() == [-0.01, 2.0]
    assert act.phi_prime(np.array([-1.0, 2.0])).tolist() == [0.01, 1.0]


@pytest.mark.parametrize("which", ["phi", "phi_prime"])
@pytest.mark.parametrize("name", sorted(TERMS))
def test_float32_smooth_activations_are_within_4_ulps_of_float64_on_both_tails(name, which):
    """In float32, from A = -40 to 40, within 4 ulps of the float64 value (gelu: times its
    condition). The forms built on 1 + tanh and 1 - tanh^2 cancelled: sigmoid(-20) = 2e-9 came
    out 0, and so did tanh'(10) and gelu(-6), which training then read as exactly flat."""
    A = np.concatenate([GRID, np.float32([-3.1069937, 3.1069937])])  # tanh' as (e^-|A|)^2: 4.9
    got = getattr(ACTIVATIONS[name], which)(A)
    assert got.dtype == np.float32
    error = float32_error(name, which, got, A)
    worst = np.nanargmax(error)
    assert error[worst] <= 4, f"{name} {which} at A = {A[worst]}: {error[worst]:.3g} ulps"
