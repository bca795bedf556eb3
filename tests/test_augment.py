"""Augmentation (affine and elastic warps) and the regularisers around it: dropout and its
gradient, evaluation without dropout, and a short training run with augmentation on."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from gpumlp.activations import ACTIVATIONS
from gpumlp.augment import (
    SIDE,
    Warp,
    apply_warp,
    draw_warp,
    elastic_field,
    gaussian_matrix,
    identity_warp,
    make_augment,
)
from gpumlp.backend import CPU
from gpumlp.config import AugmentConfig, build_config
from gpumlp.data import gather, prepare_data, to_inputs
from gpumlp.mnist import Mnist, Split
from gpumlp.model import forward, loss_and_dA2
from gpumlp.train import evaluate, new_state, train

STRONG = AugmentConfig(shift=2.0, rotate=15.0, scale=0.15, elastic_alpha=34.0, elastic_sigma=4.0)


def blob_images(n: int, seed: int) -> np.ndarray:
    """(n, 784) float32 images in [0, 1]: smooth random strokes, each one unlike the others."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((n, SIDE, SIDE)), (0, 2, 2))
    noise -= noise.mean(axis=(1, 2), keepdims=True)
    img = np.clip(noise / noise.std(axis=(1, 2), keepdims=True), 0, 1)
    img[:, :4, :] = img[:, -4:, :] = img[:, :, :4] = img[:, :, -4:] = 0   # an empty border, as MNIST
    return img.reshape(n, SIDE * SIDE).astype(np.float32)


def fake_mnist(n_train: int, n_test: int, seed: int = 0) -> Mnist:
    """Ten class prototypes plus per-example noise, as uint8 pixels: learnable in two epochs."""
    rng = np.random.default_rng(seed)
    prototypes = blob_images(10, seed + 100)

    def split(n: int) -> Split:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        x = prototypes[labels] + 0.2 * rng.random((n, SIDE * SIDE))
        return Split((np.clip(x, 0, 1) * 255).astype(np.uint8), labels)

    return Mnist(split(n_train), split(n_test))


# --- the warp itself -------------------------------------------------------------------------

def test_make_augment_is_none_when_every_strength_is_zero():
    assert make_augment(AugmentConfig()) is None
    assert make_augment(AugmentConfig(elastic_sigma=3.0)) is None   # sigma alone does nothing


def test_identity_warp_returns_the_images_exactly():
    X = blob_images(16, 0)
    assert np.array_equal(apply_warp(X, identity_warp(np, 16, X.dtype)), X)


@pytest.mark.parametrize("key", ["shift", "rotate", "scale", "elastic_alpha"])
def test_a_transform_at_zero_strength_is_the_identity(key):
    """Only `key` switched on, with its drawn strength then set to zero: the identity."""
    X = blob_images(8, 1)
    on = AugmentConfig(**{key: 1.0})
    rng = np.random.default_rng(0)
    warp = draw_warp(on, rng, np, 8, X.dtype)
    zeroed = {"shift": warp._replace(shift=np.zeros_like(warp.shift)),
              "rotate": warp._replace(theta=np.zeros_like(warp.theta)),
              "scale": warp._replace(scale=np.ones_like(warp.scale)),
              "elastic_alpha": warp._replace(field=np.zeros_like(warp.field) if warp.field is not None else None)}
    assert not np.array_equal(apply_warp(X, warp), X)               # the strength-1 warp moves pixels
    assert np.array_equal(apply_warp(X, zeroed[key]), X)


def shifted(m: int, rows: float, cols: float) -> Warp:
    warp = identity_warp(np, m, np.float32)
    return warp._replace(shift=np.array([[rows] * m, [cols] * m], dtype=np.float32))


