"""Domain errors: the CLI turns each into a one-line message and a non-zero exit code; and
what several messages share: `shown`, a value cut short; `shell_path`, a path as a word of a
command to paste; `error_summary`, what a library raised, in a line; `folder_problem`,
`search_problem`, `write_problem` and `target_problem`, the words for a path that is not a folder,
a folder that cannot be searched, one that cannot be written, and a file that may not be
written."""

from __future__ import annotations

import errno
import os
import reprlib
import shlex
import stat
import tempfile
from pathlib import Path

_BRIEF = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict = 1, 6, 6, 4


def shown(value: object, limit: int = 60) -> str:
    """`value` for a one-line message, at most `limit` characters: a str quoted (ascii), a
    list, tuple or dict as reprlib cuts it (never built whole: a few YAML anchors can make a
    list of 10^8 items), anything else as str()."""
    if isinstance(value, str):
        text = ascii(value)
    elif isinstance(value, (list, tuple, dict)):
        text = _BRIEF.repr(value)
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class GpumlpError(Exception):
    """An error the user can fix; its message says what is wrong and how to fix it, in one line
    (a line break in it, from a file name, is shown as \\n), unless `multiline`."""
    multiline = False


def one_line(text: str) -> str:
    """`text` on one line: a line break in it (from a file name) shown as \\n, \\r."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def one_line_message(error: GpumlpError) -> str:
    """The message of `error` as the CLI prints it: line breaks escaped, unless it is made of
    several lines by design."""
    text = str(error)
    return text if error.multiline else one_line(text)


class ConfigError(GpumlpError):
    """A config file, key or value is wrong."""


class DataError(GpumlpError):
    """The MNIST files are missing, unreadable or not what they claim to be."""


class DeviceError(GpumlpError):
    """The requested device is not usable."""


class CheckpointError(GpumlpError):
    """A model or checkpoint file is missing, unsafe or inconsistent."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`docker stop`) outside training: stops the command as Ctrl-C does (the same
    clean-up), exit 143. A container's first process must handle SIGTERM, or it is ignored."""


def error_summary(e: BaseException) -> str:
    """"Type: first line of its message" (the type alone when it has none), for a one-line
    error that reports what a library raised."""
    lines = [line for line in str(e).strip().splitlines()
             if line.strip("=-* \t")]  # not a banner's rule of = or -
    first = lines[0].strip() if lines else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class HungUp(Terminated):
    """SIGHUP (the terminal or ssh session closed): stops the command as SIGTERM does, exit 129;
    a run started with `nohup` ignores it and goes on."""


def interrupted_how(e: BaseException | None) -> tuple[str, int]:
    """What to print and the exit code after Ctrl-C, SIGTERM (`Terminated`) or SIGHUP
    (`HungUp`): 128 + the signal's number."""
    if isinstance(e, HungUp):
        return "hung up (SIGHUP)", 129
    if isinstance(e, Terminated):
        return "terminated (SIGTERM)", 143
    return "interrupted", 130


def signal_error(signum: int) -> KeyboardInterrupt:
    """The exception that stops a command on signal `signum` (SIGINT, SIGTERM or SIGHUP)."""
    import signal
    if signum == getattr(signal, "SIGHUP", None):
        return HungUp()
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def without_interrupt_reports(hook):
    """A sys.unraisablehook that leaves out Python's "Exception ignored" report of a signal's
    exception swallowed in a weakref or GC callback (the caller notes the signal itself, and
    the exit code says it), and passes every other report to `hook`."""
    def unraisable(info) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            hook(info)
    return unraisable


