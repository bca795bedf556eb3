"""The training loop: epochs of shuffled minibatches on the device, evaluation, run files.

- Nothing is copied to the host inside a step: the loss and the correct count accumulate in
  device scalars read once per epoch (and at checkpoints), apart from the NaN guard's look at
  the loss sum (every step on the CPU, every 50 on a GPU).
- A checkpoint is written only when the loss and all the weights are finite and the weights
  still give a loss below MAX_PROBE_LOSS (the evaluation loss at an epoch's end, a probe of the
  training set mid-epoch): finite weights can be too large to use, and a checkpoint of them is
  no net to go on from. NaN weights, or an epoch's evaluation above the bound, end the run; a
  mid-epoch probe above it only skips that checkpoint (a fast-diverging run's loss spikes and
  falls back within steps): training goes on, and a stop then keeps the last good checkpoint.
- Progress goes to an optional callback `on_event(kind, info)`; the library never prints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from .activations import ACTIVATIONS
from .augment import make_augment
from .backend import Backend
from .config import Config
from .data import DeviceData, DeviceSplit, batch_slices, permutation, prepare_data, to_inputs
from .errors import CheckpointError, ConfigError, GpumlpError
from .mnist import C, Mnist
from .model import (Params, correct_count, dropout_masks, forward, init_params, loss_and_dA2,
                    params_on)
from .optim import OptState, init_state, learning_rate, warmup_warning
from .resume_state import start_over
from .runfiles import RunFiles
from .step import batch_inputs, exported, make_step, prepare_state, tallier

EventHandler = Callable[[str, dict], None]
PROBE_ROWS = 100  # training examples whose loss vets the weights of a mid-epoch checkpoint
MAX_PROBE_LOSS = 100 * math.log(C)  # a hundred times a uniform guess's loss: no net to go on
                                    # from (one step at lr 1e8 gives millions, yet finite)


class NumericalError(GpumlpError):
    """The loss, the weights or the optimizer's state became NaN or infinite, or finite weights
    too large to use (too_large)."""


class Interrupted(GpumlpError):
    """Training was asked to stop (Ctrl-C, SIGTERM, SIGHUP); with an out_dir, a checkpoint was
    saved."""


class StoppedBeforeStart(GpumlpError):
    """Training was asked to stop while it was being set up: nothing was written."""


class Skipped(NamedTuple):
    """A mid-epoch checkpoint not written: the weights after `step` (of `epoch`) were too large
    to use, as `probe` says; the last good checkpoint, `checkpoint`, is `saved_step`'s (both
    None when the run has written none yet)."""
    step: int
    epoch: int
    probe: str
    saved_step: int | None
    checkpoint: str | None


class StoppedUnsaved(GpumlpError):
    """Training was asked to stop (Ctrl-C, SIGTERM, SIGHUP) after a step whose weights were too
    large to checkpoint: the last good checkpoint, if any, is kept (`skipped` says which)."""

    def __init__(self, skipped: Skipped):
        self.skipped = skipped
        kept = (f"the last good checkpoint {skipped.checkpoint} (step {skipped.saved_step}) is "
                "kept" if skipped.checkpoint else
                "no checkpoint was written yet, so there is nothing to resume: start over")
        super().__init__(f"stopped after step {skipped.step}, {unsaved(skipped)}; {kept}")


def unsaved(skipped: Skipped) -> str:
    """"whose weights were too large to checkpoint (...)": why `skipped` was not written."""
    return f"whose weights were too large to checkpoint ({skipped.probe})"


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint, so that a resume continues exactly."""
    epoch: int = 0                   # epochs completed
    step: int = 0                    # optimizer steps taken in all
    batch: int = 0                   # batches done in the current epoch
    perm: np.ndarray | None = None   # the current epoch's order, while an epoch is under way
    loss_sum: float = 0.0            # sum of per-example losses so far this epoch
    correct: int = 0                 # correct predictions so far this epoch
    seconds: float = 0.0             # training time spent so far this epoch


@dataclass
class RunState:
    params: Params
    opt: OptState
    rng: np.random.Generator         # host: init, shuffling
    dev_rng: Any                     # device: augmentation, dropout masks
    pos: Position = field(default_factory=Position)


class RunResult(NamedTuple):
    params: Params
    history: list[dict]
    summary: dict


