"""The `gpumlp` command: a thin shell that parses, calls one library function, and reports.

Domain errors become one line on stderr and an exit code: 2 for a usage error (a bad
config or device), 1 for a failure; Ctrl-C (SIGINT), SIGTERM (`docker stop`) or SIGHUP (a
closed terminal) during training saves a checkpoint (or keeps the last good one, after a step
whose weights are too large to use), then exits 128 + the signal's number: 130, 143 or 129;
after the last step it lets the run finish (exit 0) with a note.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from time import monotonic  # by name: tests replace `time` for default_out's strftime
from typing import NoReturn

import click

from . import __version__
from .cli_common import (RunDir, UserPath, data_dir_option, device_option, domain_errors,
                         interrupted_how, load_mnist_for, model_argument, model_hint, tell,
                         test_data_dir_option)
from .errors import (CheckpointError, ConfigError, GpumlpError, json_text, one_line,
                     shell_path, signal_error, without_interrupt_reports)
from .signals import replace_handlers, restore_handlers


class OneLineGroup(click.Group):
    """A group whose errors, click's usage errors included, are one line on stderr."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        closed_streams()
        tolerant_output()
        restore = catch_signals()
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
            if SIGNALLED:  # raised where Python swallowed it: the command went on to its end
                said, code = interrupted_how(signal_error(SIGNALLED[0]))
                tell(said)
                sys.exit(code)
        except click.exceptions.NoArgsIsHelpError as e:  # a group with no command: its help
            try:                                # written here, outside click's own handling
                click.echo(e.ctx.get_help())
            except OSError as error:
                output_failed(error)
            sys.exit(0)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            argv = sys.argv[1:] if args is None else [str(a) for a in args]
            message = (set_instead(e, argv) or extra_instead(e, argv)
                       or f"{e.format_message()}{hint}")
            tell(f"Error: {one_line(message)}")
            sys.exit(e.exit_code)
        except click.ClickException as e:  # a line break in a file name shown as \n
            message = e.format_message()
            tell(f"Error: {message if getattr(e, 'multiline', False) else one_line(message)}")
            sys.exit(e.exit_code)
        except click.Abort as e:
            said, code = interrupted_how(e.__cause__)
            tell(said)
            sys.exit(code if isinstance(e.__cause__, KeyboardInterrupt) else 1)
        except OSError as e:  # outside a command's own handling: most often, writing stdout
            output_failed(e)
        finally:
            restore()
        sys.exit(result if isinstance(result, int) else 0)


GRADCHECK_KEYS = ("train.seed", "train.label_smoothing")  # with model.*, what gradcheck reads


COMMANDS_INSTEAD = {"download": "fetch", "get": "fetch", "pull": "fetch"}  # data's, by name


def extra_instead(e: click.UsageError, argv: list[str]) -> str:
    """For a usage error a newcomer makes, the line that says what to write: a config file
    given without --config (`train configs/h256.yaml`), a --set value after a space (`--set
    train.epochs 3`), `data download` for `data fetch`; '' for any other usage error."""
    said, ctx = e.format_message(), e.ctx
    if ctx is None:
        return ""
    names = {param.name for param in ctx.command.params}
    extra = re.fullmatch(r"Got unexpected extra arguments? \((.*)\)", said)
    if extra and "overrides" in names:
        text = extra.group(1)  # click's: the extra arguments joined with spaces
        at = next((i for i in reversed(range(len(argv)))  # the last: a value may come earlier
                   if text == argv[i] or text.startswith(f"{argv[i]} ")), None)
        first = text if at is None else argv[at]
        pair = [] if at is None else argv[max(at - 2, 0):at]
        given = lambda option: any(a == option or a.startswith(f"{option}=")  # noqa: E731
                                   for a in argv)
        if pair[:1] == ["--set"] and "=" not in pair[1] and not pair[1].startswith("-"):
            return (f"--set takes KEY=VALUE, one word: --set {pair[1]}={shlex.quote(first)}, "
                    f"not --set {pair[1]} {shlex.quote(first)}")
        if "config_path" in names and first.endswith((".yaml", ".yml")) and \
                not given("--config") and at is not None:
            if given("--resume"):
                return (f"--resume takes the run's saved config; drop {shlex.quote(first)} "
                        "(--set may change optim.lr, train.epochs, ...)")
            name = ctx.command.name  # the command line again, the file after --config
            start = argv.index(name) + 1 if name in argv[:at] else at
            words = " ".join(shlex.quote(w) for w in [*argv[start:at], "--config", *argv[at:]]
                             if w != "--")  # after --, --config would be an argument too
            return (f"{ctx.command_path} takes its config file with --config: "
                    f"{ctx.command_path} {words}")
    wrong = re.fullmatch(r"No such command '(.*)'\.", said)
    if wrong and ctx.command.name == "data" and wrong.group(1) in COMMANDS_INSTEAD:
        return (f"{ctx.command_path} has no command {wrong.group(1)!r}; to get the MNIST "
                f"files: {ctx.command_path} {COMMANDS_INSTEAD[wrong.group(1)]}")
    return ""


