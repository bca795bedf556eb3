"""Central differences for the tests' own gradient checks, independent of gpumlp.gradcheck."""

from __future__ import annotations


def central_difference(loss, theta, i, eps=1e-6):
    """(loss(theta_i + eps) - loss(theta_i - eps)) / 2 eps, theta changed in place and restored."""
    flat = theta.reshape(-1)
    saved = flat[i]
    flat[i] = saved + eps
    plus = loss()
    flat[i] = saved - eps
    minus = loss()
    flat[i] = saved
    return (plus - minus) / (2 * eps)
