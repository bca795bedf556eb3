"""What every `gpumlp` command shares: one-line errors, the common options, loading MNIST, and
`require`, the one line for an optional package that is not installed."""

from __future__ import annotations

import errno
import functools
import importlib
import os
import re

import click

from .errors import (ConfigError, DeviceError, GpumlpError, folder_problem, interrupted_how,
                     one_line, shell_path)

USAGE_ERRORS = (ConfigError, DeviceError)


class OneLineError(click.ClickException):
    """Printed as 'Error: <message>' with no usage text and no traceback, on one line (a line
    break in a file name shown as \\n) unless `multiline` (by design)."""

    def __init__(self, message: str, exit_code: int = 1, multiline: bool = False):
        super().__init__(message if multiline else one_line(message))
        self.exit_code, self.multiline = exit_code, multiline


def tell(text: str) -> None:
    """Write one line to stderr, or nothing when it cannot be written (its reader has gone):
    the exit code still says how the command ended."""
    try:
        click.echo(text, err=True)
    except OSError:
        pass


def require(module: str, package: str, extra: str) -> None:
    """A one-line error naming the pip extra when `module` (of `package`) cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise OneLineError(f"this command needs {package}, which is not installed; install it "
                           f"with pip install -e '.[{extra}]' in the gpumlp folder (the checkout "
                           "holding pyproject.toml)") from None


# what to lower when a command runs out of memory, by command (the function's name)
MEMORY_HINTS = {
    "train": ("lower train.eval_batch_size (a resume may change it with --set), "
              "model.hidden or train.batch_size"),
    "gradcheck": "lower --batch, or model.hidden with --set",
    "bench": "lower --samples, --hidden or --batch",
    "predict": "give fewer or smaller files at a time",
}
MEMORY_HINT = "free some memory and try again"
# what the dynamic loader says when a library's segments do not fit (a memory limit)
LOAD_OUT_OF_MEMORY = re.compile(r"failed to map segment|cannot allocate memory(?! in static TLS)",
                                re.IGNORECASE)  # static TLS: a loader limit (LD_PRELOAD fixes it)
# what to do about an error the system gave for a path, by errno
OS_ERROR_HINTS = {errno.ENAMETOOLONG: "; give a shorter path",
                  errno.EACCES: "; check its permissions", errno.EPERM: "; check its permissions",
                  errno.ELOOP: "; a link there leads back to itself: fix or remove it",
                  errno.ENOSPC: "; free some space and try again",
                  errno.EFBIG: "; the file size limit (ulimit -f) is too low: raise it",
                  errno.EMFILE: "; the open-file limit (ulimit -n) is too low: raise it",
                  errno.ENFILE: "; the system's open-file table is full: close some programs"}
NO_SUCH = re.compile(r"no such (file|folder)", re.IGNORECASE)  # errors a deleted cwd explains
CWD_GONE = ("; the current folder no longer exists (deleted or moved), so names relative to it "
            "lead nowhere: cd into a folder that exists")


def domain_errors(fn):
    """Turn GpumlpError (and unreadable files) into one line and an exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OneLineError as e:  # the command's own line
            if not e.multiline:
                e.message = one_line(with_cwd_note(e.message))
            raise
        except USAGE_ERRORS as e:
            raise OneLineError(str(e), exit_code=2, multiline=e.multiline) from None
        except GpumlpError as e:
            raise OneLineError(with_cwd_note(str(e)), exit_code=1,
                               multiline=e.multiline) from None
        except (MemoryError, ImportError) as e:  # NumPy's, and CuPy's OutOfMemoryError; a
            # library that could not be loaded for want of memory (ulimit -v: "failed to map
            # segment from shared object")
            if isinstance(e, ImportError) and not LOAD_OUT_OF_MEMORY.search(str(e)):
                raise
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise OneLineError(f"out of memory{f' ({detail})' if detail else ''}; "
                               f"{MEMORY_HINTS.get(fn.__name__, MEMORY_HINT)}") from None
        except KeyboardInterrupt as e:
            said, code = interrupted_how(e)
            tell(said)
            raise SystemExit(code) from None
        except EOFError as e:  # a reader that did not catch a cut-short input; click would
            detail = f": {e}" if str(e) else ""  # say "Aborted!" (or our "interrupted")
            raise OneLineError(f"an input ended before its end (EOFError{detail}); "
                               "a file it read may be cut short") from None
        except OSError as e:  # a file the OS refused: name it, no traceback
            if e.filename is None:  # stdout, most often: OneLineGroup.main says it for all
                raise
            raise OneLineError(with_cwd_note(f"{e.filename}: {e.strerror or e}"
                                             f"{OS_ERROR_HINTS.get(e.errno, '')}")) from None
    return wrapper