def set_instead(e: click.UsageError, argv: list[str]) -> str:
    """For an option that is no option of a command taking --set but names a config key
    (`train --epochs 3`, `--lr=0.05`, `--batch-size 64`): the error, with the --set to write
    instead and the value the user gave; '' for any other usage error."""
    if not isinstance(e, click.NoSuchOption) or e.ctx is None or not any(
            param.name == "overrides" for param in e.ctx.command.params):
        return ""
    from .config import Config, is_number, key_named
    from .runfiles import dotted_config
    key = key_named(e.option_name.lstrip("-").replace("-", "_"))
    if key is None or (e.ctx.command.name == "gradcheck" and key not in GRADCHECK_KEYS
                       and not key.startswith("model.")):
        return ""   # (gradcheck reads the net and a few keys: --set of another does nothing)
    value = "true" if isinstance(dotted_config(Config())[key], bool) else "VALUE"  # a flag
    for i, word in enumerate(argv):
        option, equals, given = str(word).partition("=")
        if option == e.option_name:
            later = [str(w) for w in argv[i + 1:i + 2]]
            if equals:
                value = given
            elif later and (not later[0].startswith("-") or is_number(later[0])):
                value = later[0]                    # not the next option; -0.5 is a value
            break
    return (f"{e.ctx.command_path} has no option {e.option_name}; config keys are given with "
            f"--set: --set {key}={shlex.quote(value)}")


class ClosedOutput(io.TextIOBase):
    """Stands in for a stdout the process was started without (`>&-`): writing to it is an
    OSError, reported as any output that cannot be written, rather than lost in silence."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")


def closed_streams() -> None:
    """A stdout or stderr closed at start (Python then has None there): stdout writes fail
    with a one-line error (ClosedOutput), stderr writes go to the null device."""
    if sys.stdout is None:
        sys.stdout = ClosedOutput()
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


def tolerant_output() -> None:
    """Let stdout and stderr write what their encoding lacks as backslash escapes (a run folder
    named with a euro sign under a Latin-1 locale, a file name that is not UTF-8) rather than
    fail with UnicodeEncodeError after the work is done. An ASCII stream (the C locale with
    PYTHONUTF8=0) becomes UTF-8, as click would rewrap it anyway, but with its
    `errors="replace"`, which turned the bytes of a file name that is not UTF-8 into '?'."""
    for stream in (sys.stdout, sys.stderr):
        try:
            ascii_only = codecs.lookup(stream.encoding).name == "ascii"
            stream.reconfigure(errors="backslashreplace", **({"encoding": "utf-8"}
                                                             if ascii_only else {}))
        except (AttributeError, TypeError, LookupError, ValueError, OSError):  # a test's capture
            pass


def output_failed(e: OSError) -> NoReturn:
    """Exit 1 after an OSError that no command handled, most often a write to stdout that
    failed: one line that says so, or nothing when the reader has gone (`| head`)."""
    quiet_stdout()    # so that the flush at exit does not fail a second time
    if not isinstance(e, BrokenPipeError):  # `| head` stopped reading: nothing to say
        what = e.strerror or e
        tell(f"Error: {e.filename}: {what}" if e.filename else
             f"Error: cannot write the output ({what}); check where it goes")
    sys.exit(1)


def quiet_stdout() -> None:
    """Point stdout at the null device (after a write to it failed)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


