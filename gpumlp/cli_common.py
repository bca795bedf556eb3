"""What every `gpumlp` command shares: one-line errors, the common options, loading MNIST."""

from __future__ import annotations

import functools

import click

from .errors import ConfigError, DeviceError, GpumlpError

USAGE_ERRORS = (ConfigError, DeviceError)


class OneLineError(click.ClickException):
    """Printed as 'Error: <message>' with no usage text and no traceback."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def domain_errors(fn):
    """Turn GpumlpError (and unreadable files) into one line and an exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USAGE_ERRORS as e:
            raise OneLineError(str(e), exit_code=2) from None
        except GpumlpError as e:
            raise OneLineError(str(e), exit_code=1) from None
        except MemoryError:
            raise OneLineError("out of memory; lower train.batch_size or the hidden sizes") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise SystemExit(130) from None
        except OSError as e:  # a file the OS refused: name it, no traceback
            where = f"{e.filename}: " if e.filename else ""
            raise OneLineError(f"{where}{e.strerror or e}") from None
    return wrapper


def load_mnist_for(data_dir: str | None, quiet: bool):
    """The MNIST arrays, from --data-dir or the cache (fetched on first use).

    A folder the user names is used as it is: a missing or wrong file there is an error
    naming it (rather than a silent download), so a damaged folder never goes unnoticed.
    """
    from .cli_data import progress_reporter
    from .errors import DataError
    from .fetch import ensure_mnist, load_verified, mnist_cache_dir
    from .mnist import load_mnist

    if data_dir:
        try:
            return load_verified(data_dir)
        except DataError as e:
            raise DataError(f"--data-dir {e}; fix or replace those files, or drop --data-dir "
                            "(and GPUMLP_DATA_DIR) to use the cache") from None
    try:  # a complete cache, each file read once (ensure_mnist's check would read it again)
        return load_verified(mnist_cache_dir())
    except DataError:  # missing or damaged files: fetch (or repair) them, saying so
        return load_mnist(ensure_mnist(None, progress=progress_reporter(quiet)))


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False), envvar="GPUMLP_DATA_DIR",
    help="Folder with the four MNIST files (default: the cache; env GPUMLP_DATA_DIR).")
device_option = click.option(
    "--device", default="auto", show_default=True,
    help="auto, cpu, cuda or cuda:N. auto takes the GPU when CuPy sees one.")
