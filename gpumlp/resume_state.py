"""Reading a checkpoint back for a resume: its arrays and state record, each part checked
(optimizer state, generator states, the position in the epoch, the metrics rows so far), and
the one-line errors, with the command that starts the run over, for what is damaged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .backend import Backend
from .checkpoint import check_layout, params_from_arrays, parse_json
from .config import Config
from .errors import CheckpointError, shell_path
from .npzio import load_npz
from .optim import flat

if TYPE_CHECKING:
    from .train import RunState


# The checkpoint's layout, in its state record from 2026-11-30 on (none before: 1): a later
# gpumlp that changes how a checkpoint is read raises it, and this one refuses what it would
# misread (gpumlp of 2026-11-29 read the later opt_scale's velocity wrong, without a word).
CHECKPOINT_FORMAT = 1


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(the arrays, the state record) of a checkpoint, the record's shape checked: its
    `fixed` and `config` entries, when there, are mappings; a format this gpumlp does not
    know (a later gpumlp's) is refused."""
    source = str(path)
    try:
        arrays = load_npz(path)
    except CheckpointError as e:  # cut short, or not a checkpoint at all
        raise CheckpointError(f"{e}; {start_over(source)}") from None
    try:
        meta = parse_json(str(arrays["state"]))
    except (KeyError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise damaged_record(source)
    written = meta.get("format", 1)
    if not isinstance(written, int) or isinstance(written, bool) or written < 1:
        raise damaged_record(source)
    if written > CHECKPOINT_FORMAT:  # before the entries' shapes, which a later format may change
        raise CheckpointError(f"{source}: written by a later gpumlp (checkpoint format "
                              f"{written}; this gpumlp {__version__} reads format "
                              f"{CHECKPOINT_FORMAT}); resume it with that gpumlp, or upgrade "
                              "this one")
    if not isinstance(meta.get("fixed", {}), dict) \
            or not isinstance(meta.get("config") or {}, dict):
        raise damaged_record(source)
    return arrays, meta


def restore_params_and_optimizer(state: "RunState", arrays: dict, config: Config,
                                 backend: Backend, source: str, fixed_checked: bool = False
                                 ) -> None:
    """Copy the checkpoint's weights and optimizer state (and the fast CPU step's velocity
    scale) into the fresh `state`, each checked for shape and finiteness. Arrays of other
    shapes may come of a config.yaml changed under an older checkpoint (which records no
    fixed keys), or, where the fixed keys it records were `fixed_checked` against config.yaml,
    of a damaged file only; values that are not finite, of a damaged file."""
    other_run = (start_over(source) if fixed_checked else
                 f"put config.yaml back as the run had it, or {start_over(source)}")
    try:
        check_layout(arrays, config.model.layer_widths, source)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {other_run}") from None
    try:
        host = params_from_arrays(arrays, config.model.layer_widths, source, config.train.dtype)
    except CheckpointError as e:  # NaN, or too large for the dtype
        raise CheckpointError(f"{e}; {start_over(source)}") from None
    fresh = flat(state.params) + state.opt.m + state.opt.v
    saved = flat(host) + tuple(arrays.get(f"opt_m{i}") for i in range(len(state.opt.m))) \
        + tuple(arrays.get(f"opt_v{i}") for i in range(len(state.opt.v)))
    for target, value in zip(fresh, saved):
        if value is None or value.shape != target.shape:
            raise CheckpointError(f"{source}: optimizer state does not match the config; "
                                  f"{other_run}")
        if value.dtype.kind != "f":  # text, complex, whole numbers: gpumlp saves floats
            raise CheckpointError(f"{source}: its optimizer state holds {value.dtype} values, "
                                  f"not floats; {start_over(source)}")
        with np.errstate(over="ignore"):  # too large for the dtype: inf, said below
            value = value.astype(target.dtype)
        if not np.isfinite(value).all():  # gpumlp never saves one: the file was damaged
            raise CheckpointError(f"{source}: its optimizer state holds NaN or infinite "
                                  f"values (or ones too large for {target.dtype}); "
                                  f"{start_over(source)}")
        target[...] = backend.asarray(value)
    scale = arrays.get("opt_scale")
    if scale is not None:
        if scale.dtype.kind != "f" or scale.shape != (1,) or not np.isfinite(scale).all() \
                or not scale[0] > 0:
            raise CheckpointError(f"{source}: its velocity scale (opt_scale) is damaged; "
                                  f"{start_over(source)}")
        state.opt = state.opt._replace(scale=scale.astype(np.float64))


def restore_generators(state: "RunState", meta: dict, config: Config, backend: Backend,
                       source: str) -> None:
    """The host generator from its saved state; the device generator too, or, where either
    side is CuPy's (which cannot save or take a state: a GPU run, or a CPU run resumed on a
    GPU), reseeded from the position."""
    try:
        state.rng.bit_generator.state = meta["rng"]
        if meta.get("dev_rng") and isinstance(state.dev_rng, np.random.Generator):
            state.dev_rng.bit_generator.state = parse_json(meta["dev_rng"])
        else:
            state.dev_rng = backend.xp.random.default_rng(
                resume_seed(config.train.seed, state.pos.step))
    except (KeyError, TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{source}: its generator states are damaged; "
                              f"{start_over(source)}") from None


def resume_seed(seed: int, step: int) -> int:
    """The device generator's seed for a resume at `step` where its state cannot be restored:
    a hash of both numbers (seed + 1 + step, as before 2026-12-01, drew the stream a fresh
    run with seed + step draws, so that seed 0 resumed at step 2 repeated seed 2's)."""
    return int(np.random.SeedSequence([seed, 1, step]).generate_state(1, np.uint64)[0])


def start_over(source: str) -> str:
    """How to start the run of a checkpoint that cannot be resumed over (start_over_in)."""
    return start_over_in(Path(source).parent)


# config.yaml's first line in a run started from --init weights: a resume before the first
# checkpoint then knows that init.npz is needed, not a random start (RunFiles.saved_init)
FROM_INIT = "# this run started from the --init weights in init.npz beside this file\n"


def started_from_init(folder: Path) -> bool:
    """Whether `folder`'s config.yaml says the run started from --init weights (FROM_INIT)."""
    try:
        with open(folder / "config.yaml", encoding="utf-8", errors="replace") as f:
            return f.readline() == FROM_INIT
    except OSError:
        return False


def start_over_in(folder: Path, init: str | None = None) -> str:
    """How to start the run in `folder` over in place, with its config.yaml and its --init
    weights (`init`, a word of the command; else init.npz when it is there, or FILE where
    config.yaml says the run started from weights init.npz no longer holds): without --config
    the command would train the built-in defaults over the run."""
    quoted = shell_path(folder)
    if init is None and (folder / "init.npz").is_file():
        init = f"{quoted}/init.npz"
    elif init is None and started_from_init(folder):
        init = "FILE"
    init_option = f" --init {init}" if init else ""
    file_is = " (FILE: the weights it started from)" if init == "FILE" else ""
    return (f"start the run over: gpumlp train --config {quoted}/config.yaml{init_option} --out "
            f"{quoted} --overwrite{file_is}")


def damaged_record(source: str) -> CheckpointError:
    return CheckpointError(f"{source}: its state record is missing or damaged; "
                           f"{start_over(source)}")


def history_row_problem(row: object, epoch: int) -> str | None:
    """Why `row` is not the metrics row of `epoch` that a run writes (report's rules), or
    None."""
    from .report import ReportError, check_row

    if not isinstance(row, dict):
        return "not a metrics row"
    try:
        check_row(row, "row")
    except ReportError as e:
        return str(e)
    return None if row["epoch"] == epoch else f"epoch {row['epoch']} where {epoch} belongs"


def finite_sum(value) -> bool:
    """Whether a checkpoint's running sum (loss_sum, seconds) is a number >= 0 that a float
    holds: JSON gives NaN, Infinity, -1 and 10**400 alike."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:
        return False


def read_position(meta: dict, perm: np.ndarray | None, n_train: int, batches: int,
                  source: str) -> tuple:
    """The Position and the metrics rows of a checkpoint's state record, checked: whole numbers
    where counts go, an epoch's order that is a permutation of the training set."""
    from .train import Position

    damaged = damaged_record(source)
    try:
        pos = Position(**meta["position"])
    except (KeyError, TypeError):
        raise damaged from None
    counts = (pos.epoch, pos.step, pos.batch, pos.correct)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts) or \
            not all(finite_sum(v) for v in (pos.loss_sum, pos.seconds)):
        raise damaged
    if pos.step != pos.epoch * batches + pos.batch or pos.correct > n_train:  # what train counts
        raise damaged
    history = meta.get("history", [])
    if not isinstance(history, list) or len(history) != pos.epoch or \
            any(history_row_problem(row, epoch) for epoch, row in enumerate(history, 1)):
        raise damaged
    if pos.batch and perm is None:
        raise CheckpointError(f"{source}: the epoch's order is missing; {start_over(source)}")
    if perm is not None and (perm.shape != (n_train,) or perm.dtype.kind not in "iu"
                             or pos.batch >= batches
                             or not np.array_equal(np.sort(perm), np.arange(n_train))):
        raise CheckpointError(f"{source}: the epoch's order does not fit a training set of "
                              f"{n_train} examples in {batches} batches; {start_over(source)}")
    pos.perm = perm
    return pos, list(history)