SIGNALLED: list[int] = []  # the signals catch_signals' handlers were called for
RAISED_AT: list[float] = []  # when (time.monotonic) they last raised
REPEAT_GAP = 1.0  # s: a signal this soon after the last that raised is the same stop sent twice


def catch_signals() -> Callable[[], None]:
    """Make SIGTERM raise `Terminated` and SIGHUP `HungUp` (KeyboardInterrupts: Ctrl-C's
    clean-up, exit 143 and 129), and SIGINT KeyboardInterrupt as Python's own handler does,
    for the command's duration, noting
    each in SIGNALLED: an exception raised in a weakref or garbage-collection callback is
    swallowed by Python, and the command would end as if never stopped. Training's StopFlag
    replaces them while a run could checkpoint. In a container gpumlp is the first process,
    which the kernel spares a SIGTERM it does not handle: `docker stop` would wait 10 s and
    kill it. A signal within REPEAT_GAP of the last one that raised is only noted (`timeout`
    signals the process and its group: two at once, the second in the first's clean-up); a
    later one stops the command again. Python's "Exception ignored" report of a swallowed one
    is left out (the exit code says it). Returns what puts the previous handlers back (and
    forgets the command's signals: none is left for another command's StopFlag)."""
    def on_signal(signum, frame):
        now = monotonic()
        SIGNALLED.append(signum)
        if not RAISED_AT or now - RAISED_AT[-1] >= REPEAT_GAP:
            RAISED_AT.append(now)
            raise signal_error(signum)

    previous = replace_handlers(on_signal)  # {} outside the main thread
    if not previous:
        return lambda: None
    SIGNALLED.clear()
    RAISED_AT.clear()
    hook = sys.unraisablehook
    sys.unraisablehook = without_interrupt_reports(hook)

    def restore() -> None:
        restore_handlers(previous)
        sys.unraisablehook = hook
        SIGNALLED.clear()
    return restore


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpumlp")
def main():
    """Train an MLP on MNIST with hand-written backpropagation, on CPU or GPU.

    \b
    Example:
      gpumlp train --config configs/h256.yaml
    """


def run_stem(config_path: str | None) -> str:
    """The config's name for its runs' folders: h256 for configs/h256.yaml, never with a
    leading dot (./.yaml: yaml, not a hidden folder); "run" without a config, and for one read
    from a pipe (`<(...)`, /dev/fd/63: a number the user did not choose)."""
    if not config_path or not Path(config_path).is_file():  # is_file: a pipe is none
        return "run"
    return Path(config_path).stem.lstrip(".") or "run"


def default_out(config_path: str | None) -> Path:
    """Create and return runs/<config>-<YYYYmmdd-HHMMSS>, with -2, -3, ... when it is taken."""
    stem = run_stem(config_path)
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)  # atomic: two runs started in the same second differ
            return path
        except FileExistsError:
            if not path.parent.is_dir():  # runs is a link to a missing folder
                raise GpumlpError(f"{path.parent}: a link to a missing folder, so no run folder "
                                  f"can be made in it; pass --out, or move {path.parent} away"
                                  ) from None
            continue  # that name is taken: the next
        except OSError as e:
            raise GpumlpError(f"{path}: cannot create the run folder ({e.strerror or e}); "
                              "pass a writable --out") from None
    raise GpumlpError(f"{base}: 999 runs of that name already; pass --out")