def new_state(config: Config, backend: Backend, init: Params | None = None) -> RunState:
    """Fresh parameters (or `init`), zero optimizer state, generators from train.seed."""
    rng = np.random.default_rng(config.train.seed)
    widths = config.model.layer_widths
    host = init_params(widths, config.model.init, rng, config.train.dtype)
    if init is not None:  # drawn all the same: `rng` then shuffles as in a run without --init
        host = init
    params = params_on(backend, host)
    dev_rng = backend.xp.random.default_rng(config.train.seed + 1)
    return RunState(params, init_state(config.optim, params), rng, dev_rng)


def evaluate(params: Params, split: DeviceSplit, config: Config,
             matmul: Any = None) -> tuple[float, float]:
    """(mean loss, accuracy) of `params` on a split, in batches, read once at the end. Each
    batch's L * m is added in float64, as the training loop adds its steps'. `matmul`: the
    step's own product (`FastStep.matmul`), so that the evaluation wakes the BLAS threads the
    steps use rather than a second pool's, which would spin on after it (about 0.1 s) and
    take the cores from the next epoch's first steps."""
    act = ACTIVATIONS[config.model.activation]
    loss_sum, correct = 0.0, 0
    n = len(split)
    for sl in batch_slices(n, config.train.eval_batch_size):
        X = to_inputs(split.images[sl], config.data.normalize, config.train.dtype)
        A2 = forward(params, X, act, matmul=matmul).A[-1]              # (m, c) the logits
        L, _ = loss_and_dA2(A2, split.labels[sl])
        loss_sum = loss_sum + (L * L.dtype.type(sl.stop - sl.start)).astype(np.float64)
        correct = correct + correct_count(A2, split.labels[sl])
    return float(loss_sum) / n, int(correct) / n


def check_batch_size(config: Config, n: int) -> None:
    if config.train.batch_size > n:
        raise ConfigError(f"config key 'train.batch_size' is {config.train.batch_size} but the "
                          f"training set has only {n} examples; lower it")


def all_finite(arrays) -> bool:
    return all(bool(np.isfinite(float(a.sum(dtype=np.float64)))) for a in arrays)


def check_finite(state: RunState) -> None:
    """A NumericalError unless the running loss, every parameter and the optimizer's state
    (model.py's layout) are finite: the guard before a checkpoint, or a metrics row, is
    written (a resume refuses a checkpoint with a NaN velocity as damaged)."""
    pos, opt = state.pos, state.opt
    scale = () if opt.scale is None else (np.asarray(opt.scale),)
    if not np.isfinite(pos.loss_sum) or not all_finite((*state.params.W, *state.params.b)):
        what = "the loss or the weights"
    elif not all_finite((*opt.m, *opt.v, *scale)):
        what = "the optimizer's state"
    else:
        return
    # called mid-epoch (pos.batch >= 1), and at an epoch's end before its position moves on
    raise NumericalError(f"{what} became NaN or infinite in epoch {pos.epoch + 1} (by step "
                         f"{pos.step})")


def too_large(what: str) -> NumericalError:
    """The error of finite weights whose loss is not: `what` happened, and why."""
    return NumericalError(f"{what}: the weights are finite but too large to use")


def probe_loss(state: RunState, data: DeviceData, config: Config,
               matmul: Any = None) -> tuple[float, int]:
    """The mean loss of the (finite) weights on the first PROBE_ROWS training examples, and
    how many those are: finite unless the weights are too large to use. `matmul`: as for
    evaluate."""
    probe = DeviceSplit(data.train.images[:PROBE_ROWS], data.train.labels[:PROBE_ROWS])
    return evaluate(state.params, probe, config, matmul)[0], len(probe)


def probe_problem(state: RunState, data: DeviceData, config: Config,
                  matmul: Any = None) -> str | None:
    """None when probe_loss is finite and below MAX_PROBE_LOSS, as a mid-epoch checkpoint's
    weights must be to be worth going on from; else what it was ("their loss on the first 100
    training examples was 858, above 230"). On the step's BLAS, `matmul`, as the epoch's
    evaluation."""
    loss, n = probe_loss(state, data, config, matmul)
    if loss < MAX_PROBE_LOSS:  # not NaN
        return None
    what = ("NaN or infinite" if not math.isfinite(loss)
            else f"{loss:.3g}, above {MAX_PROBE_LOSS:.0f}")
    return f"their loss on the first {n} training examples was {what}"