def with_cwd_note(message: str) -> str:
    """`message`, and CWD_GONE after it when it says something is missing (NO_SUCH) and the
    current folder has been deleted under the command: then that is why."""
    return f"{message}{CWD_GONE}" if NO_SUCH.search(message) and cwd_gone() else message


def cwd_gone() -> bool:
    """Whether the current folder has been deleted (or moved away) under the command."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def data_dir_source() -> tuple[str, str]:
    """What to put before the data folder in a message ('--data-dir ' or 'GPUMLP_DATA_DIR='),
    and how to use the cache instead."""
    from .fetch import DATA_DIR_ENV

    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source("data_dir") if ctx is not None else None
    if source == click.core.ParameterSource.ENVIRONMENT:
        return f"{DATA_DIR_ENV}=", f"unset {DATA_DIR_ENV}"
    if os.environ.get(DATA_DIR_ENV):
        return "--data-dir ", f"drop --data-dir and unset {DATA_DIR_ENV}"
    return "--data-dir ", "drop --data-dir"


def home_expanded(value, param: click.Parameter | None = None, ctx: click.Context | None = None):
    """`value` with a leading `~` or `~user` made that home folder, as GPUMLP_CACHE_DIR is read
    and as a shell does to a word (not to a quoted one, nor after `--data-dir=`); a usage error
    when no home folder is known for it (fetch.expand_home), never a folder named ~ below the
    current one. Only a str is changed."""
    if not (isinstance(value, str) and value.startswith("~")):
        return value
    from .fetch import expand_home

    try:
        return expand_home(value)
    except ValueError as e:
        raise click.BadParameter(f"{shell_path(value)}: {e}; give the path in full", ctx,
                                 param) from None


class UserPath(click.Path):
    """A path the user gives (an option, an argument, an environment variable): `~` expanded."""

    def convert(self, value, param, ctx):
        return super().convert(home_expanded(value, param, ctx), param, ctx)


class ModelPath(UserPath):
    """A model.npz argument: a run's folder given instead says which file to give."""

    def __init__(self):
        super().__init__(dir_okay=False, readable=False)  # the loader says why, exit 1

    def convert(self, value, param, ctx):
        value = home_expanded(value, param, ctx)
        if str(value) == "":  # "" would be read as the current folder
            self.fail("is empty; give a model.npz (a run's folder holds one)", param, ctx)
        hint = model_hint(value)
        if hint is not None:
            self.fail(hint, param, ctx)
        return super().convert(value, param, ctx)


def model_hint(value: str) -> str | None:
    """What to give instead of `value` for a model.npz: a run's folder names its model.npz, an
    ONNX export the model.npz it was made from, another folder a model.npz; None for anything
    else."""
    model = os.path.join(value, "model.npz")
    if os.path.isdir(value) and os.path.isfile(model):
        return f"{shell_path(value)} is a run's folder; give its model, {shell_path(model)}"
    if os.path.isdir(value):
        return f"{shell_path(value)} is a folder; give a model.npz"
    if str(value).lower().endswith(".onnx") and os.path.isfile(value):  # gpumlp export's
        npz = os.path.join(os.path.dirname(value), "model.npz")
        which = shell_path(npz) if os.path.isfile(npz) else "a run's model.npz"
        return (f"{shell_path(value)} is an ONNX export, which gpumlp does not read; give the "
                f"model.npz it was made from: {which}")
    return None


class OutFile(UserPath):
    """A file a command writes: a name that ends in a separator names a folder (Path would drop
    it, and the file would be written under the name of the folder meant). Replacing a file
    needs no right to read it: click's readable check is off."""

    def __init__(self, **kwargs):
        super().__init__(dir_okay=False, readable=False, **kwargs)

    def convert(self, value, param, ctx):
        value = home_expanded(value, param, ctx)
        text = os.fsdecode(value)
        if text.endswith(("/", os.sep)):
            self.fail(f"{shell_path(text)} ends in '/', the name of a folder; give a file name: "
                      "without the '/', or a name inside that folder", param, ctx)
        return super().convert(value, param, ctx)


class RunDir(UserPath):
    """A run folder: a file given for it is refused naming the folder it is in (report
    runs/h256/model.npz: the folder is what is meant); `new`, for train --out, a folder for a
    run to come, may be empty here (the command says what that means)."""

    def __init__(self, new: bool = False):
        super().__init__(file_okay=False)
        self.new = new

    def convert(self, value, param, ctx):
        value = home_expanded(value, param, ctx)
        if str(value) == "" and not self.new:
            self.fail("is empty; give a run's folder, as gpumlp train --out DIR wrote it", param,
                      ctx)
        if os.path.isfile(value):
            folder = os.path.dirname(value) or "."
            run = any(os.path.isfile(os.path.join(folder, name))  # a run's file, named: its
                      for name in ("config.yaml", "checkpoint.npz", "model.npz"))  # folder
            self.fail(f"{shell_path(value)} is a file; give " + (
                "a folder for the run" if self.new else
                f"the run's folder: {shell_path(folder)}" if run else
                "a run's folder, as gpumlp train --out DIR wrote it"), param, ctx)
        return super().convert(value, param, ctx)