class StopFlag:
    """Set by the first Ctrl-C (SIGINT), SIGTERM (`docker stop`) or SIGHUP; training checks it
    between steps and saves a checkpoint."""

    def __init__(self):
        self.signum: int | None = None   # the first signal caught

    def __call__(self) -> bool:
        return self.signum is not None

    def install(self) -> dict:
        """Catch SIGINT, SIGTERM and SIGHUP (signals.STOP_SIGNALS); returns the previous
        handlers, for `restore_handlers` ({} outside the main thread, where Python cannot set
        handlers: there signals keep theirs)."""
        def handler(signum, frame):
            self.signum = self.signum or signum
        if SIGNALLED:  # a signal before now whose exception Python swallowed: stop at once
            self.signum = self.signum or SIGNALLED[0]
        return replace_handlers(handler)

    @staticmethod
    @contextlib.contextmanager
    def ignored():
        """The stop signals ignored inside, so that clean-up is not cut short by a second
        one (`timeout` signals the process and its group: two SIGTERMs)."""
        previous = replace_handlers(signal.SIG_IGN)
        try:
            yield
        finally:
            restore_handlers(previous)

    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + int(self.signum or signal.SIGINT)

    def what(self) -> str:
        return interrupted_how(signal_error(self.signum or signal.SIGINT))[0]


def claim_out_dir(out_dir: Path, made: bool, overwrite: bool, config, init) -> tuple[bool, bool]:
    """Check, make and lock a new run's folder; give an empty one its config.yaml (and
    init.npz) at once, so that a run killed from then on can be resumed (an old run being
    overwritten stays intact until the new one has its data and state). Returns whether this
    run made the folder (`made`: default_out did) and whether it wrote config.yaml. A stop
    before config.yaml is whole leaves no folder it made."""
    from .runfiles import RunFiles, RunLocked, check_out_dir, lock_run, remove_if_empty

    locked = False  # until then another train may own what is in the folder
    try:
        existing, made_here = check_out_dir(out_dir, overwrite)
        made = made or made_here
        hold(lock_run(out_dir, "--out"))
        locked = True
        if not existing:
            RunFiles(out_dir).start(config, init)
        return made, not existing
    except RunLocked:  # another train made it its run first: all in it is that run's
        raise
    except BaseException:  # Ctrl-C or SIGTERM before config.yaml is whole
        if made and os.path.isdir(out_dir):  # os.path: no error for a name too long
            with StopFlag.ignored():
                if locked:
                    RunFiles(out_dir).discard_unstarted(remove_folder=True)
                else:
                    remove_if_empty(out_dir)
        raise


def check_options(resume_dir: str | None, out: str | None, overwrite: bool,
                  config_given: bool, init_path: str | None) -> None:
    """A usage error for what --resume cannot take (it continues the run with its saved config,
    in its folder; --set may change what keeps it the same run), and for an empty --out or
    --init, which would otherwise mean 'not given' (RunDir refuses an empty --resume).
    `config_given`: --config, --seed or --init was given, even empty."""
    if resume_dir is not None:
        if config_given or out is not None:
            raise ConfigError("--resume takes the run's saved config; drop --config, --seed, "
                              "--init and --out (--set may change optim.lr, train.epochs, ...)")
        if overwrite:
            from .resume_state import start_over_in  # (numpy: not for every usage error)
            from .runfiles import own_config
            run = ((Path(resume_dir) / "config.yaml").is_file()  # else no run to start over
                   and not own_config(Path(resume_dir)))
            over = f", or {start_over_in(Path(resume_dir))}" if run else ""
            raise ConfigError("--resume continues the run in its folder and never replaces it; "
                              f"drop --overwrite{over}")
    if overwrite and out is None and resume_dir is None:
        raise ConfigError("--overwrite replaces the run in --out; give --out DIR (without --out "
                          "each run gets a folder of its own, and nothing is replaced)")
    if out == "":
        raise ConfigError("--out is empty; give the run's folder, or drop --out for the default "
                          "runs/<config>-<YYYYmmdd-HHMMSS>")
    if init_path == "":
        raise ConfigError("--init is empty; give a model.npz to start from, or drop --init")


def resume_options() -> str:
    """The --device and --data-dir this train's command line gave, as words to put after
    `gpumlp train --resume RUN` in a command it prints: without them the resume would take
    another device (auto: a GPU if there is one) or look for MNIST in the cache."""
    ctx = click.get_current_context()
    typed = click.core.ParameterSource.COMMANDLINE
    words = []
    if ctx.get_parameter_source("device") == typed and ctx.params["device"] != "auto":
        words += ["--device", shell_path(ctx.params["device"])]
    if ctx.get_parameter_source("data_dir") == typed and ctx.params["data_dir"]:
        words += ["--data-dir", shell_path(ctx.params["data_dir"])]
    return "".join(f" {word}" for word in words)


