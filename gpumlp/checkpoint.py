"""model.npz: the trained weights and the config they belong to, saved and loaded safely.

Arrays W1, b1, W2, b2 (W3, b3, ... for deeper nets), W1 of shape (784, h), plus `config`,
the run's resolved config as a JSON string. Loading never unpickles; a file whose arrays
do not match its config is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .backend import to_host
from .config import Config, config_from_dict, config_to_dict
from .errors import CheckpointError, ConfigError
from .model import Params
from .npzio import load_npz, save_npz



def param_arrays(params: Params) -> dict[str, np.ndarray]:
    """{"W1": ..., "b1": ..., "W2": ...} as host arrays."""
    arrays = {}
    for k, (Wk, bk) in enumerate(zip(params.W, params.b), start=1):
        arrays[f"W{k}"] = to_host(Wk)
        arrays[f"b{k}"] = to_host(bk)
    return arrays


def save_model(path: str | os.PathLike, params: Params, config: Config) -> None:
    arrays = param_arrays(params)
    arrays["config"] = np.array(json.dumps(config_to_dict(config), sort_keys=True))
    save_npz(path, arrays)


def params_from_arrays(arrays: dict, widths: tuple[int, ...], source: str) -> Params:
    """Params from W1, b1, ... checked against `widths` (d, h1, ..., c)."""
    W, b = [], []
    for k, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        for name, shape in ((f"W{k}", (fan_in, fan_out)), (f"b{k}", (fan_out,))):
            if name not in arrays:
                raise CheckpointError(f"{source}: array {name} is missing for hidden sizes "
                                      f"{list(widths[1:-1])}")
            array = arrays[name]
            if array.shape != shape or array.dtype.kind != "f":
                raise CheckpointError(f"{source}: {name} has shape {array.shape} and dtype "
                                      f"{array.dtype}; expected {shape} floats")
            if not np.isfinite(array).all():
                raise CheckpointError(f"{source}: {name} holds NaN or infinite values")
        W.append(arrays[f"W{k}"])
        b.append(arrays[f"b{k}"])
    extra = sorted(n for n in arrays if n[:1] in "Wb" and n[1:].isdigit() and int(n[1:]) > len(W))
    if extra:
        raise CheckpointError(f"{source}: arrays {extra} do not fit hidden sizes "
                              f"{list(widths[1:-1])}")
    return Params(tuple(W), tuple(b))


def config_of(arrays: dict, source: str) -> Config:
    if "config" not in arrays or arrays["config"].dtype.kind != "U" or arrays["config"].ndim:
        raise CheckpointError(f"{source}: no config string inside; not a gpumlp model file")
    try:
        return config_from_dict(json.loads(str(arrays["config"])))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{source}: its config is invalid ({e})") from None


def load_model(path: str | os.PathLike) -> tuple[Params, Config]:
    """(params on the host, config) from a model.npz; a CheckpointError if anything is off."""
    source = str(Path(path))
    arrays = load_npz(path)
    config = config_of(arrays, source)
    params = params_from_arrays(arrays, config.model.layer_widths, source)
    dtype = np.dtype(config.train.dtype)
    return Params(tuple(w.astype(dtype) for w in params.W),
                  tuple(v.astype(dtype) for v in params.b)), config


def load_init(path: str | os.PathLike, widths: tuple[int, ...], dtype: str) -> Params:
    """Initial weights for `--init`: any .npz with W1, b1, ... of the configured shapes."""
    source = str(Path(path))
    params = params_from_arrays(load_npz(path), widths, source)
    return Params(tuple(w.astype(dtype) for w in params.W), tuple(v.astype(dtype) for v in params.b))
