"""Stand-ins for the run's step: each wraps the step train() makes (put in place of
`train.make_step` by `wrap_steps`) and does something at a chosen step `at`, such as sending
a signal or spoiling the weights."""

from __future__ import annotations

import signal

import gpumlp.train as train_module
from gpumlp import step as step_module


class WrappedStep:
    """The run's step, unchanged; what a subclass does not define (prepare, export, batch,
    kind, tally) is the wrapped step's."""

    def __init__(self, step, at: int = 0):
        self.step, self.at = step, at

    def __call__(self, params, state, X, y, lr, t, masks):
        return self.step(params, state, X, y, lr, t, masks)

    def __getattr__(self, name):
        return getattr(self.step, name)


class SignalsAt(WrappedStep):
    """The run's step, which sends this process `signums` (Ctrl-C's SIGINT if none), one
    after the other, during step `at`: to this thread, so handled before the step returns."""

    def __init__(self, step, at: int, *signums: int):
        super().__init__(step, at)
        self.signums = signums or (signal.SIGINT,)

    def __call__(self, params, state, X, y, lr, t, masks):
        if t == self.at:
            for signum in self.signums:
                signal.raise_signal(signum)
        return self.step(params, state, X, y, lr, t, masks)


def sigterm_at(at: int):
    """A wrap for `wrap_steps`: SIGTERM, as `docker stop` sends it, during step `at`."""
    return lambda step: SignalsAt(step, at, signal.SIGTERM)


def wrap_steps(monkeypatch, wrap) -> list:
    """Make train() run `wrap(step)` for each step it makes; returns those, newest last."""
    made, make_step = [], train_module.make_step

    def wrapped(*args):
        made.append(wrap(make_step(*args)))
        return made[-1]

    monkeypatch.setattr(train_module, "make_step", wrapped)
    return made


def unwrap_steps(monkeypatch) -> None:
    """Put train's own make_step back, for a resume after a run with a wrapped step."""
    monkeypatch.setattr(train_module, "make_step", step_module.make_step)