def add_resume_options(e: GpumlpError, out_dir: Path) -> GpumlpError:
    """`e`, its `gpumlp train --resume OUT_DIR` (or `... FOLDER`, for a folder moved away while
    training), if it gives one, followed by resume_options()."""
    folders = f"(?:{re.escape(shell_path(out_dir))}|FOLDER)"
    options = resume_options()
    if options and len(e.args) == 1 and isinstance(e.args[0], str):
        e.args = (re.sub(r"gpumlp train --resume " + folders + r"(?=$|[\s);,])",
                         lambda m: m.group(0) + options, e.args[0]),)
    return e


@main.command()
@click.option("--config", "config_path", type=UserPath(readable=False),  # read_yaml says why
              help="YAML config (see configs/). Defaults apply to keys it leaves out.")
@device_option
@click.option("--out", type=RunDir(new=True),
              help="Run directory (default: runs/<config>-<YYYYmmdd-HHMMSS>, -2, -3, ... "
                   "if taken).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, value parsed as YAML; repeatable (--set optim.lr=0.05). "
                   "With --resume: the keys that keep it the same run (optim.lr, train.epochs, "
                   "...).")
@click.option("--init", "init_path", type=UserPath(readable=False),  # model_hint, below
              help="Start from the weights W1, b1, ... of this .npz.")
@click.option("--seed", type=int, help="Shortcut for --set train.seed=N.")
@click.option("--resume", "resume_dir", type=RunDir(),
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--overwrite", is_flag=True,
              help="Replace the run already in --out (the old run stays until the new one "
                   "has loaded its data).")