def test_a_one_pixel_shift_moves_the_image_by_one_pixel():
    X = blob_images(4, 2)
    images = X.reshape(4, SIDE, SIDE)
    right = apply_warp(X, shifted(4, 0, 1)).reshape(4, SIDE, SIDE)
    down = apply_warp(X, shifted(4, 1, 0)).reshape(4, SIDE, SIDE)
    assert np.array_equal(right[:, :, 1:], images[:, :, :-1]) and not right[:, :, 0].any()
    assert np.array_equal(down[:, 1:, :], images[:, :-1, :]) and not down[:, 0, :].any()


def test_a_half_pixel_shift_is_the_mean_of_the_two_neighbours():
    X = blob_images(3, 3)
    images = X.reshape(3, SIDE, SIDE)
    half = apply_warp(X, shifted(3, 0, 0.5)).reshape(3, SIDE, SIDE)
    np.testing.assert_allclose(half[:, :, 1:], (images[:, :, 1:] + images[:, :, :-1]) / 2, atol=1e-6)


def test_a_quarter_turn_is_a_counterclockwise_rot90_and_scale_two_magnifies_the_centre():
    X = blob_images(2, 4)
    images = X.reshape(2, SIDE, SIDE)
    turn = identity_warp(np, 2, np.float32)._replace(theta=np.full(2, math.pi / 2, np.float32))
    out = apply_warp(X, turn).reshape(2, SIDE, SIDE)
    np.testing.assert_allclose(out, np.rot90(images, k=1, axes=(1, 2)), atol=1e-5)
    # data.augment.scale: a factor s > 1 magnifies, output pixel p reads c0 + (p - c0) / s
    zoom = identity_warp(np, 2, np.float32)._replace(scale=np.full(2, 2.0, np.float32))
    rows, cols = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)                 # (28, 28) each
    ramps = np.stack([rows + 2 * cols, 2 * rows + cols]) / np.float32(81)  # (2, 28, 28) in [0, 1]
    big = apply_warp(ramps.reshape(2, -1), zoom).reshape(2, SIDE, SIDE)
    q = 13.5 + (np.arange(SIDE) - 13.5) / 2              # (28,) read at, all inside [6.75, 20.25]
    expected = np.stack([q[:, None] + 2 * q[None, :], 2 * q[:, None] + q[None, :]]) / 81
    np.testing.assert_allclose(big, expected, atol=1e-5)   # bilinear reads a ramp exactly
    noise = np.random.default_rng(4).random((2, SIDE, SIDE), dtype=np.float32)  # no zeros
    big = apply_warp(noise.reshape(2, -1), zoom).reshape(2, SIDE, SIDE)
    # output pixel 15 reads 13.5 + 1.5 / 2 = 14.25 on both axes: 3/4 of pixel 14, 1/4 of 15
    weights = np.outer([0.75, 0.25], [0.75, 0.25])        # (2, 2)
    np.testing.assert_allclose(big[:, 15, 15], (noise[:, 14:16, 14:16] * weights).sum(axis=(1, 2)),
                               atol=1e-6)
    assert np.abs(big[:, 15, 15] - noise[:, 15, 15]).max() > 0.01   # not the image unchanged


def test_rows_keep_their_images_so_labels_stay_attached():
    """Each warped image stays nearest to its own original: the batch order (and so the
    labels, which augmentation never sees) still matches."""
    X = blob_images(64, 5)
    mild = AugmentConfig(shift=1.0, rotate=5.0, scale=0.05, elastic_alpha=10.0, elastic_sigma=4.0)
    out = make_augment(mild)(X, np.random.default_rng(0))
    distances = ((out[:, None, :] - X[None, :, :]) ** 2).sum(axis=2)   # (64, 64)
    assert np.array_equal(distances.argmin(axis=1), np.arange(64))


def test_pixels_stay_in_the_unit_interval_and_keep_the_dtype():
    for dtype in (np.float32, np.float64):
        ones = np.ones((32, SIDE * SIDE), dtype=dtype)
        for X in (ones, blob_images(32, 6).astype(dtype)):
            out = make_augment(STRONG)(X, np.random.default_rng(1))
            assert out.dtype == dtype and out.shape == X.shape
            assert out.min() >= 0.0 and out.max() <= 1.0
        assert make_augment(STRONG)(ones, np.random.default_rng(1)).max() == 1.0   # interior kept