def check_start_loss(loss: float, on: str, what: str, fix: str) -> None:
    """A CheckpointError naming `what` weights unless their `loss` (on `on`) is below
    MAX_PROBE_LOSS, as the run's own guards ask of every checkpoint: otherwise the first steps'
    NaN, or the first epoch's loss, would blame optim.lr, which could not help."""
    if not loss < MAX_PROBE_LOSS:  # NaN too
        above = f" (above {MAX_PROBE_LOSS:.0f})" if math.isfinite(loss) else ""
        raise CheckpointError(f"{what} are finite but too large to use: their loss on {on} is "
                              f"{loss:.4g}{above}; {fix}")


def check_usable_start(state: RunState, data: DeviceData, config: Config, what: str,
                       fix: str) -> None:
    """check_start_loss of the starting weights on the probe rows (probe_problem's)."""
    loss, n = probe_loss(state, data, config)
    check_start_loss(loss, f"the first {n} training examples", what, fix)


def check_resumed_weights(state: RunState, data: DeviceData, config: Config,
                          source: str) -> None:
    """A checkpoint's weights held to the bound they met when saved, so that only weights
    changed since are refused: mid-epoch (and before the first step), probe_problem's probe; at
    an epoch's end, check_eval_losses's validation and test losses."""
    what, fix = f"{source}: its weights", start_over(source)
    if state.pos.batch or not state.pos.epoch:
        check_usable_start(state, data, config, what, fix)
        return
    for name, split in (("validation", data.val), ("test", data.test)):
        if split is not None:
            check_start_loss(evaluate(state.params, split, config)[0], f"the {name} set", what,
                             fix)


def check_eval_losses(row: dict, step: int) -> None:
    """A NumericalError unless the epoch's evaluation losses (val, test) are finite and below
    MAX_PROBE_LOSS, as a mid-epoch checkpoint's probe must be: no net to go on from otherwise."""
    losses = {k: row[k] for k in ("val_loss", "test_loss") if k in row}
    if not all(v < MAX_PROBE_LOSS for v in losses.values()):  # NaN too
        shown = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        what = ("became NaN or infinite" if not all(math.isfinite(v) for v in losses.values())
                else f"rose above {MAX_PROBE_LOSS:.0f}")
        raise too_large(f"the evaluation loss {what} at the end of epoch "
                        f"{row['epoch']} (step {step}: {shown})")


def train_epoch(state: RunState, data: DeviceData, config: Config, backend: Backend,
                step_fn, on_event: EventHandler, checkpoint: Callable[[], Skipped | None],
                should_stop: Callable[[], bool]) -> None:
    """Run the rest of the current epoch from `state.pos`, updating `state` in place.
    `checkpoint` writes a mid-epoch checkpoint, or says why it did not (Skipped): then a stop
    ends the run with StoppedUnsaved, and otherwise training goes on ("skipped" event)."""
    xp, pos, tc = backend.xp, state.pos, config.train
    n = len(data.train)
    if pos.perm is None:
        pos.perm = permutation(state.rng, n, config.data.shuffle)
    perm = backend.asarray(pos.perm)
    slices = batch_slices(n, tc.batch_size)
    total_steps = tc.epochs * len(slices)
    loss_sum = xp.asarray(pos.loss_sum, dtype=np.float64)
    correct = xp.asarray(pos.correct, dtype=np.int64)
    started = time.perf_counter() - pos.seconds
    check_every = 1 if not backend.is_gpu else 50
    # on the host, a check every step: math.isfinite reads the 0-d array with less overhead
    finite = math.isfinite if not backend.is_gpu else (lambda v: bool(xp.isfinite(v)))
    augment = make_augment(config.data.augment)
    batches = len(slices)
    tally = tallier(step_fn)  # loss_sum += L * m; correct += ok
    for b in range(pos.batch, batches):
        X, y = batch_inputs(step_fn, data.train, perm[slices[b]], config, augment,
                            state.dev_rng)  # (m, d) inputs, (m,) labels
        m = X.shape[0]
        masks = dropout_masks(state.dev_rng, m, config.model.hidden_widths,
                              config.model.dropout, X.dtype)  # () without dropout
        lr = learning_rate(config.optim, pos.step, batches, total_steps)
        L, ok = step_fn(state.params, state.opt, X, y, lr, pos.step + 1, masks)
        tally(loss_sum, correct, L, ok, m)
        pos.step += 1
        pos.batch = b + 1
        if pos.step % check_every == 0 and not finite(loss_sum):
            raise NumericalError(f"the loss became NaN or infinite at epoch {pos.epoch + 1}, "
                                 f"step {pos.step}")
        on_event("step", {"epoch": pos.epoch + 1, "batch": b + 1, "batches": batches})
        mid_epoch = b + 1 < batches
        due = tc.checkpoint_every and pos.step % tc.checkpoint_every == 0
        if mid_epoch and (should_stop() or due):
            pos.loss_sum, pos.correct = float(loss_sum), int(correct)
            pos.seconds = time.perf_counter() - started
            skipped = checkpoint()  # checks the loss, the weights and their probe loss first
            if should_stop():
                raise StoppedUnsaved(skipped) if skipped else Interrupted("interrupted")
            if skipped:  # too large now, yet a spike may fall back: the last good one stays
                on_event("skipped", skipped._asdict())
    backend.synchronize()
    pos.loss_sum, pos.correct = float(loss_sum), int(correct)
    pos.seconds = time.perf_counter() - started