@data_dir_option
@click.option("--quiet", "-q", is_flag=True, help="Print only the final summary.")
@domain_errors
def train(config_path, device, out, overrides, init_path, seed, resume_dir, overwrite,
          data_dir, quiet):
    """Train an MLP and write its run directory.

    \b
    Writes config.yaml, metrics.jsonl, checkpoint.npz, model.npz and summary.json (and
    init.npz, a copy of the --init weights, for a resume).
    Precedence: defaults < --config < --set < --seed.

    \b
    Examples:
      gpumlp train --config configs/h256.yaml
      gpumlp train --config configs/smoke.yaml --device cpu --set optim.lr=0.05 --out runs/try
      gpumlp train --resume runs/try
      gpumlp train --resume runs/try --set optim.lr=0.02 --set train.epochs=20
    """
    from .backend import get_backend
    from .checkpoint import load_init
    from .config import build_config
    from .progress import Reporter
    from .runfiles import RunFiles, check_same_run, fixed_keys, lock_run
    from .train import (Interrupted, StoppedBeforeStart, StoppedUnsaved, train as run_training,
                        unsaved)

    given = (config_path, init_path, seed)
    check_options(resume_dir, out, overwrite, any(v is not None for v in given), init_path)
    if init_path:  # after check_options: with --resume, its words come first
        hint = model_hint(init_path)
        from .config import INITS
        if hint is None and init_path in INITS and not os.path.exists(init_path):
            hint = (f"takes a model.npz to start from; the init scheme is --set "
                    f"model.init={init_path}")
        if hint is not None:
            raise click.BadParameter(hint, param_hint="'--init'")
    if resume_dir:
        files = RunFiles(Path(resume_dir))
        # first: a run another train replaces now is not half there (is_dir() raised
        # PermissionError where a folder above cannot be searched: check_resumable says so)
        if os.path.isdir(files.folder):
            hold(lock_run(files.folder, "--resume"))
        files.check_resumable()
        # the two-key checks: here with --set (naming it), else once training is sure to take
        # a step (a finished run saved before a check was added still writes its results)
        config = build_config(files.path("config.yaml"), overrides, check_together=False)
        if overrides:  # only keys that keep it the same run (training records them), first:
            check_same_run(fixed_keys(files.saved_config()), config, files.folder, "--set")
            config = build_config(files.path("config.yaml"), overrides)  # advice it can take
    else:
        config = build_config(config_path, overrides, **{"train.seed": seed})
    backend = get_backend(device)
    init = None
    if init_path:
        init = load_init(init_path, config.model.layer_widths, config.train.dtype)
    if resume_dir:
        out_dir, created, early = Path(resume_dir), False, False
    else:
        out_dir = Path(out) if out else default_out(config_path)
        created, early = claim_out_dir(out_dir, not out, overwrite, config, init)
    reporter, stop = None, StopFlag()
    try:
        reporter = Reporter(quiet)
        mnist = load_mnist_for(data_dir, quiet)  # Ctrl-C here stops at once (a download)
        previous = stop.install()   # from here, Ctrl-C or SIGTERM saves a checkpoint first
        try:
            result = run_training(config, backend, mnist, out_dir=out_dir, init=init,
                                  resume=bool(resume_dir), on_event=reporter, should_stop=stop)
        except BaseException:
            restore_handlers(previous)
            raise
    except Interrupted:
        reporter.close()
        tell(f"{stop.what()}; checkpoint saved. Resume with: gpumlp train --resume "
             f"{shell_path(out_dir)}{resume_options()}")
        raise SystemExit(stop.exit_code())
    except StoppedUnsaved as e:  # the weights after the step were too large to checkpoint
        reporter.close()
        skipped, resume = e.skipped, (f"gpumlp train --resume {shell_path(out_dir)}"
                                      f"{resume_options()}")
        said = f"{stop.what()} after step {skipped.step}, {unsaved(skipped)}"
        if skipped.checkpoint:
            tell(f"{said}, so the last good checkpoint (step {skipped.saved_step}) is kept. "
                 f"Resume with: {resume}")
            raise SystemExit(stop.exit_code()) from None
        kept = bool(resume_dir)  # as a stop during the set-up: a new run's files go (an old
        if early:                # run being overwritten is back), a resumed run's stay
            with StopFlag.ignored():
                kept = not RunFiles(out_dir).discard_unstarted(remove_folder=created)
        again = f"{resume} starts it over" if kept else "run the same command again"
        tell(f"{said}; no checkpoint was written yet, so there is nothing to resume: start "
             f"over ({again})")
        raise SystemExit(stop.exit_code()) from None
    except (Exception, KeyboardInterrupt) as e:  # a bug's too: leave no half-made run behind
        if early:
            with StopFlag.ignored():
                cleared = RunFiles(out_dir).discard_unstarted(remove_folder=created)
            again = "then run the same command again"  # which its files left there refuse
            if not cleared and isinstance(e, GpumlpError) and str(e).endswith(again):
                raise add_resume_options(GpumlpError(
                    str(e).removesuffix(again) + "then start it over: gpumlp train --resume "
                    f"{shell_path(out_dir)}"), out_dir) from None
        if isinstance(e, StoppedBeforeStart):  # Ctrl-C or SIGTERM during the set-up
            tell(stop.what() + ("; the run is as it was: run the same command again to resume "
                                "it" if resume_dir else ""))
            raise SystemExit(stop.exit_code()) from None
        if isinstance(e, GpumlpError):  # its resume command, if it gives one, as given here
            add_resume_options(e, out_dir)
        raise
    finally:
        if reporter is not None:
            reporter.close()
    try:  # a signal now finds the run complete: StopFlag notes it, nothing raises
        s = result.summary
        val = (f"val_accuracy {s['val_accuracy']:.4f}  val_loss {s['val_loss']:.4f}  "
               if "val_accuracy" in s else "")  # with a validation split: the numbers to tune on
        click.echo(f"{val}test_accuracy {s['test_accuracy']:.4f}  test_loss {s['test_loss']:.4f}  "
                   f"epochs {s['epochs']}  {s['seconds']:.1f}s on {s['device']}  -> {out_dir}")
        if stop():  # after the last step: the work it would stop is done (exit 0)
            tell(f"note: {stop.what()} after the last step, so the run finished; "
                 f"{shell_path(out_dir)} is complete, with nothing to resume")
    finally:
        restore_handlers(previous)


