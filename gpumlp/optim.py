"""Optimizers (SGD with momentum or Nesterov, Adam, AdamW) and learning-rate schedules.

An update changes the parameter arrays in place (its expressions still make temporaries;
the fused steps in fast_cpu and fast_cuda avoid them); the state is a small named container
of arrays shaped like the parameters, so that a checkpoint can save it and a resume can
restore it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .backend import array_module
from .config import OptimConfig
from .model import Grads, Params


class OptState(NamedTuple):
    """An optimizer's state; `m` here is not the seed's batch size (docs/decisions.md)."""

    m: tuple  # SGD: velocity; Adam: first moment. One array per parameter (W1, b1, W2, ...)
    v: tuple  # Adam: second moment; () for SGD
    # The fast CPU step's SGD state only: a (1,) float64 array s, and the velocity is s * m
    # (with momentum the step keeps m divided by s, s *= mu each step, so that `vel *= mu`
    # costs no pass over the arrays; without, s stays 1). None means 1; every other step sees
    # the velocity multiplied out.
    scale: Any = None


def multiply_out(state: OptState) -> None:
    """Make the stored velocity the velocity itself, in place: m *= scale, scale = 1."""
    if state.scale is not None and state.scale[0] != 1:
        for a in state.m:
            a *= a.dtype.type(state.scale[0])
        state.scale[0] = 1.0


def unscaled(state: OptState) -> OptState:
    """The state with the velocity multiplied out by its scale (scale None): new arrays, or the
    same ones when the scale is already 1."""
    if state.scale is None:
        return state
    s = float(state.scale[0])
    m = state.m if s == 1 else tuple(a * a.dtype.type(s) for a in state.m)
    return OptState(m, state.v)


def flat(params: Params | Grads) -> tuple:
    """(W1, b1, W2, b2, ...): the order of the parameters everywhere state is kept."""
    return tuple(t for pair in zip(params.W, params.b) for t in pair)


def init_state(cfg: OptimConfig, params: Params) -> OptState:
    """Zeros shaped like the parameters: one slot for SGD, two for Adam and AdamW."""
    zeros = lambda: tuple(array_module(p).zeros_like(p) for p in flat(params))  # noqa: E731
    return OptState(zeros(), zeros() if cfg.name in ("adam", "adamw") else ())


def sgd_update(cfg: OptimConfig, p: Any, g: Any, vel: Any, lr: float) -> None:
    """vel = mu vel + g (+ wd p); p -= lr (g + mu vel) with Nesterov, else lr vel. p, g and
    vel: one parameter, its gradient and its velocity, all of p's shape ((n_in, n_out) for a
    W, (n_out,) for a b)."""
    if cfg.weight_decay:
        g = g + cfg.weight_decay * p
    if cfg.momentum == 0:
        p -= lr * g
        return
    vel *= cfg.momentum
    vel += g
    p -= lr * (g + cfg.momentum * vel) if cfg.nesterov else lr * vel


def adam_update(cfg: OptimConfig, p: Any, g: Any, m: Any, v: Any, lr: float, t: int) -> None:
    """Adam (Kingma & Ba 2015) at step t >= 1; AdamW decays p before it (Loshchilov & Hutter).
    p, g and the moments m and v all have p's shape."""
    if cfg.name == "adamw" and cfg.weight_decay:
        p *= 1 - lr * cfg.weight_decay
    elif cfg.weight_decay:
        g = g + cfg.weight_decay * p
    m *= cfg.beta1
    m += (1 - cfg.beta1) * g
    v *= cfg.beta2
    v += (1 - cfg.beta2) * (g * g)
    m_hat_scale = 1 / (1 - cfg.beta1 ** t)
    v_hat_scale = 1 / (1 - cfg.beta2 ** t)
    p -= (lr * m_hat_scale) * m / (array_module(v).sqrt(v * v_hat_scale) + cfg.eps)