def epoch_metrics(state: RunState, data: DeviceData, config: Config, lr: float,
                  matmul: Any = None) -> dict:
    """The metrics.jsonl line of the epoch that just ended (`state` in model.py's layout); a
    NumericalError if a loss or a weight is NaN or infinite, or then the val or test loss is
    not below MAX_PROBE_LOSS."""
    pos, n = state.pos, len(data.train)
    check_finite(state)
    row = {"epoch": pos.epoch + 1, "train_loss": pos.loss_sum / n,
           "train_accuracy": pos.correct / n}
    if data.val is not None:
        row["val_loss"], row["val_accuracy"] = evaluate(state.params, data.val, config, matmul)
    row["test_loss"], row["test_accuracy"] = evaluate(state.params, data.test, config, matmul)
    check_eval_losses(row, pos.step)
    row.update(lr=lr, seconds=pos.seconds, samples_per_second=n / max(pos.seconds, 1e-9))
    return row


def train(config: Config, backend: Backend, mnist: Mnist, *, out_dir: str | Path | None = None,
          init: Params | None = None, resume: bool = False,
          on_event: EventHandler | None = None,
          should_stop: Callable[[], bool] = lambda: False) -> RunResult:
    """Train `config` on `backend`; write the run directory when `out_dir` is given (the
    caller owns that folder: nothing here refuses an earlier run in it, as the CLI does; such
    a run is put aside, and back if this one ends before its first checkpoint)."""
    if resume and out_dir is None:
        raise TypeError("train(resume=True) needs out_dir, the folder of the run to resume")
    if not isinstance(backend, Backend) or not isinstance(mnist, Mnist):
        raise TypeError("train(config, backend, mnist) takes a gpumlp.backend.Backend (from "
                        "get_backend('cpu'), say) and a gpumlp.mnist.Mnist (from load_mnist), "
                        f"not {type(backend).__name__} and {type(mnist).__name__}")
    on_event = on_event or (lambda kind, info: None)
    files = RunFiles(Path(out_dir)) if out_dir is not None else None
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the guard says
            return _train(config, backend, mnist, files, init, resume, on_event, should_stop)
    except BaseException:  # before its first checkpoint: the run it was to replace comes back
        if files is not None and files.put_back():
            on_event("put_back", {"folder": str(files.folder)})
        raise


def start_state(config: Config, backend: Backend, data: DeviceData, files: RunFiles | None,
                init: Params | None, resume: bool) -> tuple[RunState, list, bool, Params | None]:
    """The state to train from, its metrics rows so far, whether it came from a checkpoint,
    and the --init weights the run starts from (a resumed run's own, if it had them); each
    checked as usable first."""
    if resume and files.path("checkpoint.npz").exists():
        state, history = files.load_checkpoint(config, backend, len(data.train))
        if state.pos.epoch >= config.train.epochs:
            files.check_nothing_set(config)  # no step left to take the --set values
        else:
            files.check_trainable(config)
            check_resumed_weights(state, data, config, str(files.path("checkpoint.npz")))
        return state, history, True, init
    # a fresh run, or one killed before its first checkpoint: start it over
    if resume:
        files.check_resumable()  # never retrain a finished run whose checkpoint is gone
        files.check_trainable(config)
        init = files.saved_init(config)  # from the same --init weights, if it had them
    state = new_state(config, backend, init)
    if init is not None:
        check_usable_start(state, data, config, "the --init weights",
                           "start from other weights, or without --init")
    return state, [], False, init


