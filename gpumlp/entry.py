"""The `gpumlp` console script: the CLI imported inside a guard, so that Ctrl-C, SIGTERM or SIGHUP
while Python loads NumPy, click and the rest ends as it does later, with `interrupted` (exit
130), `terminated (SIGTERM)` (exit 143) or `hung up (SIGHUP)` (exit 129), not a traceback, and
not lost (even when stderr is gone with the terminal): in a container gpumlp is the first
process, which the kernel spares a SIGTERM it does not handle. A signal whose exception Python
swallowed in an import's callback stops the command before it starts. `gpumlp.cli` installs its
own handling once it is loaded; a KeyboardInterrupt that escapes it (a signal in the moment
before) ends the same way."""

from __future__ import annotations

import sys

# stdlib only; Ctrl-C while they load (tens of ms: tempfile, shlex, ...), before main() takes
# SIGINT over, ends as it does later, not with an import's traceback
try:
    import signal

    from .errors import interrupted_how, signal_error, without_interrupt_reports
    from .signals import STOP_SIGNALS, replace_handlers, restore_handlers
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    sys.exit(130)

NOTED: list[int] = []  # the signals seen while the CLI loads


def on_signal(signum, frame) -> None:
    NOTED.append(signum)
    raise signal_error(signum)


def ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop(error: BaseException | None = None) -> None:
    """Say how the command was stopped (by `error`, else by the last signal noted) and exit
    with 128 + the signal's number."""
    ignore_stop_signals()  # a second one cannot cut this short
    said, code = interrupted_how(error if error is not None else signal_error(NOTED[-1]))
    try:  # after a hang-up the terminal is gone: the exit code still says it
        sys.stderr.write(f"{said}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    sys.exit(code)


def main(exiting: bool = False) -> None:
    """Run the CLI with the guard. `exiting` (the console script, `python -m gpumlp`): the
    process ends next, so the stop signals are left ignored, not given back to Python's
    defaults, where a Ctrl-C pressed again while the interpreter shuts down printed a
    traceback, or killed the process with no word after a finished run; otherwise (a caller in
    the same process, the tests) the handlers found are put back."""
    NOTED.clear()
    previous = replace_handlers(on_signal)  # one ignored by the parent stays ignored
    hook = sys.unraisablehook  # a signal's exception swallowed in a callback: NOTED says it
    try:
        sys.unraisablehook = without_interrupt_reports(hook)
        try:
            from .cli import main as cli
        except KeyboardInterrupt as e:
            stop(e)
        finally:
            sys.unraisablehook = hook
        if NOTED:
            stop()
        try:
            cli()
        except KeyboardInterrupt as e:
            stop(e)
    finally:
        if exiting:
            ignore_stop_signals()
        else:
            restore_handlers(previous)


def run() -> None:
    """The console script's entry point: `main` for a process that exits when it returns."""
    main(exiting=True)
