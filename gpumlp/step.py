"""One training step: forward, loss, backward, update. The function the training loop calls.

`make_step` picks the implementation once per run. The generic step below runs on NumPy
and CuPy alike; device-specific fast paths live beside it (same signature) and are tested
against it.
"""

from __future__ import annotations

from typing import Any, Callable

from .activations import ACTIVATIONS
from .backend import Backend
from .config import Config
from .model import Params, backward, correct_count, forward, loss_and_dA2
from .optim import OptState, apply_max_norm, update

# step(params, state, X, y, lr, t, masks) -> (L, correct), both 0-d device arrays
Step = Callable[[Params, OptState, Any, Any, float, int, tuple], tuple[Any, Any]]


def generic_step(config: Config) -> Step:
    act = ACTIVATIONS[config.model.activation]

    def step(params: Params, state: OptState, X: Any, y: Any, lr: float, t: int,
             masks: tuple = ()) -> tuple[Any, Any]:
        cache = forward(params, X, act, masks)
        L, dA2 = loss_and_dA2(cache.A[-1], y, config.train.label_smoothing)
        grads = backward(params, cache, dA2, act)
        update(config.optim, params, grads, state, lr, t)
        apply_max_norm(params, config.model.max_norm)
        return L, correct_count(cache.A[-1], y)

    return step


def make_step(config: Config, backend: Backend) -> Step:
    """The fastest correct step for this config and device."""
    return generic_step(config)