def test_same_seed_same_images_other_seed_other_images():
    X = blob_images(16, 7)
    augment = make_augment(STRONG)
    a = augment(X, np.random.default_rng(42))
    b = augment(X, np.random.default_rng(42))
    c = augment(X, np.random.default_rng(43))
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_each_image_of_a_batch_gets_its_own_warp():
    X = np.repeat(blob_images(1, 8), 8, axis=0)
    out = make_augment(STRONG)(X, np.random.default_rng(0))
    assert len({row.tobytes() for row in out}) == 8


def test_the_input_array_is_not_modified():
    X = blob_images(8, 9)
    before = X.copy()
    make_augment(STRONG)(X, np.random.default_rng(0))
    assert np.array_equal(X, before)


# --- the elastic field ------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1.0, 4.0, 6.0])
def test_gaussian_matrix_is_scipys_gaussian_filter(sigma):
    U = np.random.default_rng(0).random((3, SIDE, SIDE))
    K = gaussian_matrix(np, sigma, np.float64)
    expected = ndimage.gaussian_filter(U, (0, sigma, sigma), mode="constant", cval=0.0)
    np.testing.assert_allclose(K @ U @ K.T, expected, atol=1e-12)


def test_elastic_field_is_smooth_and_scales_with_alpha():
    D = elastic_field(np.random.default_rng(0), 64, 1.0, 4.0, np.float64)  # (2, m, 28, 28)
    assert D.shape == (2, 64, SIDE, SIDE)
    step = np.abs(np.diff(D, axis=-1)).mean() + np.abs(np.diff(D, axis=-2)).mean()
    assert step / 2 < 0.15 * D.std()              # white noise would give about 1.1 * std
    neighbours = np.corrcoef(D[..., :-1].ravel(), D[..., 1:].ravel())[0, 1]
    assert neighbours > 0.95
    D34 = elastic_field(np.random.default_rng(0), 64, 34.0, 4.0, np.float64)
    np.testing.assert_allclose(D34, 34.0 * D, rtol=1e-12)


def test_elastic_distortion_moves_pixels_by_about_alpha_times_the_smoothed_noise():
    cfg = AugmentConfig(elastic_alpha=34.0, elastic_sigma=4.0)
    warp = draw_warp(cfg, np.random.default_rng(0), np, 256, np.float64)
    rms = np.sqrt((warp.field ** 2).mean())
    assert 0.5 < rms < 3.0                        # Simard's setting: displacements of a pixel or two


# --- inside the training pipeline -------------------------------------------------------------