def shell_path(path: str | os.PathLike) -> str:
    """`path` as one word of a command to paste into a shell: quoted, and given a leading
    `./` when it starts with '-', which a command would take for an option. A name with bytes
    that are not text in this locale (held as lone surrogates), or with a line break or other
    control character, is written as bash's $'...' with \\xNN escapes: the same bytes, on one
    line, where plain quotes would show them as \\udcNN or break the line."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    text = f"./{text}" if text.startswith("-") else text
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(chr(b) if 0x20 <= b < 0x7F and chr(b) not in "\\'" else
                          f"\\{chr(b)}" if chr(b) in "\\'" else f"\\x{b:02x}"
                          for b in os.fsencode(text)) + "'"


def json_text(text: str) -> str:
    """`text` fit for JSON: a file name's bytes that are not UTF-8 (which Python holds as lone
    surrogates, which strict JSON parsers refuse) written as \\xNN escapes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no byte stands for (a Windows name): \uNNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is no folder ("no such folder" / "not a folder") or one that cannot be searched
    (`search_problem`), or None when it is one; the caller puts it in its own sentence."""
    path = Path(path)
    info, refused = folder_stat(path)
    if refused is not None:
        return refused
    if info is not None and stat.S_ISDIR(info.st_mode):
        return None
    if in_link_loop(path):
        return LINK_LOOP
    return "not a folder" if path.exists() else "no such folder"


LINK_LOOP = "a link that leads back to itself (fix or remove it)"
SEARCH_PROBE = "gpumlp-search-probe"  # a name looked up, never made: only its lookup matters


def search_problem(path: str | os.PathLike) -> str | None:
    """Why no file in `path` can be looked up: a folder on the way to it without search (x)
    permission, or `path` itself (`refused_search`); None when there is none, or `path` is no
    folder."""
    return folder_stat(path)[1]


def folder_stat(path: str | os.PathLike) -> tuple[os.stat_result | None, str | None]:
    """os.stat(path) (None when it fails) and `search_problem`'s words, from that one stat:
    names are looked up on the way (slow under an autofs root) only when the stat is refused
    or the mode of the folder `path` denies this user search."""
    try:
        info = os.stat(path)
    except PermissionError as e:  # a folder on the way cannot be searched
        return None, refused_search(path) or f"cannot be reached ({e.strerror})"
    except (OSError, ValueError):
        return None, None
    if stat.S_ISDIR(info.st_mode) and denies_search(info):
        return info, refused_search(path)  # root, an ACL, ... may search it all the same
    return info, None


def denies_search(info: os.stat_result) -> bool:
    """Whether the mode of a folder (its stat `info`) denies search (x) to this process's user
    and groups (False where there are no such modes)."""
    if not hasattr(os, "geteuid"):
        return False
    if info.st_uid == os.geteuid():
        return not info.st_mode & stat.S_IXUSR
    if info.st_gid == os.getegid() or info.st_gid in os.getgroups():
        return not info.st_mode & stat.S_IXGRP
    return not info.st_mode & stat.S_IXOTH


def refused_search(path: str | os.PathLike) -> str | None:
    """The first folder on the real way to `path` (links followed), `path` included, in which
    a name cannot be looked up, in words: "cannot be searched (Permission denied); FIX", or
    "cannot be reached: FOLDER cannot be searched ..." for another folder; None when there is
    none. A name is looked up in each, as the kernel will (not os.access, which asks about
    the real user)."""
    real = Path(os.path.realpath(path))
    for folder in (*reversed(real.parents), real):
        try:
            os.stat(folder / SEARCH_PROBE)
        except PermissionError as e:
            where = "" if folder == Path(os.path.abspath(path)) else f"cannot be reached: {folder} "
            return (f"{where}cannot be searched ({e.strerror or 'Permission denied'}); "
                    f"{search_fix(folder)}")
        except OSError:  # not there (the usual answer), not a folder, ...
            continue
    return None


def search_fix(folder: Path) -> str:
    """How to get search permission on `folder`: chmod for its owner, else whose it is."""
    try:
        owner = os.stat(folder).st_uid
    except OSError:
        owner = None
    if owner is None or not hasattr(os, "geteuid") or owner == os.geteuid():
        return f"chmod u+rx {shell_path(folder)}"
    try:
        import pwd
        name = pwd.getpwuid(owner).pw_name
    except (ImportError, KeyError):
        name = f"user {owner}"
    return f"only its owner, {name}, can give you search (x) permission on it"


def in_link_loop(path: str | os.PathLike) -> bool:
    """Whether `path` cannot be reached for links that lead back to themselves (ELOOP), which
    Path.exists() reports as no file at all."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def target_problem(path: str | os.PathLike, overwrite: bool) -> str | None:
    """Why a command may not write the file `path` ("exists and is not a plain file", "already
    exists; pass --overwrite to replace it"), or None; the caller adds what to do instead."""
    path = Path(path)
    if path.exists() and not path.is_file():
        return "exists and is not a plain file"
    if os.path.lexists(path) and not overwrite:  # a dangling link too: never written through
        return "already exists; pass --overwrite to replace it"
    return None


def write_fix(error: OSError, otherwise: str = "fix that", folder: Path | None = None) -> str:
    """What to do about a file that could not be written for `error`, in a few words; `folder`:
    where it was written through a temporary file and a rename, which its permissions refused
    (the file's own do not matter then)."""
    writable = ("make it writable" if folder is None else
                f"make the folder {shell_path(folder)} writable")
    return {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EFBIG: "raise the file size limit (ulimit -f)",
            errno.EACCES: writable,
            errno.ENAMETOOLONG: "give it a shorter path"}.get(error.errno, otherwise)


def write_problem(folder: str | os.PathLike) -> str | None:
    """The system's reason why no file can be created in the existing `folder`, or None."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None
