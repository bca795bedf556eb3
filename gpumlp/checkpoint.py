"""model.npz: the trained weights and the config they belong to, saved and loaded safely.

Arrays W1, b1, W2, b2 (W3, b3, ... for deeper nets), W1 of shape (784, h), plus `config`,
the run's resolved config as a JSON string. Loading never unpickles; a file whose arrays
do not match its config is refused, the shapes read from the .npy headers before any weight is
read (so a file never costs more memory than the model its config describes), and so are
weights that are not finite once converted to the config's train.dtype.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from .backend import to_host
from .config import Config, config_from_dict, config_to_dict
from .errors import CheckpointError, ConfigError, shell_path, shown
from .files import writing_now
from .model import Params
from .npzio import Npz, save_npz

MAX_CONFIG_CHARS = 1_000_000  # a saved config is a few kB of JSON; a larger string is not read


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


def layer_names(widths: tuple[int, ...]) -> list[str]:
    """["W1", "b1", "W2", ...] for layer widths (d, h1, ..., c)."""
    return [f"{kind}{k}" for k in range(1, len(widths)) for kind in "Wb"]


def check_layout(arrays: Mapping[str, Any], widths: tuple[int, ...], source: str) -> None:
    """Refuse (CheckpointError) unless `arrays` holds W1, b1, ... of `widths` (d, h1, ..., c)
    as floats and no layer beyond; arrays, or .npy headers (anything with shape and dtype)."""
    for k, (fan_in, fan_out) in enumerate(pairwise(widths), start=1):
        for name, shape in ((f"W{k}", (fan_in, fan_out)), (f"b{k}", (fan_out,))):
            if name not in arrays:
                raise CheckpointError(f"{source}: array {name} is missing for hidden sizes "
                                      f"{list(widths[1:-1])}")
            array = arrays[name]
            if tuple(array.shape) != shape or array.dtype.kind != "f":
                raise CheckpointError(f"{source}: {name} has shape {shown(array.shape)} and dtype "
                                      f"{shown(array.dtype)}; expected {shape} floats")
    depth = len(widths) - 1
    extra = sorted(n for n in arrays if n[:1] in "Wb" and n[1:].isdigit() and int(n[1:]) > depth)
    if extra:
        raise CheckpointError(f"{source}: arrays {shown(extra)} do not fit hidden sizes "
                              f"{list(widths[1:-1])}")


def as_finite(array: np.ndarray, name: str, dtype: str | None, source: str,
           fix: str = "") -> np.ndarray:
    """`array` as `dtype` (None: as it is), refused unless every value is finite there; `fix`
    ends the message when the values are finite but too large for `dtype`."""
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array if dtype is None else array.astype(dtype)
    if not np.isfinite(converted).all():
        if not np.isfinite(array).all():
            raise CheckpointError(f"{source}: {name} holds NaN or infinite values")
        raise CheckpointError(f"{source}: {name} holds values up to {np.abs(array).max():.3g}, "
                              f"which do not fit {np.dtype(dtype)}{fix}")
    return converted


def params_from_arrays(arrays: Mapping[str, np.ndarray], widths: tuple[int, ...], source: str,
                       dtype: str | None = None, fix: str = "") -> Params:
    """Params from W1, b1, ... checked against `widths` (d, h1, ..., c), converted to `dtype`
    (None: kept as they are) and finite there; `fix` as in `as_finite`."""
    check_layout(arrays, widths, source)
    values = [as_finite(arrays[name], name, dtype, source, fix) for name in layer_names(widths)]
    return Params(tuple(values[0::2]), tuple(values[1::2]))


def read_layers(npz: Npz, widths: tuple[int, ...], source: str, dtype: str | None,
                fix: str) -> Params:
    """W1, b1, ... of `widths` from `npz`, their shapes checked from the headers before any is
    read; then as `params_from_arrays`."""
    check_layout(npz.headers, widths, source)
    arrays = {name: npz.read(name) for name in layer_names(widths)}
    return params_from_arrays(arrays, widths, source, dtype, fix)


def parse_json(text: str) -> Any:
    """`text` parsed as JSON; a ValueError with a short reason when Python cannot read it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} (character {e.pos + 1})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError:  # Python's limit on the digits of an integer
        raise ValueError("JSON with a number too long to read") from None