def test_to_inputs_augments_before_normalising_and_gather_keeps_labels():
    mnist = fake_mnist(200, 50)
    config = build_config(None, ["data.augment.shift=2", "data.augment.elastic_alpha=20",
                                 "data.augment.elastic_sigma=4"])
    data = prepare_data(mnist, config.data, CPU)
    idx = np.arange(0, 200, 3)
    images, y = gather(data.train, idx)
    X = to_inputs(images, "unit", "float32", make_augment(config.data.augment), np.random.default_rng(0))
    assert np.array_equal(y, mnist.train.labels[idx])
    assert X.shape == (len(idx), 784) and X.dtype == np.float32
    assert 0.0 <= X.min() and X.max() <= 1.0
    assert not np.allclose(X, images / 255.0)
    Xs = to_inputs(images, "standard", "float32", make_augment(config.data.augment), np.random.default_rng(0))
    np.testing.assert_allclose(Xs, (X - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)


def test_a_short_training_run_with_augmentation_and_dropout_learns():
    mnist = fake_mnist(1000, 300)
    overrides = ["model.hidden=64", "model.dropout=0.2", "model.max_norm=3", "train.epochs=3",
                 "train.batch_size=50", "train.label_smoothing=0.1", "data.val_size=100",
                 "data.augment.shift=1", "data.augment.rotate=8", "data.augment.scale=0.08",
                 "data.augment.elastic_alpha=20", "data.augment.elastic_sigma=4"]
    result = train(build_config(None, overrides), CPU, mnist)
    assert len(result.history) == 3
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert result.summary["test_accuracy"] > 0.8


def test_a_run_with_augmentation_is_reproducible():
    mnist = fake_mnist(300, 100)
    overrides = ["model.hidden=32", "train.epochs=1", "train.batch_size=50",
                 "data.augment.rotate=10", "data.augment.elastic_alpha=20"]
    first = train(build_config(None, overrides), CPU, mnist)
    second = train(build_config(None, overrides), CPU, mnist)
    plain = train(build_config(None, overrides[:3]), CPU, mnist)
    assert np.array_equal(first.params.W[0], second.params.W[0])
    assert not np.array_equal(first.params.W[0], plain.params.W[0])


# --- dropout ---------------------------------------------------------------------------------

def test_dropout_is_off_at_evaluation():
    mnist = fake_mnist(100, 400)
    config = build_config(None, ["model.hidden=[32, 16]", "model.dropout=0.5",
                                 "train.eval_batch_size=150"])
    data = prepare_data(mnist, config.data, CPU)
    params = new_state(config, CPU).params
    first, second = evaluate(params, data.test, config), evaluate(params, data.test, config)
    assert first == second
    X = data.test.images / np.float32(255)
    A_out = forward(params, X.astype(np.float32), ACTIVATIONS["relu"]).A[-1]   # no masks
    L, _ = loss_and_dA2(A_out, data.test.labels)
    assert first[0] == pytest.approx(float(L), rel=1e-5)
    assert first[1] == (A_out.argmax(axis=1) == data.test.labels).mean()


# --- the transforms' bounds and the elastic field's smoothness -----------------------------

@pytest.mark.parametrize("key, bound, drawn", [
    ("rotate", 30.0, lambda warp: np.degrees(warp.theta)),
    ("scale", 0.3, lambda warp: warp.scale - 1),
    ("shift", 3.0, lambda warp: warp.shift),
])
def test_each_transform_fills_its_configured_bound_and_stays_in_it(key, bound, drawn):
    """Uniform in [-b, b]: both ends reached (a draw in [0, b) alone reaches b as well), and
    half the draws within b / 2 of no change."""
    for b in (bound, bound / 3):
        warp = draw_warp(AugmentConfig(**{key: b}), np.random.default_rng(0), np, 4000, np.float64)
        values = drawn(warp)
        largest = np.abs(values).max()
        assert 0.95 * b < largest <= b
        assert values.min() < -0.95 * b and values.max() > 0.95 * b, (values.min(), values.max())
        assert 0.45 < (np.abs(values) < b / 2).mean() < 0.55


def test_a_larger_elastic_sigma_gives_a_smoother_field():
    def neighbour_correlation(sigma):
        D = elastic_field(np.random.default_rng(0), 64, 1.0, sigma, np.float64)
        return np.corrcoef(D[..., :-1].ravel(), D[..., 1:].ravel())[0, 1]

    assert neighbour_correlation(1.0) < neighbour_correlation(4.0) - 0.1


@pytest.mark.parametrize("sigma", [0.9, 1.2, 2.4])
def test_gaussian_matrix_rounds_its_radius_as_scipy_does(sigma):
    """4 sigma with a fractional part of .5 or more: the kernel reaches round(4 sigma), as
    scipy's radius int(truncate * sigma + 0.5) does, not its floor."""
    U = np.random.default_rng(1).random((3, SIDE, SIDE))
    K = gaussian_matrix(np, sigma, np.float64)
    expected = ndimage.gaussian_filter(U, (0, sigma, sigma), mode="constant", cval=0.0)
    np.testing.assert_allclose(K @ U @ K.T, expected, atol=1e-12)