@main.command(short_help="Test loss and accuracy of a model.npz on the MNIST test set.")
@model_argument
@device_option
@test_data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@domain_errors
def evaluate(model_path, device, data_dir, as_json):
    """Test loss and accuracy of a trained model.npz on the MNIST test set.

    \b
    Example:
      gpumlp evaluate runs/h256/model.npz --json
    """
    import numpy as np

    from .backend import get_backend
    from .checkpoint import load_model
    from .data import device_split
    from .model import params_on
    from .predict import TOO_LARGE
    from .train import evaluate as evaluate_params

    params, config = load_model(model_path)
    backend = get_backend(device)
    test = device_split(*load_mnist_for(data_dir, split="test"), backend)
    with np.errstate(over="ignore", invalid="ignore"):  # the check below says it in one line
        loss, accuracy = evaluate_params(params_on(backend, params), test, config)
    if not math.isfinite(loss):
        raise CheckpointError(f"{model_path}: {TOO_LARGE}")
    result = {"test_loss": loss, "test_accuracy": accuracy, "n": len(test),
              "model": json_text(str(model_path)), "device": backend.description}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"test_accuracy {accuracy:.4f}  test_loss {loss:.4f}  ({len(test)} images, "
                   f"on {backend.description})")


def hold(fd: int | None) -> None:
    """Keep the file descriptor `fd` (a run's lock) open until the command ends."""
    if fd is not None:
        click.get_current_context().call_on_close(lambda: os.close(fd))


LOOSE_TOLERANCE = 1e-4  # a gradcheck tolerance above this gets a note: wrong gradients pass


def positive_finite(value: float, name: str) -> float:
    """`value`, or a usage error unless it is a finite number above 0."""
    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number above 0, got {value}", param_hint=name)
    return value


@main.command(short_help="Check the gradients against central differences in float64.")
@click.option("--config", "config_path", type=UserPath(readable=False),
              help="YAML config whose net (hidden, activation, init, dropout, label smoothing) "
                   "is checked.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, value parsed as YAML; repeatable "
                   "(--set model.hidden=64).")
@click.option("--samples", default=20, show_default=True, type=click.IntRange(min=1),
              help="Entries checked per weight matrix, drawn at random, at least one in each "
                   "column (each unit it feeds); every bias entry is checked (every entry of "
                   "a parameter no larger; 200704 covers every entry of 784-256-10).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1, 60000),
              help="Examples in the random minibatch (at most MNIST's 60000).")
@click.option("--tolerance", default=1e-6, show_default=True, type=float,
              callback=lambda ctx, param, value: positive_finite(value, "--tolerance"),
              help="Largest relative error that passes.")