def no_config(npz: Npz, source: str) -> CheckpointError:
    """The error for a file with no config string: a training checkpoint (its `state` record
    inside) is told of the model beside it, or how to finish its run, which writes one."""
    if "config" in npz.headers or "state" not in npz.headers:
        return CheckpointError(f"{source}: no config string inside; not a gpumlp model file")
    folder = Path(source).parent
    model = shell_path(folder / "model.npz")
    if (folder / "model.npz").is_file():  # a finished run: its model is beside the checkpoint
        return CheckpointError(f"{source}: a training checkpoint, not a model; give the run's "
                               f"model, {model}")
    if not (folder / "config.yaml").is_file():  # moved out of its run's folder
        return CheckpointError(f"{source}: a training checkpoint, not a model; give a model.npz, "
                               "which gpumlp train writes into its run's folder at the end")
    if writing_now(folder):
        return CheckpointError(f"{source}: a training checkpoint, not a model; a gpumlp train "
                               f"writing its run now will write {model} when it ends")
    return CheckpointError(f"{source}: a training checkpoint, not a model; finish the run with "
                           f"gpumlp train --resume {shell_path(folder)} (it writes "
                           f"{model})")


def config_of(npz: Npz, source: str) -> Config:
    """The config saved in a model file, its size checked before it is read."""
    header = npz.headers.get("config")
    if header is None or header.dtype.kind != "U" or header.ndim:
        raise no_config(npz, source)
    if header.dtype.itemsize > 4 * MAX_CONFIG_CHARS:
        raise CheckpointError(f"{source}: its config string holds {header.dtype.itemsize // 4:,} "
                              f"characters, more than the {MAX_CONFIG_CHARS:,} a config may hold; "
                              "not a gpumlp model file")
    try:
        values = parse_json(str(npz.read("config")))
    except ValueError as e:
        raise CheckpointError(f"{source}: its config is invalid ({e}); not a gpumlp model "
                              "file") from None
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise CheckpointError(f"{source}: its config is invalid ({e})") from None


def unfinished_run(path: Path) -> str:
    """For a model.npz missing from a run folder that has a checkpoint but no summary.json
    (a run not finished): how to finish it; "" otherwise."""
    folder = path.parent
    if path.name != "model.npz" or path.exists() or (folder / "summary.json").exists() \
            or not all((folder / name).is_file() for name in ("checkpoint.npz", "config.yaml")):
        return ""
    run = shell_path(folder)
    if writing_now(folder):
        return f"; the run in {run} has not finished: a gpumlp train writing it now will write it"
    return f"; the run in {run} has not finished: gpumlp train --resume {run} writes it"


def open_model(path: Path) -> Npz:
    """`path` opened as an Npz; a model.npz missing from an unfinished run says how to finish it."""
    try:
        return Npz(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{unfinished_run(path)}") from None


def load_model(path: str | os.PathLike) -> tuple[Params, Config]:
    """(params on the host, config) from a model.npz; a CheckpointError if anything is off.

    The config is read first and the weights' shapes are checked from their headers, so that
    no more is read than the model the config describes."""
    source = str(Path(path))
    fix = ", its config's train.dtype; gpumlp train never writes such a model: train it again"
    with open_model(Path(path)) as npz:
        config = config_of(npz, source)
        try:
            check_layout(npz.headers, config.model.layer_widths, source)
        except CheckpointError as e:
            raise CheckpointError(f"{e}: not the net its own config describes, so the file was "
                                  "changed after gpumlp wrote it; train it again") from None
        return read_layers(npz, config.model.layer_widths, source, config.train.dtype, fix), config


def trained_widths(npz: Npz, source: str, widths: tuple[int, ...]) -> str:
    """For `--init` weights not of `widths`: the model.hidden of the gpumlp model they are, and
    how to train with it; "" when the file holds no readable config, or one of these widths."""
    if "config" not in npz.headers:
        return ""
    try:
        model = config_of(npz, source).model
    except CheckpointError:
        return ""
    if model.layer_widths == widths:
        return ""
    hidden = model.hidden if isinstance(model.hidden, int) else list(model.hidden)
    text = json.dumps(hidden, separators=(",", ":"))
    if len(text) > 60:  # a deep net: the config says it better than a --set would
        return f"; it was trained with model.hidden {shown(hidden)}: train with its config"
    return (f"; it was trained with model.hidden {json.dumps(hidden)}: train with "
            f"--set {shlex.quote(f'model.hidden={text}')} (or its config)")


def load_init(path: str | os.PathLike, widths: tuple[int, ...], dtype: str) -> Params:
    """Initial weights for `--init`: any .npz with W1, b1, ... of the configured shapes; a
    gpumlp model of other widths says which."""
    source = str(Path(path))
    fix = " (train.dtype); scale them down, or train with --set train.dtype=float64"
    with Npz(path) as npz:
        try:
            check_layout(npz.headers, widths, source)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{trained_widths(npz, source, widths)}") from None
        return read_layers(npz, widths, source, dtype, fix)
