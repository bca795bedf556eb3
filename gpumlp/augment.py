"""Data augmentation on the device: random affine transforms and elastic distortions.

`make_augment(cfg)` returns None when every augmentation is off, else a function
`augment(X, rng) -> X` on (m, 784) images in [0, 1], drawing from the device generator.
"""

from __future__ import annotations

from typing import Any, Callable

from .config import AugmentConfig
from .errors import ConfigError


def make_augment(cfg: AugmentConfig) -> Callable[[Any, Any], Any] | None:
    if not (cfg.shift or cfg.rotate or cfg.scale or cfg.elastic_alpha):
        return None
    raise ConfigError("data.augment is not available yet in this version; set its keys to 0")