def model_argument(fn):
    """The MODEL argument of evaluate, predict and export."""
    return click.argument("model_path", metavar="MODEL", type=ModelPath())(fn)


def no_mnist_files(data_dir: str, then: str, split: str | None = None) -> str:
    """The one line for a --data-dir (or GPUMLP_DATA_DIR) holding none of the four MNIST files:
    the names it needs (the two of `split` for a command that reads one split alone), and how
    to `then` ("use", "check") the cache instead."""
    from .mnist import FILES, NONE_THERE

    source, drop = data_dir_source()
    there = NONE_THERE if split is None else (
        f"neither {split} file is there ({', '.join(FILES[split])}, each raw or .gz); put "
        "them there under those names")
    return f"{source}{data_dir}: {there}, or {drop} to {then} the cache"


def files_needed(split: str | None) -> str:
    """The MNIST files a command reads: all four, or the two of `split`."""
    from .mnist import FILES

    return ("the four MNIST files" if split is None else
            f"the two {split} files ({', '.join(FILES[split])})")


def load_mnist_for(data_dir: str | None, quiet: bool = False, split: str | None = None):
    """The MNIST arrays, from --data-dir or the cache (fetched on first use): an Mnist, or with
    `split` ("train", "test") that Split alone, whose two files are all that is read or fetched.

    A folder the user names is used as it is: a missing or wrong file there is an error
    naming it (rather than a silent download), so a damaged folder never goes unnoticed.
    A fetch into the cache says so on stderr unless `quiet` (only a command's own -q passes
    it: a fetch may take minutes); stdout stays the command's own.
    """
    from .cli_data import progress_reporter
    from .errors import DataError
    from .fetch import ensure_mnist, load_verified, mnist_cache_dir, split_checksums
    from .mnist import FilesMissing, NoMnistFiles, load_for

    if data_dir:
        source, drop = data_dir_source()
        what = folder_problem(data_dir)
        if what is not None:
            raise DataError(f"{source}{data_dir}: {what}; point it at the folder holding "
                            f"{files_needed(split)}, or {drop} to use the cache")
        try:
            return load_verified(data_dir, split=split)
        except NoMnistFiles:  # one line, as `gpumlp data verify` says it
            raise DataError(no_mnist_files(data_dir, "use", split)) from None
        except DataError as e:
            fix = "put them there" if isinstance(e, FilesMissing) else "fix or replace those files"
            raise DataError(f"{source}{e}; {fix}, or {drop} to use the cache") from None
    try:  # a complete cache, each file read once (ensure_mnist's check would read it again)
        return load_verified(mnist_cache_dir(), split=split)
    except DataError:  # missing or damaged files: fetch (or repair) them, saying so
        folder = ensure_mnist(None, progress=progress_reporter(quiet),
                              checksums=split_checksums(split))
        return load_for(folder, split)


def data_dir_option_for(help_text: str, path_type: type | None = None):
    """The --data-dir option (also read from $GPUMLP_DATA_DIR); "{env}" in `help_text` names
    that variable. The value is a str, or a `path_type` (Path) when given."""
    from .fetch import DATA_DIR_ENV

    def checked(ctx: click.Context, param: click.Parameter, value: str | None):
        """`--data-dir ''` (a script's unset variable, say) is a usage error, not the current
        folder or no folder; an empty $GPUMLP_DATA_DIR counts as unset."""
        if value == "" and ctx.get_parameter_source(param.name) == \
                click.core.ParameterSource.COMMANDLINE:
            raise click.BadParameter("is empty; give the folder of the MNIST files, or "
                                     "leave it out to use the cache", ctx, param)
        if not value:
            return None
        return path_type(value) if path_type else value

    return click.option(
        "--data-dir", type=UserPath(readable=False), envvar=DATA_DIR_ENV, callback=checked,
        help=help_text.format(env=DATA_DIR_ENV))


data_dir_option = data_dir_option_for(
    "Folder with the four MNIST files (default: the cache; env: {env}).")
test_data_dir_option = data_dir_option_for(  # evaluate and report read the test set alone
    "Folder with the MNIST test files, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, "
    "raw or .gz (default: the cache; env: {env}).")
train_data_dir_option = data_dir_option_for(  # bench reads the training set alone
    "Folder with the MNIST training files, train-images-idx3-ubyte and "
    "train-labels-idx1-ubyte, raw or .gz (default: the cache; env: {env}).")
device_option = click.option(
    "--device", default="auto", show_default=True,
    help="auto, cpu, cuda or cuda:N. auto takes the GPU when CuPy sees one.")
