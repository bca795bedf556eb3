"""Data augmentation on the device: random affine transforms and elastic distortions.

`make_augment(cfg)` returns None when every augmentation is off, else a function
`augment(X, rng) -> X` on (m, 784) images in [0, 1], drawing from the device generator
(a numpy or cupy Generator; the same seed gives the same images).

Every image of a minibatch gets its own warp, and the whole minibatch is resampled in one
call: output pixel p = (row, col) of image i reads the input image i at

    q = c0 + R(-theta_i) (p - c0 - t_i) / s_i + D_i(p)          c0 = the image centre

that is, the content is scaled by s_i and rotated by theta_i about the centre, then moved by
t_i pixels; D_i is Simard et al.'s elastic field (ICDAR 2003, section 2): a displacement drawn
uniform in [-1, 1] per pixel and per direction, convolved with a Gaussian of standard deviation
`elastic_sigma`, multiplied by `elastic_alpha`. The input is read by bilinear interpolation
(map_coordinates of order 1, zero outside the image) from scipy.ndimage or
cupyx.scipy.ndimage, whichever matches the array module.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

from .backend import array_module, ndimage_for
from .config import AugmentConfig

SIDE = 28                      # MNIST images are SIDE x SIDE, stored row-major in 784 columns
CENTER = (SIDE - 1) / 2.0      # c0: the centre of rotation and scaling, in pixel coordinates
TRUNCATE = 4.0                 # the Gaussian kernel reaches TRUNCATE * sigma, as scipy's default


class Warp(NamedTuple):
    """One geometric transform per image of a minibatch of m images."""
    theta: Any        # (m,) rotation, radians (counterclockwise as displayed)
    scale: Any        # (m,) isotropic scale factor (1 = unchanged)
    shift: Any        # (2, m) translation of the content, pixels (rows, cols)
    field: Any        # (2, m, SIDE, SIDE) elastic displacement, pixels (rows, cols), or None


def identity_warp(xp: Any, m: int, dtype: Any) -> Warp:
    return Warp(xp.zeros(m, dtype), xp.ones(m, dtype), xp.zeros((2, m), dtype), None)


def gaussian_matrix(xp: Any, sigma: float, dtype: Any) -> Any:
    """K (SIDE, SIDE): K @ F convolves the columns of F with a normalised Gaussian, zero outside.

    Row i holds g(i - j) for |i - j| <= TRUNCATE * sigma: the same kernel as
    scipy.ndimage.gaussian_filter1d(mode="constant"), as one small matrix product.
    """
    radius = int(TRUNCATE * sigma + 0.5)
    offsets = xp.arange(-radius, radius + 1, dtype="float64")
    g = xp.exp(-0.5 * (offsets / sigma) ** 2)
    g /= g.sum()                                                    # (2 radius + 1,)
    i = xp.arange(SIDE)
    lag = i[:, None] - i[None, :]                                   # (SIDE, SIDE)
    inside = xp.abs(lag) <= radius
    K = xp.where(inside, g[xp.clip(lag + radius, 0, 2 * radius)], 0.0)
    return K.astype(dtype)


@functools.lru_cache(maxsize=8)
def smoothing_matrix(xp: Any, sigma: float, dtype: Any) -> Any:
    """gaussian_matrix, built once per (array module, sigma, dtype) rather than every batch;
    the callers only read it."""
    return gaussian_matrix(xp, sigma, dtype)


def elastic_field(rng: Any, m: int, alpha: float, sigma: float, dtype: Any) -> Any:
    """D (2, m, SIDE, SIDE): uniform [-1, 1] displacements, Gaussian-smoothed, times alpha."""
    U = rng.random((2, m, SIDE, SIDE), dtype=dtype)
    U *= 2
    U -= 1                                                          # uniform in [-1, 1)
    K = smoothing_matrix(array_module(U), sigma, U.dtype)           # (SIDE, SIDE)
    D = K @ U @ K.T                                                 # smooth along rows, then cols
    D *= alpha
    return D


def draw_warp(cfg: AugmentConfig, rng: Any, xp: Any, m: int, dtype: Any) -> Warp:
    """A random Warp for m images: each transform drawn uniformly within its configured bound.

    Only the enabled transforms draw from `rng`, always in this order.
    """
    warp = identity_warp(xp, m, dtype)

    def symmetric(shape: Any, bound: float) -> Any:                 # uniform in [-bound, bound)
        return (rng.random(shape, dtype=dtype) * 2 - 1) * bound

    if cfg.rotate:
        warp = warp._replace(theta=symmetric(m, math.radians(cfg.rotate)))
    if cfg.scale:
        warp = warp._replace(scale=1 + symmetric(m, cfg.scale))
    if cfg.shift:
        warp = warp._replace(shift=symmetric((2, m), cfg.shift))
    if cfg.elastic_alpha:
        field = elastic_field(rng, m, cfg.elastic_alpha, cfg.elastic_sigma, dtype)
        warp = warp._replace(field=field)
    return warp


def sample_coordinates(warp: Warp, xp: Any, dtype: Any) -> Any:
    """(3, m, SIDE, SIDE): for each output pixel, (image index, input row, input col)."""
    m = warp.theta.shape[0]
    p = xp.arange(SIDE, dtype=dtype)
    u = p[None, :, None] - CENTER - warp.shift[0][:, None, None]    # (m, SIDE, 1) rows from c0
    v = p[None, None, :] - CENTER - warp.shift[1][:, None, None]    # (m, 1, SIDE) cols from c0
    cos = (xp.cos(warp.theta) / warp.scale)[:, None, None]          # (m, 1, 1)
    sin = (xp.sin(warp.theta) / warp.scale)[:, None, None]          # (m, 1, 1)
    rows = CENTER + cos * u + sin * v                               # (m, SIDE, SIDE)
    cols = CENTER - sin * u + cos * v                               # (m, SIDE, SIDE)
    if warp.field is not None:
        rows = rows + warp.field[0]
        cols = cols + warp.field[1]
    index = xp.broadcast_to(xp.arange(m, dtype=dtype)[:, None, None], rows.shape)
    return xp.stack([index, rows, cols])


def apply_warp(X: Any, warp: Warp) -> Any:
    """The images of X (m, 784) resampled through `warp`, by bilinear interpolation."""
    xp = array_module(X)
    m = X.shape[0]
    coords = sample_coordinates(warp, xp, X.dtype)                  # (3, m, SIDE, SIDE)
    images = X.reshape(m, SIDE, SIDE)
    out = ndimage_for(xp).map_coordinates(images, coords, order=1, mode="constant", cval=0.0,
                                          prefilter=False)          # (m, SIDE, SIDE)
    # Bilinear weights are >= 0 and sum to 1, so values stay in [0, 1]; the clip only
    # absorbs a last-bit roundoff of that sum.
    xp.clip(out, 0.0, 1.0, out=out)
    return out.reshape(m, SIDE * SIDE)


def make_augment(cfg: AugmentConfig) -> Callable[[Any, Any], Any] | None:
    """None when every augmentation is off, else `augment(X, rng)` drawing one warp per image."""
    if not (cfg.shift or cfg.rotate or cfg.scale or cfg.elastic_alpha):
        return None

    def augment(X: Any, rng: Any) -> Any:
        return apply_warp(X, draw_warp(cfg, rng, array_module(X), X.shape[0], X.dtype))

    return augment