def _train(config, backend, mnist, files, init, resume, on_event, should_stop) -> RunResult:
    restoring = resume and files.path("checkpoint.npz").exists()  # else it starts over: new
    try:
        data = prepare_data(mnist, config.data, backend, new=not restoring)
        check_batch_size(config, len(data.train))
    except ConfigError as e:  # a resume's config is config.yaml: name it, the one to edit
        if not resume:
            raise
        said = str(e)
        if restoring:  # its checkpoint holds the run's value: another is refused
            files.check_checkpoint_run(config)  # a changed data.limit, named as the cause
            said = (said.split("; lower it")[0] + "; a resume goes on with the run's value: put "
                    "config.yaml back as the run had it, or give the data it trained on")
        raise ConfigError(f"{files.path('config.yaml')}: {said}") from None
    state, history, restored, init = start_state(config, backend, data, files, init, resume)
    step_fn = make_step(config, backend)
    prepare_state(step_fn, state, data.train)
    if should_stop():  # Ctrl-C or SIGTERM during the set-up: an old run stays as it is
        raise StoppedBeforeStart("stopped before training started")
    if files and not restored:  # only now, so that an early failure leaves an old run intact
        files.start(config, init, resumed=resume)
    elif files:  # after every check: a --set that is refused, or never trained with, is not kept
        files.record_config(config)
    steps_per_epoch = len(batch_slices(len(data.train), config.train.batch_size))
    on_event("start", {"device": backend.description, "epochs": config.train.epochs,
                       "n_train": len(data.train), "batches": steps_per_epoch,
                       "epoch": state.pos.epoch, "batch": state.pos.batch, "restored": restored,
                       "unchecked": restored and files.trained_config is None,
                       "stale": files.stale_outputs() if restored else files and files.kept,
                       "removed": [] if restored or not files else files.removed,
                       "warmup": warmup_warning(config.optim, config.train.epochs,
                                                 steps_per_epoch)})

    saved_step = state.pos.step if restored else None  # the last good checkpoint's

    def save() -> Skipped | None:
        """A mid-epoch checkpoint, never of NaN, infinite or unusable weights: a NumericalError
        for the first two, which never recover, a Skipped for weights too large to use (the
        previous checkpoint stays the last good)."""
        nonlocal saved_step
        if files:
            snapshot = exported(step_fn, state)
            check_finite(snapshot)
            problem = probe_problem(snapshot, data, config, getattr(step_fn, "matmul", None))
            if problem:
                pos = snapshot.pos
                return Skipped(pos.step, pos.epoch + 1, problem, saved_step,
                               None if saved_step is None else str(files.path("checkpoint.npz")))
            files.save_checkpoint(snapshot, history, config)
            saved_step = snapshot.pos.step
        return None

    snap = None  # the last epoch end's state in model.py's layout
    while state.pos.epoch < config.train.epochs:
        try:
            train_epoch(state, data, config, backend, step_fn, on_event, save, should_stop)
            lr = learning_rate(config.optim, state.pos.step - 1, steps_per_epoch,
                               config.train.epochs * steps_per_epoch)
            snap = exported(step_fn, state)
            history.append(epoch_metrics(snap, data, config, lr,  # checks losses and weights
                                         getattr(step_fn, "matmul", None)))
            state.pos = Position(epoch=state.pos.epoch + 1, step=state.pos.step)
            snap = replace(snap, pos=state.pos)
            if files:  # checkpoint first: a metrics row then always has a checkpoint behind it
                files.save_checkpoint(snap, history, config)
                saved_step = state.pos.step
        except NumericalError as e:
            advice = files.last_good(config) if files else "lower optim.lr"
            raise NumericalError(f"{e}; {advice}") from None
        if files:
            files.append_metrics(history[-1])
        on_event("epoch", history[-1])
        if should_stop() and state.pos.epoch < config.train.epochs:
            raise Interrupted("interrupted")
    final = snap if snap is not None else exported(step_fn, state)
    summary = make_summary(config, backend, final, history)
    if files:
        files.finish(final.params, config, summary)
    return RunResult(final.params, history, summary)


def make_summary(config: Config, backend: Backend, state: RunState,
                 history: list[dict]) -> dict:
    """summary.json: the last epoch's val_accuracy and val_loss (with a validation split only)
    and test_accuracy and test_loss, as metrics.jsonl has them, then the run's epochs, steps,
    training seconds and device."""
    last = history[-1]  # train.epochs >= 1, and a resume has a row for every epoch done
    return {**{key: last[key] for key in ("val_accuracy", "val_loss") if key in last},
            "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
            "epochs": config.train.epochs, "steps": state.pos.step,
            "seconds": sum(row["seconds"] for row in history), "device": backend.description}
