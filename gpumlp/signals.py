"""The one rule for taking over SIGINT, SIGTERM and SIGHUP, shared by the console script (`entry`),
the training loop's stop flag (`cli.StopFlag`) and the renames that must not be cut in two
(`npzio.signals_held`): a signal ignored by whoever started us stays ignored, nothing changes
outside the main thread (where Python cannot set handlers), and every handler is put back even
when a signal arrives while they are. Standard library only: `entry` loads it before NumPy."""

from __future__ import annotations

import signal
import threading

# SIGHUP: the terminal or ssh session closed (where the system has it; `nohup` ignores it,
# and an ignored signal stays ignored)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP")
                                                 else ()))


def replace_handlers(handler) -> dict:
    """Set `handler` for the STOP_SIGNALS, except where one is ignored (SIG_IGN) or was not
    set from Python (None); the previous handlers, for `restore_handlers` ({} outside the main
    thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS
            if signal.getsignal(signum) not in (signal.SIG_IGN, None)}


def restore_handlers(previous: dict) -> None:
    """Put back the handlers `replace_handlers` returned. signal.signal first runs a pending
    signal's handler, which may raise (a signal that came just after an earlier handler was
    put back) and leaves this one still to be put back: each is tried until it is, and the
    first such exception is raised after the last."""
    stopped = None
    for signum, handler in previous.items():
        while True:
            try:
                signal.signal(signum, handler)
                break
            except BaseException as e:
                stopped = stopped or e
    if stopped is not None:
        raise stopped