@domain_errors
def gradcheck(config_path, overrides, samples, batch, tolerance):
    """Check the loss gradients against central finite differences in float64.

    Builds the configured net (784 inputs, the hidden sizes, 10 classes) in float64 on a
    random minibatch, with the config's dropout and label smoothing, compares the gradients
    of model.backward with central differences for --samples entries of every weight matrix
    (at least one per column: each unit it feeds; all of them when --samples is at least its
    size) and every bias entry, and prints the largest relative error per parameter; exits 1
    if any is above the tolerance. Weight decay and max-norm act in the optimizer step and are
    not checked here (a note says so when they are set). With relu or
    leaky_relu, an entry whose step +-1e-5 moves a pre-activation across the kink at 0 has a
    central difference that is no derivative: it is measured again with the step 1e-6, then
    1e-7; one that straddles at every step is counted (column "straddle") and left out of the
    errors, and a note on stderr says how many. A parameter left with no entry compared fails.

    \b
    Example:
      gpumlp gradcheck --config configs/h256.yaml --set model.activation=gelu
    """
    from .activations import ACTIVATIONS
    from .config import build_config
    from .gradcheck import (EPS, SMALLER_STEPS, all_zero, gradcheck_config, passes,
                            worst_error)

    config = build_config(config_path, overrides)
    widths = config.model.layer_widths
    activation = config.model.activation
    results = gradcheck_config(widths, ACTIVATIONS[activation], config.model.init,
                               seed=config.train.seed, m=batch, dropout=config.model.dropout,
                               smoothing=config.train.label_smoothing, samples=samples)
    click.echo(f"{'param':<6} {'shape':<12} {'checked':>7} {'nonzero':>7} {'straddle':>8} "
               f"{'max rel error':>14} {'max abs error':>14}")
    for r in results:
        click.echo(f"{r.name:<6} {str(r.shape):<12} {r.checked:>7} {r.nonzero:>7} "
                   f"{r.straddling:>8} {r.max_rel_error:>14.3e} {r.max_abs_error:>14.3e}")
    left_out, rescued = sum(r.straddling for r in results), sum(r.rescued for r in results)
    if left_out or rescued:
        kinked = left_out + rescued
        entries = "1 entry straddles" if kinked == 1 else f"{kinked} entries straddle"
        fates = [f"{count} {fate}" for count, fate in (
            (rescued, "measured again with a smaller step"),
            (left_out, f"excluded (they straddle at {SMALLER_STEPS[-1]:g} too)")) if count]
        click.echo(f"note: {entries} {activation}'s kink at 0 with the step {EPS:g} (the step "
                   "moves a pre-activation across it: a central difference there is not a "
                   f"derivative): {', '.join(fates)}", err=True)
    unchecked = [r.name for r in results if r.checked == 0]
    if unchecked:
        click.echo(f"note: no entry of {', '.join(unchecked)} could be compared (each straddles "
                   f"{activation}'s kink at every step), so the check fails: draw others with "
                   "more --samples, another --batch or --set train.seed=N", err=True)
    zero = [r.name for r in results if all_zero(r)]
    if zero:
        click.echo(f"note: every entry of {', '.join(zero)} has a zero gradient on this batch "
                   "(dead units or zero inputs), so the check says nothing about them and "
                   "fails: try another --batch or --set train.seed=N", err=True)
    if any(r.checked and r.nonzero == 0 and not all_zero(r) for r in results):
        click.echo("note: every checked entry of a parameter had a zero gradient (dead units or "
                   "zero inputs in this batch); check more entries with --samples", err=True)
    in_step = [f"{key} {value:g}" for key, value in (
        ("optim.weight_decay", config.optim.weight_decay),
        ("model.max_norm", config.model.max_norm or 0.0)) if value]
    if in_step:
        acts, are = ("acts", "it is") if len(in_step) == 1 else ("act", "they are")
        why = [*(["the tests check weight decay's step: docs/derivation.md"]
                 if config.optim.weight_decay else []),
               *(["max-norm rescales weights, no gradient"] if config.model.max_norm else [])]
        click.echo(f"note: {' and '.join(in_step)} {acts} in the optimizer step, not in "
                   f"model.backward, so {are} not checked here ({'; '.join(why)})", err=True)
    if tolerance > LOOSE_TOLERANCE:
        click.echo(f"note: --tolerance {tolerance:g} is loose: a wrong gradient can pass it "
                   f"(right ones agree to about 1e-6 in float64)", err=True)
    worst, passed = worst_error(results), passes(results, tolerance)   # a NaN error fails
    said = f"; only zero gradients in {len(zero)} parameter{'s' if len(zero) > 1 else ''}" \
        if zero else ""
    compared, entries = sum(r.checked for r in results), sum(math.prod(r.shape) for r in results)
    click.echo(f"{'PASS' if passed else 'FAIL'}: largest relative error {worst:.3e} (tolerance "
               f"{tolerance:g}) over {compared:,} of {entries:,} entries, activation "
               f"{activation}, float64, central differences of model.backward{said}")
    if not passed:
        raise SystemExit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@domain_errors
def info(as_json):
    """Versions, usable devices and the BLAS NumPy uses.

    \b
    Example:
      gpumlp info
    """
    from .sysinfo import info_lines, system_info

    details = system_info()
    if as_json:
        click.echo(json.dumps(details, indent=2))
        return
    for line in info_lines(details):
        click.echo(line)


def _register_extra_commands() -> None:
    from .cli_data import data
    main.add_command(data)
    from .cli_bench import bench
    main.add_command(bench)
    from .cli_use import export, predict, report
    for command in (predict, report, export):
        main.add_command(command)


_register_extra_commands()
