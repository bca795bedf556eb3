"""The run directory: config.yaml, metrics.jsonl, checkpoint.npz, model.npz, summary.json, and
init.npz, the `--init` weights a run started from.

Every file but metrics.jsonl is written atomically (temporary file, fsync, rename), so a run
killed at any moment leaves the previous version of each file intact; metrics rows are appended
and fsynced, each after its epoch's checkpoint, and a resume rewrites the file atomically from
the checkpoint. checkpoint.npz holds everything a resume needs: weights, optimizer state,
generator states, the position in the epoch (with the epoch's order) and the metrics so far
(resume_state.py reads it back, checking each part). init.npz lets a run killed before its
first checkpoint start over from the same weights.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import Backend, to_host
from .checkpoint import load_init, param_arrays, save_model
from .config import (Config, KeyProblem, NotAMapping, build_config, checked_together,
                     config_to_dict, dump_config, read_yaml)
from .errors import (LINK_LOOP, CheckpointError, ConfigError, GpumlpError, folder_problem,
                     in_link_loop, shell_path, shown, write_fix, write_problem)
from .files import read_at_most, writing_now
from .model import Params
from .npzio import atomic_write, save_npz
from .resume_state import (CHECKPOINT_FORMAT, FROM_INIT, read_checkpoint, read_position,
                           restore_generators, restore_params_and_optimizer, start_over_in,
                           started_from_init)

if TYPE_CHECKING:
    from .train import RunState

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint.npz", "model.npz", "summary.json",
             "init.npz")
RUN_OUTPUTS = ("checkpoint.npz", "model.npz", "summary.json")  # what training has produced
# written into a run folder by `gpumlp report` (report.FIGURES, report.md) and `gpumlp export`
DERIVED_FILES = ("report.md", "learning_curves.png", "confusion_matrix.png",
                 "first_layer_weights.png", "confident_mistakes.png", "model.onnx")
# where `train --overwrite` puts the run it replaces until the new run's first checkpoint; a
# new run that fails before then puts it back (RunFiles.put_back)
REPLACED = ".gpumlp-replaced"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errnos of a disk (or quota) with no room left


def run_files_in(path: Path) -> list[str]:
    """The names of RUN_FILES present in `path`."""
    return [name for name in RUN_FILES if (path / name).exists()]


def resumable(path: Path) -> bool:
    """Whether `gpumlp train --resume` goes on with the run in `path` (what
    RunFiles.check_resumable lets through, its config's content aside): its config.yaml and
    its checkpoint (a finished run's too: its resume writes its results again, or trains on
    with more epochs), or nothing trained yet (a run killed before its first checkpoint, which
    a resume starts over)."""
    def has(name: str) -> bool:
        return (path / name).is_file()
    metrics = path / "metrics.jsonl"
    trained = (has("model.npz") or has("summary.json")
               or (metrics.is_file() and metrics.stat().st_size > 0))
    if not has("config.yaml") or not (has("checkpoint.npz") or not trained):
        return False
    return has("checkpoint.npz") or not own_config(path)  # unreadable: the resume says so


def summary_epochs(path: Path) -> int | None:
    """The epochs of the run's model.npz, as summary.json (written with it) says; None where it
    cannot say."""
    summary = path / "summary.json"
    try:  # a regular file only: a pipe there would hang the read
        data = read_at_most(summary, 1 << 20) if summary.is_file() else None
        epochs = json.loads(data)["epochs"] if data is not None else None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


def extended(path: Path) -> bool:
    """Whether the finished run in `path` was resumed for more epochs than its model.npz and
    summary.json are of, and has not finished them: config.yaml's train.epochs is more."""
    done = summary_epochs(path)
    if done is None or not (path / "config.yaml").is_file() or own_config(path):
        return False
    try:
        epochs = read_yaml(path / "config.yaml").get("train", {}).get("epochs")
    except (ConfigError, AttributeError):
        return False
    return isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > done


def own_config(path: Path) -> bool:
    """Whether `path`/config.yaml is a config of one's own (keys_lacking, or no YAML mapping:
    not_a_mapping), when a readable file (a pipe there would block the reading)."""
    if not (path / "config.yaml").is_file():
        return False
    try:
        return not_a_mapping(path) is not None or bool(keys_lacking(path))
    except ConfigError:
        return False


def not_a_mapping(path: Path) -> str | None:
    """Why `path`/config.yaml, the only run file there, holds no YAML mapping ("holds a list,
    not a mapping", "is not valid YAML at line 2, ..."): gpumlp writes one there, whole, so
    such a file is one's own. None where it holds one, cannot be read (the resume says why),
    or lies beside other run files (its run's, edited since)."""
    file = path / "config.yaml"
    if not file.is_file() or run_files_in(path) != ["config.yaml"]:
        return None
    try:
        with open(file, "rb"):  # a file that cannot be opened: the resume's error says why
            pass
        read_yaml(file)
    except OSError:
        return None
    except NotAMapping as e:
        return f"holds {e.kind}, not a mapping"
    except ConfigError as e:  # not valid YAML, not UTF-8 text, a key twice, ...
        said = str(e).removeprefix(f"config file {file}").split("; ")[0]
        return f"has a bad key{said}" if said.startswith(":") else said.lstrip()  # BadKey's
    return None


def keys_lacking(path: Path) -> list[str]:
    """The config keys that `path`/config.yaml lacks when it is a config of one's own rather
    than a run's (a run's lists every key); [] for a run's. Not a run killed before its first
    checkpoint: that one has metrics.jsonl, written just after its config.yaml of every key; a
    killed run's config edited since, or written by a version with fewer keys, has it too."""
    if (path / "metrics.jsonl").exists():
        return []
    return sorted(key_paths(config_to_dict(Config())) -
                  key_paths(read_yaml(path / "config.yaml")))


def aside_note(path: Path) -> str:
    """"; <path>/.gpumlp-replaced holds ...": what an error about the folder `path` adds when a
    killed --overwrite left the run it was replacing aside there (REPLACED); else ""."""
    if not aside_holds(path):
        return ""
    aside = path / REPLACED
    own = (aside / "config.yaml").exists() and not had_outputs(aside)
    what = "the files (a config of one's own)" if own else "the run"
    return (f"; {path / REPLACED} holds {what} an --overwrite killed before its first "
            "checkpoint was replacing: move its files back into the folder to keep it")


def aside_holds(path: Path) -> bool:
    """Whether `path`/REPLACED is a folder with something in it (an empty one, its files
    moved back by hand, holds nothing to keep)."""
    try:
        return (path / REPLACED).is_dir() and any(os.scandir(path / REPLACED))
    except OSError:
        return False


def unstarted(path: Path) -> bool:
    """Whether `path` holds what a run writes as it starts (config.yaml and an empty
    metrics.jsonl), as a run killed before its first checkpoint leaves it."""
    metrics = path / "metrics.jsonl"
    return (path / "config.yaml").is_file() and metrics.is_file() and metrics.stat().st_size == 0


def had_outputs(path: Path) -> bool:
    """Whether `path` holds an earlier run's checkpoint, model or summary (RUN_OUTPUTS): then its
    report and export (DERIVED_FILES) go with it on --overwrite."""
    return any((path / name).exists() for name in RUN_OUTPUTS)


class RunLocked(GpumlpError):
    """Another `gpumlp train` holds the run folder's lock: what is in it is that run's."""


def check_out_dir(path: Path, overwrite: bool) -> tuple[list[str], bool]:
    """Refuse a folder holding another run unless `overwrite`; check it can be written.

    Returns the RUN_FILES it already holds (or [".gpumlp-replaced/"], where a killed
    --overwrite left only that), and whether this call made the folder."""
    try:
        if in_link_loop(path):
            raise GpumlpError(f"--out {path}: {LINK_LOOP}; pick another path")
        if path.is_symlink() and not path.exists():
            raise GpumlpError(f"--out {path}: a link to {shown(os.readlink(path), 200)}, which "
                              "leads to no folder; point it at one, or pick another path")
        if path.exists() and not path.is_dir():
            raise GpumlpError(f"--out {path}: exists and is not a folder; pick another path")
        existing = run_files_in(path)
        replaced = aside_holds(path)  # the run a killed --overwrite was replacing
        if not existing and replaced:          # killed at its start: that run is the one here
            existing = [f"{REPLACED}/"]
    except OSError as e:  # a name too long, a loop of links, ...
        raise GpumlpError(f"--out {path}: cannot use that path ({e.strerror or e}); pick "
                          "another path") from None
    # first, as neither a resume nor --overwrite could help: a folder where the run writes a
    # file, or where --overwrite would remove an earlier run's report or export (RunFiles.start)
    written = (*RUN_FILES, *(DERIVED_FILES if had_outputs(path) else ()))
    taken = [name for name in written if (path / name).is_dir()]
    if taken:
        raise GpumlpError(f"--out {path}: {path / taken[0]} is a folder where gpumlp keeps a "
                          "file; move it out of the run folder, or pick another folder")
    aside = path / REPLACED  # a link: the run's files would go to, and stay in, its target
    if os.path.islink(aside) or (os.path.lexists(aside) and not aside.is_dir()):
        raise GpumlpError(f"--out {path}: {aside} is a file or a link where gpumlp keeps a "
                          "folder (a run being replaced); move it out of the run folder, or "
                          "pick another folder")
    inside = [] if existing else runs_inside(path)  # --out runs, meant: --out runs/NAME
    if inside:
        names = ", ".join(f"{name}/" for name in inside[:3]) + (", ..." if inside[3:] else "")
        raise GpumlpError(f"--out {path}: holds other runs ({names}), and a run's files "
                          "would lie among them; give this run a folder of its own, such as "
                          f"{shell_path(path / 'NAME')}")
    if existing and writing_now(path):  # neither --overwrite nor --resume can have it now
        raise run_locked("--out", path)
    if existing == ["config.yaml"] and not overwrite and own_config(path):
        broken = not_a_mapping(path)
        why = ("which lists every key" if broken is None else
               f"which is a YAML mapping of every key: this one {broken}")
        how = "" if broken else (f" (--config {shell_path(path / 'config.yaml')} --out "
                                 f"{shell_path(path / 'run')} trains with it)")
        raise GpumlpError(f"--out {path}: holds a config.yaml of one's own (not a run's, {why}), "
                          f"which the run would replace; give the run another folder{how}, or "
                          "pass --overwrite to replace it")
    if existing and not overwrite:
        unfinished = resumable(path) and ("summary.json" not in existing or extended(path))
        resume = ", resume it with --resume" if unfinished else ""
        derived = derived_outputs(path)
        also = f"; and {', '.join(derived)}, made from it" if derived else ""
        goes = " and what was made from it" if derived else ""
        aside = aside_note(path)
        raise GpumlpError(f"--out {path}: already holds a run ({', '.join(existing)}{also}); "
                          f"pick another folder{resume}, or pass --overwrite to replace it"
                          f"{goes}{aside}")
    made = False
    try:
        try:
            path.mkdir(parents=True)
            made = True
        except FileExistsError:  # there before, or made by another train just now
            pass
        why = write_problem(path)
    except OSError as e:
        why = e.strerror or str(e)
    if why is not None:
        raise GpumlpError(f"--out {path}: cannot write there ({why}); pick a writable folder")
    return existing, made


def runs_inside(path: Path, look_at: int = 1000) -> list[str]:
    """The sorted names of the folders in `path` that hold a run (its config.yaml and one of
    RUN_OUTPUTS), among its first `look_at` entries (a huge folder is not read to the end)."""
    names = []
    try:
        with os.scandir(path) as entries:
            for _, entry in zip(range(look_at), entries):
                sub = Path(entry.path)
                if (entry.is_dir() and entry.name != REPLACED and (sub / "config.yaml").is_file()
                        and any((sub / name).is_file() for name in RUN_OUTPUTS)):
                    names.append(entry.name)
    except OSError:  # not there yet, or not readable: check_out_dir says what is wrong
        return []
    return sorted(names)


def derived_outputs(path: Path, foreign: list[str] | None = None) -> list[str]:
    """The DERIVED_FILES in `path` that go with its run on --overwrite (RunFiles.start): none
    without an earlier run's outputs; never one of `foreign` (foreign_derived), a file gpumlp
    did not write."""
    if not had_outputs(path):
        return []
    if foreign is None:
        foreign = foreign_derived(path)
    return [name for name in DERIVED_FILES if name not in foreign and (path / name).is_file()]


def foreign_derived(path: Path) -> list[str]:
    """The DERIVED_FILES names in `path` taken by what gpumlp did not write: the report's
    (report.foreign_outputs), and a model.onnx that is not an export's (a user's own)."""
    from .export_onnx import made_by_export
    from .report import foreign_outputs

    onnx = path / "model.onnx"
    theirs = os.path.lexists(onnx) and not made_by_export(onnx)
    return [*foreign_outputs(path), *(["model.onnx"] if theirs else [])]


def kept_warning(folder: Path, foreign: list[str]) -> str:
    """What --overwrite says of the `foreign` files (foreign_derived) it kept in `folder`."""
    quoted, when = shell_path(folder), "when this run ends"
    report = any(name != "model.onnx" for name in foreign)
    makers = [maker for maker, found in (("gpumlp report", report),
                                         ("gpumlp export", "model.onnx" in foreign)) if found]
    again = [f"make the report again {when}: gpumlp report {quoted} --overwrite"] * report
    if "model.onnx" in foreign:
        again.append(f"export the new model {when}: gpumlp export "
                     f"{shell_path(folder / 'model.npz')} --overwrite")
    it = "them" if len(foreign) > 1 else "it"
    return (f"kept {', '.join(foreign)} in {folder}: not marked as made by "
            f"{' or '.join(makers)} (another program's, an older gpumlp's, or changed since), so "
            f"not removed with the run it replaced (it may describe that run); remove {it}, or "
            f"{'; or '.join(again)}")


def remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it is empty; leave it (and anything in it) otherwise."""
    try:
        folder.rmdir()
    except OSError:
        pass


def run_locked(option: str, folder: Path) -> RunLocked:
    return RunLocked(f"{option} {folder}: another gpumlp train is writing this run now; wait "
                     "for it to end (or stop it: it saves a checkpoint first)")


def lock_run(folder: Path, option: str) -> int | None:
    """Hold an exclusive lock on the run folder `folder` until the process ends, so that two
    `gpumlp train` never write one run at once; a GpumlpError when another holds it. The lock
    is flock(2) on the folder itself (no lock file is left behind); None where the system has
    no flock (Windows), or the file system takes no locks."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        for attempt in range(5):  # files.writing_now's probe holds a shared lock for a moment
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    raise
                time.sleep(0.02)
    except BlockingIOError:
        try:  # shared holders only: a gpumlp report being made there (files.run_held)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            reporting = True
        except OSError:
            reporting = False
        os.close(fd)
        if reporting:
            raise RunLocked(f"{option} {folder}: a gpumlp report is being made in this run "
                            "now; wait for it to end") from None
        raise run_locked(option, folder) from None
    except OSError:   # a file system without locks: go on unlocked, as before
        os.close(fd)
        return None
    sweep_temporaries(folder)
    return fd


def sweep_temporaries(folder: Path) -> None:
    """Remove the temporary files of run files ('.checkpoint.npz.<8 random>.tmp', as
    npzio.stage names them) that a process killed while writing them left behind (SIGKILL:
    `docker stop` after its 10 s), up to a checkpoint's size each. Only with the folder's lock
    held: no other gpumlp train is writing them then, and report's and export's are left."""
    pattern = re.compile("|".join(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp"
                                  for name in RUN_FILES))
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


RESUME_FIXED_KEYS = ("train.batch_size", "train.seed", "train.dtype", "optim.name")


def dotted(values: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value}: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
    flat: dict = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dotted_config(config: Config) -> dict:
    """The config as {dotted key: value}, as checkpoints record it."""
    return dotted(config_to_dict(config))


def fixed_keys(config: Config) -> dict:
    """The config's keys that a resume must keep ({dotted key: value}): the net, the data, how
    it is cut into batches, and the optimizer whose state the checkpoint holds. The other optim
    and train keys may change (a lower optim.lr after a NaN, more epochs)."""
    return {key: value for key, value in dotted_config(config).items()
            if key.startswith(("model.", "data.")) or key in RESUME_FIXED_KEYS}


def changes(saved: dict, now: dict, keys: list[str] | None = None) -> list[str]:
    """`key (old -> new)` for each dotted key of `saved` (or of `keys`) whose value `now`
    differs."""
    return [f"{key} ({json.dumps(saved[key])} -> {json.dumps(now.get(key))})"
            for key in (saved if keys is None else keys) if now.get(key) != saved[key]]


def check_same_run(saved: dict, config: Config, folder: Path,
                   source: str = "config.yaml") -> None:
    """Refuse a resume whose config changes a key of `fixed_keys` from `saved`: as config.yaml
    says since the checkpoint, or as `--set` would (a usage error then)."""
    changed = changes(saved, fixed_keys(config))
    if changed:
        error = ConfigError if source == "--set" else GpumlpError
        since = "" if source == "--set" else " since the checkpoint"
        fix = "drop that --set" if source == "--set" else "put it back"
        raise error(
            f"--resume {folder}: {source} changes {', '.join(changed)}{since}; a resume goes "
            "on with the same net, data, batches and optimizer (only the other optim and "
            f"train keys may change), so {fix}, or start a new run")


def key_paths(values: Any, prefix: str = "") -> set[str]:
    """The dotted keys of a nested mapping's leaves: {"model.hidden", "data.augment.shift", ...}."""
    if not isinstance(values, dict):
        return {prefix[:-1]} if prefix else set()
    return {key for name, value in values.items() for key in key_paths(value, f"{prefix}{name}.")}


def generator_state(rng) -> str | None:
    """The JSON of a NumPy generator's state; None for a generator that cannot say (CuPy's,
    whose `bit_generator.state` is a method, not a property)."""
    if not isinstance(rng, np.random.Generator):
        return None
    return json.dumps(rng.bit_generator.state)


class RunFiles:
    def __init__(self, folder: Path):
        self.folder = folder
        self.kept: str | None = None  # start's warning: the user's files it kept
        self.removed: list[str] = []  # start's note: the old run's report and export it removed
        self.put_aside = False        # start moved an earlier run to REPLACED (put_back undoes)
        self.trained_config: dict | None = None  # dotted: the config of the checkpoint's steps

    def path(self, name: str) -> Path:
        return self.folder / name

    def start(self, config: Config, init: Params | None = None, resumed: bool = False) -> None:
        """Begin a fresh run: its `--init` weights (before config.yaml, so that a resume always
        finds them), its config, empty metrics, and no files of an earlier run.

        A report or an export (DERIVED_FILES) goes with the run it was made from; one gpumlp
        did not write (foreign_derived) stays, as do files of those names in a folder that
        holds no such run: they are someone else's. An earlier run's files (or run files of
        one's own: a config.yaml, metrics.jsonl with rows) are moved to REPLACED, and removed
        with it at this run's first checkpoint (`drop_replaced`); until then `put_back`
        restores them. A REPLACED already there, with no earlier run's outputs beside it, is
        from a replacing run killed before its first checkpoint: it still holds the run to put
        back. `resumed`: a resume starting its own run over (one killed before its first
        checkpoint), whose files are rewritten, not put aside."""
        self.folder.mkdir(parents=True, exist_ok=True)
        aside = self.path(REPLACED)
        if had_outputs(self.folder):
            foreign = foreign_derived(self.folder)
            self.removed = derived_outputs(self.folder, foreign)
            # config.yaml moves first: aside with it, and none here, is a start killed during
            # its moves, to finish; else aside is older than the outputs here: stale
            if not ((aside / "config.yaml").exists() and not self.path("config.yaml").exists()):
                shutil.rmtree(aside, ignore_errors=True)
            aside.mkdir(exist_ok=True)
            for name in (*RUN_FILES, *self.removed):
                if self.path(name).exists():
                    os.replace(self.path(name), aside / name)
            self.put_aside = True
            if foreign:
                self.kept = kept_warning(self.folder, foreign)
        else:  # no outputs: files of one's own, or a run killed before its first checkpoint
            with contextlib.suppress(OSError):
                aside.rmdir()  # an empty one (its files moved back by hand) holds nothing
            if not resumed and not unstarted(self.folder):  # one's own: aside too, as a run's
                for name in RUN_FILES:  # config.yaml first; never over one put aside before
                    if self.path(name).exists() and not os.path.lexists(aside / name):
                        aside.mkdir(exist_ok=True)
                        os.replace(self.path(name), aside / name)
            self.put_aside = aside.is_dir()
        for name in RUN_OUTPUTS:
            self.path(name).unlink(missing_ok=True)
        if init is not None:
            save_npz(self.path("init.npz"), param_arrays(init))
        else:
            self.path("init.npz").unlink(missing_ok=True)
        self.write_config(config, from_init=init is not None)
        atomic_write(self.path("metrics.jsonl"), b"")

    def write_config(self, config: Config, from_init: bool) -> None:
        """config.yaml: every key of `config`, after FROM_INIT when the run started from
        --init weights."""
        text = (FROM_INIT if from_init else "") + dump_config(config)
        atomic_write(self.path("config.yaml"), text.encode())

    def from_init(self) -> bool:
        """Whether config.yaml says the run started from --init weights (FROM_INIT)."""
        return started_from_init(self.folder)

    def append_metrics(self, row: dict) -> None:
        path = self.path("metrics.jsonl")
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise self.write_failed(path, e, "the checkpoint is intact (a resume rewrites the "
                                    "file from it)", appended=True) from None

    def write_failed(self, path: Path, e: OSError, kept: str,
                     appended: bool = False) -> GpumlpError:
        """The one line for a run file that cannot be written during training: why, what is
        `kept` intact, and the command that goes on (the folder's new place, if it moved).
        `appended`: written in place (metrics.jsonl), not through a temporary file."""
        if not self.folder.is_dir():  # moved or removed while training
            return GpumlpError(f"cannot write {path}: the run folder is gone (moved or removed "
                               f"while training); {kept} wherever the folder went: resume it "
                               "there with gpumlp train --resume FOLDER")
        fix = write_fix(e, folder=None if appended else self.folder)
        return GpumlpError(f"cannot write {path} ({e.strerror or e}); {kept}; {fix}, then: "
                           f"gpumlp train --resume {shell_path(self.folder)}")

    def drop_replaced(self) -> None:
        """Remove the run this one replaced (REPLACED, if there): once a checkpoint is written."""
        shutil.rmtree(self.path(REPLACED), ignore_errors=True)
        self.put_aside = False

    def put_back(self) -> bool:
        """After this run failed before its first checkpoint: remove its files and move the
        run it was to replace back from REPLACED. Whether that run is back, whole."""
        if not self.put_aside or self.path("checkpoint.npz").exists():
            return False
        aside = self.path(REPLACED)
        try:
            for name in RUN_FILES:                  # this run's config, metrics and init
                self.path(name).unlink(missing_ok=True)
            for name in os.listdir(aside):
                if not self.path(name).exists():    # never over a file made there since
                    os.replace(aside / name, self.path(name))
            aside.rmdir()                           # fails if anything stayed behind
        except OSError:
            return False
        self.put_aside = False
        return True

    def discard_unstarted(self, remove_folder: bool) -> bool:
        """Remove the files (and, with `remove_folder`, the folder) this run created, when no
        checkpoint was written yet; False when its config.yaml stays. The removal stops at the
        first file that cannot go (a folder made read-only: the error that ended the run is the
        one to tell), config.yaml before init.npz, so that what stays is a run killed before
        its first checkpoint, which a resume starts over."""
        if self.path("checkpoint.npz").exists():
            return True
        with contextlib.suppress(OSError):
            for name in ("metrics.jsonl", "config.yaml", "init.npz"):
                self.path(name).unlink(missing_ok=True)
            if remove_folder:
                remove_if_empty(self.folder)
        return not self.path("config.yaml").exists()

    def stale_outputs(self) -> str | None:
        """What a resume that trains leaves out of date (a report, an export: DERIVED_FILES in
        the folder) and the commands that make it again; None when there is none."""
        foreign = foreign_derived(self.folder)  # the user's own: not remade, nor to be
        found = [name for name in DERIVED_FILES if self.path(name).is_file()
                 and name not in foreign]
        quoted = shell_path(self.folder)
        what, how = [], []
        if any(name != "model.onnx" for name in found):
            what.append("the report (report.md and its figures)")
            how.append(f"gpumlp report {quoted}")
        if "model.onnx" in found:
            what.append("model.onnx")
            how.append(f"gpumlp export {shell_path(self.path('model.npz'))} --overwrite")
        if not what:
            return None
        return (f"{' and '.join(what)} in the run describe{'s' if len(what) == 1 else ''} the "
                f"model before this resume; when it ends, make {'it' if len(what) == 1 else 'them'}"
                f" again: {'; '.join(how)}")

    def check_resumable(self) -> None:
        """Refuse a folder with no run to resume, or a finished run whose checkpoint is gone.

        A folder with config.yaml but no checkpoint yet (a run killed before its first one)
        passes: training starts it over, with the same result.
        """
        folder = self.folder
        what = folder_problem(folder)
        if what is not None:
            verb = "is " if what == "not a folder" else ""  # "no such folder", ...
            raise GpumlpError(f"--resume {folder}: {verb}{what}; give the run directory of an "
                              "interrupted `gpumlp train`")
        folders = [name for name in RUN_FILES if self.path(name).is_dir()]
        if folders:  # found now, not when the first epoch's end writes it
            raise GpumlpError(f"--resume {folder}: {self.path(folders[0])} is a folder where the "
                              "run keeps a file; move it out of the run and resume")
        config = self.path("config.yaml")
        if config.exists() and not config.is_file():  # a pipe, a device: nothing gpumlp wrote
            raise GpumlpError(f"--resume {folder}: its config.yaml is not a plain file (a "
                              "pipe or a device), so not a run's; give the run directory of an "
                              "interrupted `gpumlp train`")
        if not config.is_file():
            if self.path("checkpoint.npz").is_file():  # a resume reads the run's config there
                raise GpumlpError(f"--resume {folder}: its checkpoint.npz is there but no "
                                  "config.yaml, which a resume reads the run's config from; put "
                                  f"the run's config.yaml back beside it{aside_note(folder)}")
            raise GpumlpError(f"--resume {folder}: no config.yaml there; give the run "
                              f"directory of an interrupted `gpumlp train`{aside_note(folder)}")
        broken = not_a_mapping(folder)
        if broken is not None:  # before read_yaml's error, which would call it the run's
            raise GpumlpError(f"--resume {folder}: no checkpoint.npz, and its config.yaml is not "
                              f"a run's (a run's is a YAML mapping of every key: this one "
                              f"{broken}); give the run directory of an interrupted `gpumlp "
                              "train`")
        if read_yaml(self.path("config.yaml")) == {}:  # gpumlp writes every key there
            raise GpumlpError(f"--resume {folder}: its config.yaml holds no config (a run's "
                              "holds every key); put it back as the run had it, or start a "
                              "new run")
        why = write_problem(folder)
        if why is not None:
            raise GpumlpError(f"--resume {folder}: cannot write there ({why}); make the folder "
                              "writable, or resume a copy of it")
        if self.path("checkpoint.npz").exists():
            return
        metrics = self.path("metrics.jsonl")
        done = [name for name in ("model.npz", "summary.json") if self.path(name).exists()]
        if metrics.is_file() and metrics.stat().st_size > 0:
            done.append("metrics.jsonl rows")
        if done:
            raise GpumlpError(f"--resume {folder}: holds a run ({', '.join(done)}) but no "
                              "checkpoint.npz, so there is nothing to resume; "
                              f"{start_over_in(folder)}")
        lacks = keys_lacking(folder)
        if lacks:
            more = f" and {len(lacks) - 1} more" if len(lacks) > 1 else ""
            raise GpumlpError(f"--resume {folder}: no checkpoint.npz, and its config.yaml is not "
                              f"a run's (a run's lists every key; it lacks '{lacks[0]}'{more}); "
                              "to train with that config: gpumlp train --config "
                              f"{shell_path(self.path('config.yaml'))}")

    def saved_init(self, config: Config) -> Params | None:
        """The `--init` weights this run started from (init.npz), or None for a random start;
        a CheckpointError when config.yaml says there were some and init.npz is gone."""
        if not self.path("init.npz").exists():
            if self.from_init():
                raise CheckpointError(
                    f"{self.path('init.npz')}: no such file, yet the run started from the "
                    "--init weights it held (config.yaml's first line says so) and has no "
                    "checkpoint to go on from; put it back, or "
                    f"{start_over_in(self.folder, init='FILE')}")
            return None
        try:
            return load_init(self.path("init.npz"), config.model.layer_widths,
                             config.train.dtype)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; it held the --init weights of the run, so "
                                  f"{start_over_in(self.folder, init='FILE')}") from None

    def saved_config(self) -> Config:
        """The config as the run's config.yaml says it (no --set)."""
        return build_config(self.path("config.yaml"), check_together=False)  # --set may fix it

    def differs(self, config: Config) -> bool:
        """Whether `config` differs from what config.yaml says (a resume with --set)."""
        return self.saved_config() != config

    def check_trainable(self, config: Config) -> Config:
        """The checks that read two keys, for a resume that trains on with config.yaml as it is
        (the CLI leaves them out then, so that a finished run saved before a check was added
        still writes its results again); with --set the CLI has made them, naming the source."""
        try:
            return checked_together(config)
        except KeyProblem as e:
            raise ConfigError(f"{self.path('config.yaml')}: {e}") from None

    def check_nothing_set(self, config: Config) -> None:
        """Refuse values a resume of a run with no step left would record but never use: from
        --set, or from config.yaml edited since the last checkpoint, which records the config
        its steps ran with (an older checkpoint does not: then only --set is seen). A lower
        train.epochs is used: it ends the run at the epochs done."""
        yaml, now = dotted_config(self.saved_config()), dotted_config(config)
        ran = self.trained_config if self.trained_config is not None else yaml
        changed = [key for key in ran if key != "train.epochs" and now.get(key) != ran[key]]
        if not changed:
            return
        by_set = any(now.get(key) != yaml.get(key) for key in changed)
        edited = any(yaml.get(key) != ran[key] for key in changed)
        source, fix = {(True, False): ("the --set values", "drop --set"),
                       (False, True): ("config.yaml's changes since then", "undo them"),
                       (True, True): ("the --set values and config.yaml's changes since then",
                                      "drop --set and undo the edits")}[by_set, edited]
        raise (ConfigError if by_set else GpumlpError)(
            f"--resume {self.folder}: the run has trained all {config.train.epochs} of its "
            f"epochs, so no step would use {source}: {', '.join(changes(ran, now, changed))}; "
            f"raise train.epochs to train on with them, or {fix}")

    def record_config(self, config: Config) -> None:
        """Rewrite config.yaml as `config` when its values differ (a resume with --set), so that
        the folder says what the run goes on with; an equal file is left as it is."""
        if self.differs(config):
            self.write_config(config, self.from_init())

    def last_good(self, config: Config) -> str:
        """Where the last good checkpoint is and how to go on with a tenth of the learning
        rate (and of a cosine floor above it), for the NaN error. (A weight decay that takes
        the whole weight a step never trains: checked_together refuses it.)"""
        path = self.path("checkpoint.npz")
        optim = config.optim
        lower = f"--set optim.lr={optim.lr / 10:g}"
        if optim.schedule == "cosine" and optim.min_lr > optim.lr / 10:
            lower += f" --set optim.min_lr={optim.min_lr / 10:g}"
        if path.exists():
            return (f"the last good checkpoint {path} is intact; to continue from it with a "
                    f"lower rate: gpumlp train --resume {shell_path(self.folder)} {lower}")
        return "no checkpoint was written yet; start over with a lower optim.lr"

    def save_checkpoint(self, state: "RunState", history: list[dict], config: Config) -> None:
        arrays = param_arrays(state.params)
        arrays.update({f"opt_m{i}": to_host(a) for i, a in enumerate(state.opt.m)})
        arrays.update({f"opt_v{i}": to_host(a) for i, a in enumerate(state.opt.v)})
        if state.opt.scale is not None:                      # the fast CPU step's velocity scale
            arrays["opt_scale"] = np.array(state.opt.scale, dtype=np.float64)
        pos = asdict(state.pos)
        perm = pos.pop("perm")
        if perm is not None:
            arrays["perm"] = np.asarray(perm, dtype=np.int64)
        meta = {"format": CHECKPOINT_FORMAT, "position": pos,
                "rng": json.loads(generator_state(state.rng)),
                "dev_rng": generator_state(state.dev_rng), "history": history,
                "fixed": fixed_keys(config), "config": dotted_config(config)}
        arrays["state"] = np.array(json.dumps(meta))
        path = self.path("checkpoint.npz")
        first = not path.exists()
        try:
            try:
                save_npz(path, arrays)
            except OSError as e:  # the replaced run's room first: --overwrite never needs
                if not (self.put_aside and e.errno in DISK_FULL):  # both
                    raise
                self.drop_replaced()
                save_npz(path, arrays)
            if self.put_aside:  # what this run replaces, not a folder of that name otherwise
                self.drop_replaced()
        except OSError as e:
            if first and self.folder.is_dir():  # nothing to resume: a new run's folder goes
                fix = write_fix(e, folder=self.folder)
                raise GpumlpError(f"cannot write {path} ({e.strerror or e}); no checkpoint was "
                                  f"written yet; {fix}, then run the same command again"
                                  ) from None
            raise self.write_failed(path, e, "the previous checkpoint is intact") from None

    def check_checkpoint_run(self, config: Config) -> None:
        """Refuse a `config` that changes a fixed key since the checkpoint (check_same_run),
        before data checks whose errors would name the key the change made wrong."""
        _, meta = read_checkpoint(self.path("checkpoint.npz"))
        check_same_run(meta.get("fixed", {}), config, self.folder)

    def load_checkpoint(self, config: Config, backend: Backend,
                        n_train: int) -> tuple["RunState", list[dict]]:
        """The state saved by the last checkpoint, checked against `config` and the size of the
        training set."""
        from .train import new_state

        source = str(self.path("checkpoint.npz"))
        arrays, meta = read_checkpoint(self.path("checkpoint.npz"))
        check_same_run(meta.get("fixed", {}), config, self.folder)  # older ones: not checked
        self.trained_config = meta.get("config")                    # older ones lack it
        state = new_state(config, backend)
        restore_params_and_optimizer(state, arrays, config, backend, source,
                                     fixed_checked="fixed" in meta)
        batches = -(-n_train // config.train.batch_size)
        state.pos, history = read_position(meta, arrays.get("perm"), n_train, batches, source)
        self.check_epochs(config, state.pos.epoch + (state.pos.batch > 0))
        restore_generators(state, meta, config, backend, source)
        atomic_write(self.path("metrics.jsonl"),
                     "".join(json.dumps(row) + "\n" for row in history).encode())
        return state, history

    def check_epochs(self, config: Config, begun: int) -> None:
        """Refuse a train.epochs below the epochs the run has trained or begun (a usage error
        when a --set gave it)."""
        if config.train.epochs < begun:
            by_set = self.saved_config().train.epochs != config.train.epochs
            raise (ConfigError if by_set else GpumlpError)(
                f"--resume {self.folder}: train.epochs is {config.train.epochs}, below the "
                f"{begun} epochs the run has trained or begun; give at least {begun}")

    def finish(self, params: Params, config: Config, summary: dict) -> None:
        """model.npz and summary.json, once the last epoch's checkpoint is written: a failure
        names the resume that writes them from it."""
        for path, write in ((self.path("model.npz"), lambda p: save_model(p, params, config)),
                            (self.path("summary.json"), lambda p: atomic_write(
                                p, (json.dumps(summary, indent=2) + "\n").encode()))):
            try:
                write(path)
            except OSError as e:
                raise self.write_failed(path, e, "the last epoch's checkpoint is intact (a "
                                        "resume writes the file from it)") from None
