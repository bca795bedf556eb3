"""One training step: forward, loss, backward, update. The function the training loop calls.

`make_step` picks the implementation once per run. The generic step below runs on NumPy
and CuPy alike; device-specific fast paths live beside it (same signature) and are tested
against it: on the CPU, `fast_cpu.fast_step` for SGD (plain, momentum, Nesterov; not Nesterov
with weight decay), which folds the update into the dW products, and the generic step for the
rest; on a GPU, `fast_cuda.gpu_step`, fused kernels for every optimizer in float32, and the
generic step (on the GPU) for float64.

A step may carry a `batch(split, idx)` loader that writes the batch into its own buffers;
`batch_inputs` uses it when there is no augmentation, else `data.gather` and `data.to_inputs`.
It may also carry `prepare(params, state, split)`, which returns the parameters and optimizer
state in the layout it is fastest with for that training split (same values), and `export`,
which gives them back in model.py's layout: `prepare_state` applies the one to a run's state,
and `exported` the other wherever the parameters leave the step (evaluation, run files).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .activations import ACTIVATIONS
from .backend import Backend
from .config import Config
from .data import DeviceSplit, gather, to_inputs
from .model import Params, backward, correct_count, forward, loss_and_dA2
from .optim import OptState, apply_max_norm, unscaled, update

# step(params, state, X, y, lr, t, masks) -> (L, correct), both 0-d arrays on the device
# (NumPy scalars on the CPU)
Step = Callable[[Params, OptState, Any, Any, float, int, tuple], tuple[Any, Any]]


def generic_step(config: Config) -> Step:
    act = ACTIVATIONS[config.model.activation]

    def step(params: Params, state: OptState, X: Any, y: Any, lr: float, t: int,
             masks: tuple = ()) -> tuple[Any, Any]:
        cache = forward(params, X, act, masks)           # A_k, Z_k: (m, h_k); A[-1]: (m, c)
        L, dA2 = loss_and_dA2(cache.A[-1], y, config.train.label_smoothing)  # (), (m, c)
        grads = backward(params, cache, dA2, act)        # shaped as params
        update(config.optim, params, grads, state, lr, t)
        apply_max_norm(params, config.model.max_norm)
        return L, correct_count(cache.A[-1], y)

    return step


class CpuStep:
    """The generic step on the CPU, with the loader that feeds it preallocated batches
    (fast_cpu.BatchLoader). `kind` says which step it is, as fast_cpu.FastStep's does."""

    kind = "generic"

    def __init__(self, step: Step, batch: Callable):
        self.step, self.batch = step, batch

    def __call__(self, params: Params, state: OptState, X: Any, y: Any, lr: float, t: int,
                 masks: tuple = ()) -> tuple[Any, Any]:
        return self.step(params, state, X, y, lr, t, masks)


def make_step(config: Config, backend: Backend) -> Step:
    """The fastest correct step for this config and device; the user never has to choose."""
    if backend.is_gpu:
        from . import fast_cuda  # fused CUDA kernels, built through backend.xp

        return fast_cuda.gpu_step(config, backend)
    from . import fast_cpu  # scipy's BLAS, only for CPU runs

    if fast_cpu.supports(config):
        return fast_cpu.fast_step(config)
    return CpuStep(generic_step(config), fast_cpu.BatchLoader(config))


def prepare_state(step: Step, state: Any, split: DeviceSplit | None = None) -> None:
    """Put a RunState's params and optimizer state into the step's own layout for the training
    split, if it has one; for any other step, multiply out a velocity scale the fast CPU step
    left (optim.OptState)."""
    prepare = getattr(step, "prepare", None)
    if prepare is not None:
        state.params, state.opt = prepare(state.params, state.opt, split)
    else:
        state.opt = unscaled(state.opt)


def exported(step: Step, state: Any) -> Any:
    """The RunState with its params and optimizer state in model.py's layout: copies where the
    step keeps its own (`prepare_state`), else the state itself. The rest is shared."""
    export = getattr(step, "export", None)
    if export is None:
        return state
    params, opt = export(state.params, state.opt)
    return dataclasses.replace(state, params=params, opt=opt)


def add_to_sums(loss_sum: Any, correct: Any, L: Any, ok: Any, m: int) -> None:
    """The training loop's running sums, in place: loss_sum += L * m, correct += ok (0-d
    float64 and int64 arrays). A step may carry its own `tally` doing the same (fast_cuda's,
    in one launch); `tallier` picks it."""
    loss_sum += L * L.dtype.type(m)  # the product in L's dtype (NumPy 1 would widen it)
    correct += ok


def tallier(step: Step) -> Callable:
    """The step's `tally(loss_sum, correct, L, ok, m)`, else `add_to_sums`."""
    return getattr(step, "tally", add_to_sums)


def batch_inputs(step: Step, split: DeviceSplit, idx: Any, config: Config, augment: Any,
                 rng: Any) -> tuple[Any, Any]:
    """(X (m, d), y (m,)) of the rows idx: the step's own loader unless augmenting."""
    loader = getattr(step, "batch", None)
    if loader is not None and augment is None:
        return loader(split, idx)
    images, y = gather(split, idx)
    return to_inputs(images, config.data.normalize, config.train.dtype, augment, rng), y