def update(cfg: OptimConfig, params: Params, grads: Grads, state: OptState, lr: float,
           t: int) -> None:
    """One optimizer step at global step t >= 1 (1-based), in place."""
    for i, (p, g) in enumerate(zip(flat(params), flat(grads))):
        if cfg.name == "sgd":
            sgd_update(cfg, p, g, state.m[i], lr)
        else:
            adam_update(cfg, p, g, state.m[i], state.v[i], lr, t)


def step_decays(epoch: float, step_epochs: float) -> float:
    """How often the step schedule has multiplied by gamma at `epoch`: floor(epoch /
    step_epochs), where a quotient within 1e-12 (relative) of a whole number is that number
    (0.6 / 0.2 is 2.9999999999999996 in floats, and its decay came a step late; the float
    error is about 1e-15, and a true quotient that close below a whole number needs a
    step_epochs of more decimals than anyone writes); inf for a tiny `step_epochs` (gamma **
    inf is 0)."""
    decays = epoch / step_epochs
    if not math.isfinite(decays):
        return decays
    nearest = round(decays)
    return float(nearest if abs(decays - nearest) <= 1e-12 * max(1.0, decays)
                 else math.floor(decays))


def learning_rate(cfg: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate for 0-based `step`: linear warm-up, then constant, step or cosine."""
    epoch = step / steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:  # a warm-up shorter than a step never overshoots the peak
        return cfg.lr * min((step + 1) / warmup, 1.0)
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** step_decays(epoch, cfg.step_epochs)
    if cfg.schedule == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def shown(x: float, near: float, digits: int = 6) -> str:
    """`x` to `digits` significant digits, or to more where fewer would read as `near`, which
    it is not (a warm-up of 2.0000001 epochs is not "2", a share of 0.99999995 not "1")."""
    for d in (digits, 10, 17):
        text = f"{x:.{d}g}"
        if x == near or float(text) != near:
            return text
    return repr(x)


def warmup_warning(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> str | None:
    """What a warm-up that takes in the run's last step does, for the start's warning: the
    rate never reaches optim.lr (or only at the last step, a cosine or step decay never
    coming). Decided in steps by learning_rate's own test, with the share learning_rate gives
    the last step. None for any other warm-up, and for one that leaves a constant rate within
    0.1% of optim.lr (nothing to change). Not refused: a resume may lengthen the run."""
    total = epochs * steps_per_epoch
    last = total - 1
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.warmup_epochs <= 0 or last >= warmup:
        return None
    decays = (cfg.schedule == "cosine" and cfg.min_lr < cfg.lr) or (
        cfg.schedule == "step" and cfg.gamma < 1
        and step_decays(last / steps_per_epoch, cfg.step_epochs) >= 1)
    rate = learning_rate(cfg, last, steps_per_epoch, total)
    if total == 1 and rate >= cfg.lr:  # one step at optim.lr: the warm-up changed nothing
        return None
    if not decays and rate >= 0.999 * cfg.lr:  # a constant rate 0.1% or less short of optim.lr
        return None
    ends = (f"ends at {shown(rate / cfg.lr, 1, 3)} of optim.lr ({shown(rate, cfg.lr)})"
            if rate < cfg.lr else "reaches optim.lr only at its last step")
    never = ("" if not decays else ", and the cosine decay never begins"
             if cfg.schedule == "cosine" else ", and the step decays never come")
    length = (f"is not below train.epochs ({epochs})" if cfg.warmup_epochs >= epochs else
              f"ends within a step of train.epochs ({epochs}), at step {shown(warmup, total)} "
              f"of {total}")
    return (f"optim.warmup_epochs ({shown(cfg.warmup_epochs, epochs)}) {length}: the rate rises "
            f"all run and {ends}{never}; shorten the warm-up, or give more epochs")


def apply_max_norm(params: Params, max_norm: float | None) -> None:
    """Rescale each hidden unit's incoming weights (a column of W_k) to norm <= max_norm."""
    if max_norm is None:
        return
    for Wk in params.W[:-1]:
        xp = array_module(Wk)
        norms = xp.sqrt((Wk * Wk).sum(axis=0, keepdims=True))      # (1, fan_out)
        Wk *= xp.minimum(1, max_norm / xp.maximum(norms, 1e-12)).astype(Wk.dtype)
