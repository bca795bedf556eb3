"""Run folders through the CLI: --overwrite keeps an old run until the new one has its data and
state, --resume refuses what it cannot continue, default names never collide, and failures
(out of memory, a missing data folder) are one line that leaves nothing half-made."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from step_helpers import SignalsAt, WrappedStep, sigterm_at, unwrap_steps, wrap_steps
from test_cli import SMOKE, TINY, assert_one_error_line, cli

import gpumlp.train as train_module
from gpumlp import cli as cli_module
from gpumlp import npzio
from gpumlp.backend import CPU
from gpumlp.config import build_config
from gpumlp.errors import GpumlpError, shell_path
from gpumlp.export_onnx import PRODUCER_MARK
from gpumlp.npzio import load_npz
from gpumlp.report import FIGURES, PNG_MARK, PNG_SIGNATURE, REPORT_TITLE, sealed
from gpumlp.resume_state import resume_seed
from gpumlp.runfiles import (DERIVED_FILES, REPLACED, RunFiles, keys_lacking, lock_run,
                             resumable)
from gpumlp.train import train

HUGE = "model.hidden=1000000000000"  # 5.6 PiB of weights: beyond any address space


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def train_args(out, data_dir, *extra):
    return ["train", "--config", SMOKE, *TINY, "--set", "train.epochs=1", "--device", "cpu",
            "--out", out, "--data-dir", data_dir, "--quiet", *extra]


def resume_of(out, data_dir) -> str:
    """The resume command train prints for a run started with train_args: the --device and
    --data-dir it was given go on with it."""
    return f"gpumlp train --resume {shell_path(out)} --device cpu --data-dir {shell_path(data_dir)}"


@pytest.fixture
def finished(tiny_data_dir, tmp_path) -> Path:
    """A finished run, with a report's and an export's files beside it and a user's notes."""
    out = tmp_path / "run"
    assert cli(*train_args(out, tiny_data_dir)).exit_code == 0
    for name in DERIVED_FILES:                       # each marked as gpumlp report or export does
        made = b"made from the old model\n"
        (out / name).write_bytes({".png": PNG_SIGNATURE + PNG_MARK + made,
                                  ".md": sealed(REPORT_TITLE.encode() + made),
                                  ".onnx": b"\x08\x08" + PRODUCER_MARK + made}[
                                      Path(name).suffix])
    (out / "notes.txt").write_text("mine")
    return out


# --- --overwrite ------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, code, fragment", [
    (["--data-dir", "EMPTY"], 1, "none of the four MNIST files is there"),
    (["--set", "data.val_size=100000"], 2, "data.val_size"),
    (["--set", HUGE], 1, "out of memory"),
])
def test_overwrite_keeps_the_old_run_when_the_new_one_fails_early(finished, tiny_data_dir,
                                                                  tmp_path, extra, code, fragment):
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if a == "EMPTY" else a for a in extra]
    before = digests(finished)
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite", *extra))
    assert_one_error_line(result, code, fragment)
    assert digests(finished) == before
    resumed = cli("train", "--resume", finished, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output             # still the finished old run
    assert digests(finished) == before


def test_overwrite_removes_the_old_report_and_export_but_no_other_file(finished, tiny_data_dir):
    assert {*FIGURES.values(), "report.md", "model.onnx"} <= set(DERIVED_FILES)
    old_model = (finished / "model.npz").read_bytes()
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite", "--set", "train.seed=7"))
    assert result.exit_code == 0, result.output
    names = {p.name for p in finished.iterdir()}
    assert names.isdisjoint(DERIVED_FILES)
    assert (finished / "notes.txt").read_text() == "mine"
    assert (finished / "model.npz").read_bytes() != old_model


def test_a_refused_out_names_the_report_and_export_that_overwrite_would_remove_too(
        finished, tiny_data_dir):
    """Only the files that go with the run: a user's notes are not named, nor a report.md
    that is not the report's."""
    (finished / "report.md").write_text("MY OWN NOTES\n")
    before = digests(finished)
    result = cli(*train_args(finished, tiny_data_dir))
    figures = [name for name in DERIVED_FILES if name.endswith(".png")]
    assert_one_error_line(result, 1, f"summary.json; and {', '.join(figures)}, model.onnx, made "
                          "from it); pick another folder, or pass --overwrite to replace it "
                          "and what was made from it")
    assert "report.md" not in result.stderr and "notes.txt" not in result.stderr
    assert digests(finished) == before


def test_overwrite_says_which_report_and_export_files_it_removed(finished, tiny_data_dir):
    args = [a for a in train_args(finished, tiny_data_dir, "--overwrite") if a != "--quiet"]
    (finished / "model.onnx").unlink()
    result = cli(*args)
    assert result.exit_code == 0, result.output
    gone = [name for name in DERIVED_FILES if name != "model.onnx"]
    assert f"replacing the run there: removed its {', '.join(gone)} (made from the old model)\n" \
        in result.stderr
    result = cli(*args)                                 # a run without a report: nothing to say
    assert result.exit_code == 0, result.output
    assert "removed" not in result.stderr
    quiet = cli(*train_args(finished, tiny_data_dir, "--overwrite"))
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_overwrite_stopped_before_its_first_checkpoint_puts_the_old_run_back(
        finished, tiny_data_dir, monkeypatch):
    """RunFiles.start moves the old run aside: a new run stopped before its first checkpoint
    (a KeyboardInterrupt outside the stop flag's reach, which saves a checkpoint first; a
    bug's exception alike) has nothing to resume, and the run it was to replace comes back
    whole, its own config.yaml with it (so --resume never takes the old state under the new
    config), report included."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    before = digests(finished)
    monkeypatch.setattr(train_module, "train_epoch", stopped)
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite", "--set", "train.seed=7"))
    assert result.exit_code == 130
    assert digests(finished) == before and not (finished / REPLACED).exists()
    assert result.stderr == (f"put back what this run was to replace in {finished}, as it "
                             "was (this run ended before its first checkpoint)\ninterrupted\n")


@pytest.mark.parametrize("own", ["optim: {lr: 0.1}\n", "- a list, not a config\n",
                                 "{UNFINISHED\n"])
@pytest.mark.parametrize("ends", ["nan", "ctrl_c"])
@pytest.mark.parametrize("beside", [None, "metrics", "empty_aside"])
def test_overwrite_of_a_config_of_ones_own_that_ends_before_a_checkpoint_puts_it_back(
        tiny_data_dir, tmp_path, monkeypatch, own, ends, beside):
    """A folder with a config.yaml of one's own (a mapping lacking keys, or no YAML mapping;
    beside metrics.jsonl rows, or an empty REPLACED whose files were moved back by hand)
    replaced with --overwrite, by a run ending before its first checkpoint: the user's files
    were gone, replaced by the failed run's config.yaml and metrics.jsonl."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text(own)
    if beside == "metrics":
        (out / "metrics.jsonl").write_text('{"epoch": 1, "my": "notes"}\n')
    elif beside == "empty_aside":
        (out / REPLACED).mkdir()
    args = ["--set", "train.batch_size=250", "--set", "optim.lr=1e30"]
    if ends == "ctrl_c":          # at step 1 of 10, whose weights are too large to checkpoint
        args = ["--set", "train.batch_size=25"]
        wrap_steps(monkeypatch, lambda step: SignalsAt(TooLargeAboveLr(step, 1, above=0), 1))
    result = cli(*train_args(out, tiny_data_dir, "--overwrite", *args))
    assert result.exit_code == (1 if ends == "nan" else 130), result.output
    assert result.stderr.startswith(f"put back what this run was to replace in {out}, as it was")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.yaml", *["metrics.jsonl"] * (beside == "metrics")])
    assert (out / "config.yaml").read_text() == own
    if beside == "metrics":
        assert (out / "metrics.jsonl").read_text() == '{"epoch": 1, "my": "notes"}\n'
    unwrap_steps(monkeypatch)
    assert cli(*train_args(out, tiny_data_dir, "--overwrite")).exit_code == 0   # replaced
    assert not (out / REPLACED).exists() and "summary.json" in digests(out)


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_file_or_link_named_as_the_replaced_runs_folder_is_refused_in_one_line(
        tiny_data_dir, tmp_path, kind):
    """--overwrite over a folder holding a file named .gpumlp-replaced failed midway with
    "File exists", after the checks; through a link to a folder, the old run's files went
    over the files there, and stayed."""
    out, keep = tmp_path / "mine", tmp_path / "keep"
    out.mkdir()
    keep.mkdir()
    (out / "config.yaml").write_text("optim: {lr: 0.1}\n")
    (keep / "config.yaml").write_text("my notes\n")
    if kind == "file":
        (out / REPLACED).write_text("mine\n")
    else:
        (out / REPLACED).symlink_to(keep)
    result = cli(*train_args(out, tiny_data_dir, "--overwrite"))
    assert_one_error_line(result, 1, f"--out {out}: {out / REPLACED} is a file or a link where "
                          "gpumlp keeps a folder", "move it out of the run folder")
    assert (keep / "config.yaml").read_text() == "my notes\n"
    assert (out / "config.yaml").read_text() == "optim: {lr: 0.1}\n"


def test_overwrite_over_files_half_put_aside_keeps_both_halves(tiny_data_dir, tmp_path):
    """A config.yaml in .gpumlp-replaced (a start killed between its moves, or a user who
    moved back only some files) and metrics.jsonl rows beside it: the failed run wrote its
    empty metrics.jsonl over the rows, then said it had put everything back."""
    out = tmp_path / "mine"
    (out / REPLACED).mkdir(parents=True)
    (out / REPLACED / "config.yaml").write_text("optim: {lr: 0.1}\n")
    (out / "metrics.jsonl").write_text('{"epoch": 1, "mine": true}\n')
    result = cli(*train_args(out, tiny_data_dir, "--overwrite", "--set", "train.batch_size=250",
                             "--set", "optim.lr=1e30"))
    assert result.exit_code == 1 and result.stderr.startswith("put back what this run")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert (out / "config.yaml").read_text() == "optim: {lr: 0.1}\n"
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1, "mine": true}\n'


def test_a_resume_from_a_checkpoint_leaves_a_replaced_folder_it_did_not_make(tiny_data_dir,
                                                                             tmp_path):
    """Every checkpoint removed .gpumlp-replaced, also one that run had not put aside there
    (it is only this run's to remove when it replaces what is in it)."""
    out = tmp_path / "run"
    assert cli(*train_args(out, tiny_data_dir)).exit_code == 0
    (out / REPLACED).mkdir()
    (out / REPLACED / "config.yaml").write_text("mine\n")
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q",
                 "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert (out / REPLACED / "config.yaml").read_text() == "mine\n"


def test_an_empty_replaced_folder_is_no_run(tiny_data_dir, tmp_path):
    """An empty .gpumlp-replaced (its files moved back by hand, as its note says) was called a
    run to refuse or to move back."""
    out = tmp_path / "run"
    (out / REPLACED).mkdir(parents=True)
    result = cli(*train_args(out, tiny_data_dir))
    assert result.exit_code == 0, result.output
    assert not (out / REPLACED).exists()            # gone with the first checkpoint's clean-up
    finished = cli(*train_args(out, tiny_data_dir))
    assert "holds the run an --overwrite killed" not in finished.stderr
    (out / REPLACED).mkdir()
    assert ".gpumlp-replaced" not in cli(*train_args(out, tiny_data_dir)).stderr


def test_a_resume_that_starts_its_run_over_puts_nothing_aside(tiny_data_dir, tmp_path):
    """A run killed after its config.yaml but before its metrics.jsonl, resumed and failing:
    its own files were put aside as if replaced, and 'put back' was said."""
    out = tmp_path / "run"
    assert cli(*train_args(out, tiny_data_dir)).exit_code == 0
    for name in ("checkpoint.npz", "model.npz", "summary.json", "metrics.jsonl"):
        (out / name).unlink()
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q",
                 "--set", "optim.lr=1e30")
    assert result.exit_code == 1, result.output
    assert "put back" not in result.stderr and not (out / REPLACED).exists()
    assert (out / "config.yaml").is_file()          # the run's, to start over again


def test_the_note_on_files_a_killed_overwrite_put_aside_says_whose_they_are(tiny_data_dir,
                                                                            tmp_path):
    """A config of one's own, put aside by an --overwrite killed before its first checkpoint
    (its config.yaml and empty metrics.jsonl in the folder), is not called a run."""
    out = tmp_path / "mine"
    (out / REPLACED).mkdir(parents=True)
    (out / REPLACED / "config.yaml").write_text("optim: {lr: 0.1}\n")
    assert cli(*train_args(tmp_path / "run", tiny_data_dir)).exit_code == 0
    shutil.copy(tmp_path / "run" / "config.yaml", out / "config.yaml")
    (out / "metrics.jsonl").write_text("")
    result = cli(*train_args(out, tiny_data_dir))
    assert_one_error_line(result, 1, f"; {out / REPLACED} holds the files (a config of one's "
                          "own) an --overwrite killed before its first checkpoint was replacing")


def test_overwrite_that_fails_with_nan_in_epoch_1_puts_the_old_run_back(finished,
                                                                        tiny_data_dir):
    """--overwrite with a rate that blows up in the first epoch: the NaN error, and the old
    run (its checkpoint, model, summary, metrics, config, report and export) as it was. It
    was removed as the new run started."""
    before = digests(finished)
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite", "--set",
                             "train.batch_size=250", "--set", "optim.lr=1e30"))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("put back what this run was to replace") and len(lines) == 2
    assert lines[1].startswith("Error: the evaluation loss became NaN or infinite")
    assert digests(finished) == before and not (finished / REPLACED).exists()


def test_overwrite_keeps_the_old_run_aside_until_the_first_checkpoint_then_removes_it(
        finished, tiny_data_dir, monkeypatch):
    """While the new run's first epoch runs, the old run's files are in REPLACED, not in the
    folder (where --resume or a report would take them); its first checkpoint removes them."""
    old = digests(finished)
    seen = []
    train_epoch = train_module.train_epoch

    def looking(*args, **kwargs):
        seen.append((digests(finished / REPLACED), sorted(p.name for p in finished.iterdir())))
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", looking)
    assert cli(*train_args(finished, tiny_data_dir, "--overwrite")).exit_code == 0
    aside, names = seen[0]
    assert aside == {name: old[name] for name in aside}
    assert set(aside) == set(old) - {"notes.txt"} and "checkpoint.npz" in aside
    assert set(names) == {"config.yaml", "metrics.jsonl", "notes.txt", REPLACED}
    assert not (finished / REPLACED).exists()
    assert digests(finished)["checkpoint.npz"] != old["checkpoint.npz"]


def test_a_replacing_run_killed_before_its_first_checkpoint_leaves_the_old_run_aside(
        finished, tiny_data_dir, tmp_path):
    """SIGKILL during an overwriting run's first epoch leaves its config.yaml and the old run
    in REPLACED: a plain train there is refused (the old run is still a run), an overwriting
    one that fails puts that old run back, one that succeeds removes it. A REPLACED alone
    (killed between the moves and the new config.yaml) is a run too, not one 'inside'."""
    before = digests(finished)
    aside = finished / REPLACED
    aside.mkdir()
    for name in before:
        if name != "notes.txt":
            (finished / name).rename(aside / name)
    (finished / "config.yaml").write_text((aside / "config.yaml").read_text())
    (finished / "metrics.jsonl").write_text("")
    refused = cli(*train_args(finished, tiny_data_dir))
    assert_one_error_line(refused, 1, "already holds a run (config.yaml, metrics.jsonl)")
    assert refused.stderr.rstrip().endswith(
        f"; {aside} holds the run an --overwrite killed before its first checkpoint was "
        "replacing: move its files back into the folder to keep it")
    no_report = cli("report", finished, "--data-dir", tiny_data_dir)  # says where the old is
    assert_one_error_line(no_report, 1, "no epoch finished yet")
    assert no_report.stderr.rstrip().endswith(refused.stderr.rstrip()[-150:])
    failed = cli(*train_args(finished, tiny_data_dir, "--overwrite", "--set",
                             "train.batch_size=250", "--set", "optim.lr=1e30"))
    assert failed.exit_code == 1 and "put back what this run" in failed.stderr
    assert digests(finished) == before and not aside.exists()
    only_aside = tmp_path / "only"
    (only_aside / REPLACED).mkdir(parents=True)
    for name in before:
        if name != "notes.txt":
            shutil.copyfile(finished / name, only_aside / REPLACED / name)
    refused = cli(*train_args(only_aside, tiny_data_dir))
    assert_one_error_line(refused, 1, f"already holds a run ({REPLACED}/)")
    assert "--resume" not in refused.stderr                # no config.yaml: nothing to resume
    assert cli(*train_args(only_aside, tiny_data_dir, "--overwrite")).exit_code == 0
    assert not (only_aside / REPLACED).exists() and (only_aside / "model.npz").is_file()


def test_a_replacing_run_killed_during_its_moves_is_finished_not_lost(finished,
                                                                      tiny_data_dir):
    """SIGKILL while RunFiles.start moved the old run aside (config.yaml and metrics.jsonl
    moved, the checkpoint, model and the rest not yet): the next --overwrite finishes the
    moves rather than removing what was moved, so a failing run still puts all of it back."""
    before = digests(finished)
    aside = finished / REPLACED
    aside.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (finished / name).rename(aside / name)
    failed = cli(*train_args(finished, tiny_data_dir, "--overwrite", "--set",
                             "train.batch_size=250", "--set", "optim.lr=1e30"))
    assert failed.exit_code == 1 and "put back what this run" in failed.stderr
    assert digests(finished) == before and not aside.exists()


def test_a_full_disk_at_the_first_checkpoint_takes_the_replaced_runs_room(
        finished, tiny_data_dir, monkeypatch):
    """The old run stays on disk until the new run's first checkpoint: on a disk too full for
    both, that checkpoint failed where --overwrite had succeeded before. Its room is given
    up first, and the checkpoint written."""
    from gpumlp import runfiles

    real_save, failures = runfiles.save_npz, []

    def full_while_aside(path, arrays):
        if (finished / REPLACED).exists():
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, arrays)

    monkeypatch.setattr(runfiles, "save_npz", full_while_aside)
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert len(failures) == 1 and not (finished / REPLACED).exists()
    assert (finished / "model.npz").is_file() and (finished / "checkpoint.npz").is_file()


def test_a_stop_in_the_first_epoch_of_a_replacing_run_keeps_the_new_run(
        finished, tiny_data_dir, monkeypatch):
    """Ctrl-C or SIGTERM during training saves a checkpoint (the run can be resumed): from
    then on the folder's run is the new one, and the run it replaced is gone, as after any
    checkpoint (decisions.md)."""
    wrap_steps(monkeypatch, sigterm_at(2))
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite", "--set",
                             "train.batch_size=25"))
    assert result.exit_code == 143
    assert "checkpoint saved. Resume with" in result.stderr
    assert "put back" not in result.stderr and not (finished / REPLACED).exists()
    assert (finished / "checkpoint.npz").is_file() and not (finished / "model.npz").exists()


def test_overwrite_keeps_files_under_a_reports_names_that_are_not_a_report(finished,
                                                                          tiny_data_dir):
    """A user's own report.md (no report title) and a .png that is not a PNG are not gpumlp's:
    --overwrite removed them with the old run's own report."""
    (finished / "report.md").write_text("MY OWN NOTES\n")
    (finished / "learning_curves.png").write_bytes(b"not a png")
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert result.stderr == (f"Warning: kept learning_curves.png, report.md in {finished}: not "
                             "marked as made by gpumlp report (another program's, an older "
                             "gpumlp's, or changed since), so not removed with the run it "
                             "replaced (it may describe that run); remove them, or make the "
                             "report again when this run ends: gpumlp report "
                             f"{shell_path(finished)} --overwrite\n")  # silent, pre-seal report
    assert (finished / "report.md").read_text() == "MY OWN NOTES\n"
    assert (finished / "learning_curves.png").read_bytes() == b"not a png"
    assert not (finished / "model.onnx").exists()                       # the old run's own
    assert not (finished / "confusion_matrix.png").exists()


def test_overwrite_keeps_a_model_onnx_that_gpumlp_export_did_not_write(finished, tiny_data_dir):
    """A user's own model.onnx (any file but one whose ONNX producer is gpumlp) was said to be
    'made from' the old run, and --overwrite removed it."""
    (finished / "model.onnx").write_text("my own onnx\n")
    refused = cli(*train_args(finished, tiny_data_dir))
    assert refused.exit_code == 1 and "model.onnx" not in refused.stderr
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert result.stderr == (f"Warning: kept model.onnx in {finished}: not marked as made by "
                             "gpumlp export (another program's, an older gpumlp's, or changed "
                             "since), so not removed with the run it replaced (it may describe "
                             "that run); remove it, or export the new model "
                             "when this run ends: gpumlp export "
                             f"{shell_path(finished / 'model.npz')} --overwrite\n")
    assert (finished / "model.onnx").read_text() == "my own onnx\n"
    assert not (finished / "report.md").exists()                     # the old run's own
    (finished / "report.md").write_text("MY OWN NOTES\n")
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite"))
    assert result.stderr.startswith(f"Warning: kept report.md, model.onnx in {finished}: not "
                                    "marked as made by gpumlp report or gpumlp export (another "
                                    "program's, an older gpumlp's, or changed since)")
    assert result.stderr.endswith(f"remove them, or make the report again when this run ends: "
                                  f"gpumlp report {shell_path(finished)} --overwrite; or export "
                                  "the new model when this run ends: gpumlp export "
                                  f"{shell_path(finished / 'model.npz')} --overwrite\n")


def test_an_out_holding_other_runs_is_refused_so_that_no_run_lies_among_them(finished,
                                                                            tiny_data_dir):
    """`--out runs` for `--out runs/NAME`: the run's files would have been scattered among the
    other runs' folders (and a later --overwrite there would act on them all)."""
    parent = finished.parent
    (parent / "notes").mkdir()                                      # not a run: no reason
    before = sorted(p.name for p in parent.iterdir())
    result = cli(*train_args(parent, tiny_data_dir))
    assert_one_error_line(result, 1, f"--out {parent}: holds other runs (run/), and a run's files "
                          "would lie among them; give this run a folder of its own, such as "
                          f"{shell_path(parent / 'NAME')}")
    assert sorted(p.name for p in parent.iterdir()) == before
    other = parent / "other"
    (other / "notes").mkdir(parents=True)
    (other / "notes" / "config.yaml").write_text("mine")            # a config alone: no run
    assert cli(*train_args(other, tiny_data_dir)).exit_code == 0


def test_a_fresh_out_with_a_folder_at_a_run_files_name_is_told_so_not_to_overwrite(
        tiny_data_dir, tmp_path):
    out = tmp_path / "new"
    (out / "metrics.jsonl").mkdir(parents=True)
    result = cli(*train_args(out, tiny_data_dir))
    assert_one_error_line(result, 1, f"--out {out}: {out / 'metrics.jsonl'} is a folder where "
                          "gpumlp keeps a file; move it out of the run folder")
    assert "--overwrite" not in result.stderr


@pytest.mark.parametrize("name", ["model.onnx", "init.npz", "summary.json"])
def test_overwrite_with_a_folder_where_the_run_keeps_a_file_is_refused_before_any_removal(
        finished, tiny_data_dir, name):
    (finished / name).unlink(missing_ok=True)
    (finished / name).mkdir()
    before = digests(finished)
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite"))
    assert_one_error_line(result, 1, f"--out {finished}: {finished / name} is a folder where "
                          "gpumlp keeps a file; move it out of the run folder, or pick another")
    assert digests(finished) == before and (finished / name).is_dir()


# --- out of memory ----------------------------------------------------------------------------

def test_out_of_memory_is_one_line_and_leaves_no_folder(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_data_dir, "--set", HUGE))
    assert_one_error_line(result, 1, "out of memory", "lower train.eval_batch_size (a resume "
                          "may change it with --set), model.hidden or train.batch_size")
    assert not out.exists()
    assert cli(*train_args(out, tiny_data_dir)).exit_code == 0   # nothing blocks a rerun


def test_a_bug_before_the_first_checkpoint_leaves_no_half_made_run(tiny_data_dir, tmp_path,
                                                                   monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("a bug, not one of gpumlp's errors")

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(train_module, "train_epoch", bug)
        result = CliRunner().invoke(cli_module.main,
                                    [str(a) for a in train_args(out, tiny_data_dir)])
    assert isinstance(result.exception, ValueError)      # a traceback: it is a bug
    assert not out.exists()                              # but no run that blocks a rerun
    result = cli(*train_args(out, tiny_data_dir))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("existing", [False, True])
def test_out_of_memory_after_config_yaml_removes_only_what_the_run_made(tiny_data_dir, tmp_path,
                                                                        monkeypatch, existing):
    def no_memory(*args, **kwargs):
        raise MemoryError("Out of memory allocating 1,024 bytes")

    monkeypatch.setattr(train_module, "train_epoch", no_memory)  # before the first checkpoint
    out = tmp_path / "run"
    if existing:
        out.mkdir()
    result = cli(*train_args(out, tiny_data_dir))
    assert_one_error_line(result, 1, "out of memory (Out of memory allocating 1,024 bytes)")
    assert out.is_dir() == existing                # the user's own (empty) folder is kept
    assert not existing or list(out.iterdir()) == []


# --- --resume ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [["model.npz", "summary.json"], ["summary.json"], []])
def test_resume_refuses_a_finished_run_whose_checkpoint_is_gone(finished, tiny_data_dir, keep):
    (finished / "checkpoint.npz").unlink()
    for name in {"model.npz", "summary.json"} - set(keep):
        (finished / name).unlink()
    before = digests(finished)
    result = cli("train", "--resume", finished, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, "no checkpoint.npz", "nothing to resume", "--overwrite")
    assert digests(finished) == before
    config = (finished / "config.yaml").read_text()        # the advice trains the run's config,
    advised = shlex.split(result.stderr.split("start the run over: gpumlp ")[1])
    assert advised[:2] == ["train", "--config"]               # not the built-in defaults
    assert cli(*advised, "--data-dir", tiny_data_dir, "--device", "cpu", "-q").exit_code == 0
    assert (finished / "config.yaml").read_text() == config


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(tiny_data_dir,
                                                                           tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(out, tiny_data_dir)).exit_code == 0
    reference = (out / "model.npz").read_bytes()
    for name in ("checkpoint.npz", "model.npz", "summary.json"):
        (out / name).unlink()
    (out / "metrics.jsonl").write_bytes(b"")                  # as left by an early kill
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (out / "model.npz").read_bytes() == reference


class Killed(BaseException):
    """What SIGKILL does to a run: it stops where it is, and no handler of the CLI runs."""


@pytest.mark.parametrize("where", ["load_mnist_for", "train_epoch"])
def test_a_run_from_init_killed_before_its_first_checkpoint_resumes_from_the_same_weights(
        finished, tiny_data_dir, tmp_path, monkeypatch, where):
    init = finished / "model.npz"                 # trained weights, far from a fresh He draw
    whole, out = tmp_path / "whole", tmp_path / "killed"
    assert cli(*train_args(whole, tiny_data_dir, "--init", init)).exit_code == 0

    def kill(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:              # killed before the data, or the first step
        m.setattr(cli_module if where == "load_mnist_for" else train_module, where, kill)
        with pytest.raises(Killed):
            CliRunner().invoke(cli_module.main, [str(a) for a in train_args(
                out, tiny_data_dir, "--init", init)])
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "init.npz", "metrics.jsonl"]
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (out / "model.npz").read_bytes() == (whole / "model.npz").read_bytes()


def test_init_npz_is_removed_by_a_run_without_init_and_by_a_failed_start(finished, tiny_data_dir,
                                                                         tmp_path):
    init, out = finished / "model.npz", tmp_path / "from-init"
    assert cli(*train_args(out, tiny_data_dir, "--init", init)).exit_code == 0
    saved = load_npz(out / "init.npz")
    assert all((saved[k] == v).all() for k, v in load_npz(init).items() if k != "config")
    result = cli(*train_args(out, tiny_data_dir, "--init", init))
    assert_one_error_line(result, 1, "already holds a run", "init.npz")
    assert cli(*train_args(out, tiny_data_dir, "--overwrite")).exit_code == 0
    assert not (out / "init.npz").exists()        # a resume would otherwise start from it

    (tmp_path / "empty").mkdir()
    failed = tmp_path / "failed"
    result = cli(*train_args(failed, tiny_data_dir, "--init", init, "--data-dir",
                             tmp_path / "empty"))
    assert_one_error_line(result, 1, "none of the four MNIST files is there")
    assert not failed.exists()                    # init.npz went with the config.yaml it preceded


def test_resume_says_what_to_do_when_init_npz_is_damaged(finished, tiny_data_dir, tmp_path):
    out = tmp_path / "from-init"
    assert cli(*train_args(out, tiny_data_dir, "--init", finished / "model.npz")).exit_code == 0
    for name in ("checkpoint.npz", "model.npz", "summary.json"):
        (out / name).unlink()
    (out / "metrics.jsonl").write_bytes(b"")                  # as left by an early kill
    (out / "init.npz").write_bytes((out / "init.npz").read_bytes()[:1000])
    before = digests(out)
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, f"{out / 'init.npz'}: not a readable .npz",
                          f"--init FILE --out {shell_path(out)} --overwrite (FILE: the weights "
                          "it started")
    assert digests(out) == before
    assert_advice_starts_over_from(result, finished / "model.npz", out, tiny_data_dir)


def assert_advice_starts_over_from(result, weights, out, tiny_data_dir):
    """The advised command, FILE being `weights`, trains the run's config from them."""
    config = (out / "config.yaml").read_text()
    advised = shlex.split(result.stderr.split("start the run over: gpumlp ")[1].split(" (")[0])
    advised = [str(weights) if word == "FILE" else word for word in advised]
    assert cli(*advised, "--data-dir", tiny_data_dir, "--device", "cpu", "-q").exit_code == 0
    assert (out / "config.yaml").read_text() == config
    assert np.load(out / "init.npz")["W1"].tobytes() == np.load(weights)["W1"].tobytes()


def test_resume_refuses_a_run_from_init_whose_init_npz_is_gone(finished, tiny_data_dir,
                                                                tmp_path):
    """Killed before its first checkpoint, then init.npz deleted: the resume trained from a
    random start, silently another run than the one --init began. config.yaml's first line
    now says the run needs it, also once a resume with --set has rewritten config.yaml."""
    out = tmp_path / "from-init"
    assert cli(*train_args(out, tiny_data_dir, "--init", finished / "model.npz")).exit_code == 0
    for name in ("checkpoint.npz", "model.npz", "summary.json"):
        (out / name).unlink()
    (out / "metrics.jsonl").write_bytes(b"")                  # as left by an early kill
    saved = (out / "init.npz").read_bytes()
    resume = ["train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu"]
    with pytest.MonkeyPatch.context() as m:                   # killed again, after --set
        m.setattr(train_module, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(Killed))
        with pytest.raises(Killed):
            CliRunner().invoke(cli_module.main, [str(a) for a in [*resume, "--set",
                                                                  "optim.lr=0.05"]])
    assert "lr: 0.05" in (out / "config.yaml").read_text()   # rewritten, still marked
    (out / "init.npz").unlink()
    before = digests(out)
    result = cli(*resume)
    assert_one_error_line(result, 1, f"{out / 'init.npz'}: no such file, yet the run started "
                          "from the --init weights it held",
                          f"--init FILE --out {shell_path(out)} --overwrite (FILE: the weights "
                          "it started")
    assert digests(out) == before
    (out / "init.npz").write_bytes(saved)                     # put back: it resumes
    assert cli(*resume).exit_code == 0
    plain = tmp_path / "plain"                                # no --init: nothing needed
    assert cli(*train_args(plain, tiny_data_dir)).exit_code == 0
    assert not (plain / "config.yaml").read_text().startswith("#")


class PoisonedAboveLr(WrappedStep):
    """The run's step, whose update at step `at` makes the weights NaN when lr > `above`."""

    def __init__(self, step, at: int, above: float):
        super().__init__(step, at)
        self.above = above

    def __call__(self, params, state, X, y, lr, t, masks):
        out = self.step(params, state, X, y, lr, t, masks)
        if t == self.at and lr > self.above:
            params.W[-1][...] = np.nan
        return out


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("weight_decay", ["1e300", "40", "10", "15"])
def test_a_weight_decay_that_takes_the_whole_weight_is_refused_before_training(
        tiny_data_dir, tmp_path, name, weight_decay):
    """lr 0.1 and weight_decay 10 or more: each step's decay takes the whole weight or more.
    Only a blow-up said so, after training; below it (plain SGD up to lr * wd = 2, momentum
    SGD to 3.8, AdamW at 2) the run trained to chance and exited 0. Adam's L2 goes through
    its normalisation: not refused."""
    out = tmp_path / "run"
    options = ["--set", f"optim.name={name}", "--set", "optim.lr=0.1",
               "--set", "train.batch_size=25"]
    result = cli(*train_args(out, tiny_data_dir, *options,
                             "--set", f"optim.weight_decay={weight_decay}"))
    decay = f"{0.1 * float(weight_decay):g}"
    assert_one_error_line(result, 2, f"config key 'optim.weight_decay' ({float(weight_decay):g}) "
                          f"times optim.lr (0.1) is {decay}: each step's decay alone would take "
                          "the whole weight or more", "give optim.weight_decay well below 10")
    assert not out.exists()
    again = cli(*train_args(out, tiny_data_dir, *options, "--set", "optim.weight_decay=0.5"))
    assert again.exit_code == 0, again.output


def test_adams_weight_decay_is_not_held_to_the_whole_weight_rule(tiny_data_dir, tmp_path):
    options = ["--set", "optim.name=adam", "--set", "optim.lr=0.1", "--set",
               "optim.weight_decay=10", "--set", "train.batch_size=25"]
    result = cli(*train_args(tmp_path / "run", tiny_data_dir, *options))
    assert "whole weight" not in result.output


def test_after_a_nan_lowering_optim_lr_in_config_yaml_and_resuming_goes_on(tiny_data_dir,
                                                                           tmp_path, monkeypatch):
    wrap_steps(monkeypatch, lambda step: PoisonedAboveLr(step, at=4, above=0.15))
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_data_dir, "--set", "optim.lr=0.2", "--set",
                             "train.batch_size=25", "--set", "train.checkpoint_every=2"))
    how = (f"the last good checkpoint {out / 'checkpoint.npz'} is intact; to continue from it "
           f"with a lower rate: {resume_of(out, tiny_data_dir)} --set optim.lr=0.02")
    assert_one_error_line(result, 1, "NaN or infinite", "by step 4", how)
    assert '"step": 2' in str(load_npz(out / "checkpoint.npz")["state"])
    resume = ["train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q"]
    assert_one_error_line(cli(*resume), 1, "by step 4", how)      # unchanged, it fails again
    result = cli(*resume, "--set", "optim.lr=0.02")                # the command it advises
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    assert np.isfinite(load_npz(out / "model.npz")["W2"]).all()
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.02  # recorded


class TooLargeAboveLr(PoisonedAboveLr):
    """The run's step, whose update at step `at` spoils the weights when lr > `above`: they
    stay finite, but every weight times 1e30 gives NaN losses, and a last bias of 1e4 on
    class 0 a loss near 1e4 for every other digit."""

    def __init__(self, step, at: int, above: float, spoil: str = "scale"):
        super().__init__(step, at, above)
        self.spoil = spoil

    def __call__(self, params, state, X, y, lr, t, masks):
        out = self.step(params, state, X, y, lr, t, masks)
        if t == self.at and lr > self.above:
            if self.spoil == "scale":
                for W in params.W:
                    W *= 1e30
            else:
                params.b[-1][0] = 1e4
        return out


def test_after_a_nan_with_a_cosine_floor_the_advice_lowers_the_floor_too_and_goes_on(
        tiny_data_dir, tmp_path, monkeypatch):
    wrap_steps(monkeypatch, lambda step: PoisonedAboveLr(step, at=4, above=0.15))
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_data_dir, "--set", "optim.lr=0.2", "--set",
                             "optim.schedule=cosine", "--set", "optim.min_lr=0.1", "--set",
                             "train.batch_size=25", "--set", "train.checkpoint_every=2"))
    advice = f"{resume_of(out, tiny_data_dir)} --set optim.lr=0.02 --set optim.min_lr=0.01"
    assert_one_error_line(result, 1, "NaN or infinite", advice)
    result = cli(*shlex.split(advice)[1:], "-q")          # as printed: the same data and device
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("at, every, spoil, fragment, saved", [
    (20, 0, "scale", ("the evaluation loss became NaN or infinite at the end of epoch 2 (step "
                      "20: val_loss nan, test_loss nan)"), 10),
    (20, 0, "bias", ("the evaluation loss rose above 230 at the end of epoch 2 (step 20: "
                     "val_loss "), 10),
    (6, 3, "scale", "the loss became NaN or infinite at epoch 1, step 7", 3),
], ids=["epoch_end", "epoch_end_finite", "mid_epoch"])
def test_weights_too_large_to_use_are_not_saved_so_a_lower_lr_resumes(tiny_data_dir, tmp_path,
                                                                      monkeypatch, at, every,
                                                                      spoil, fragment, saved):
    """Weights that are finite but give a NaN loss, or one above 230 (100 ln 10), are refused
    before their checkpoint and metrics row, at an epoch's end as mid-epoch (there the
    checkpoint is skipped with a warning, and the next step's NaN loss ends the run): from the
    last good checkpoint, the advice (a lower optim.lr) goes on."""
    wrap_steps(monkeypatch, lambda step: TooLargeAboveLr(step, at=at, above=0.15,
                                                   spoil=spoil))
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_data_dir, "--set", "optim.lr=0.2", "--set",
                             "train.batch_size=25", "--set", f"train.checkpoint_every={every}",
                             "--set", "train.epochs=2"))
    how = (f"the last good checkpoint {out / 'checkpoint.npz'} is intact; to continue from it "
           f"with a lower rate: {resume_of(out, tiny_data_dir)} --set optim.lr=0.02")
    if every:
        assert result.exit_code == 1 and result.stdout == "", result.output
        warning, error = result.stderr.splitlines()
        assert warning.startswith("Warning: skipped the checkpoint at step 6: its weights were "
                                  "too large to go on from (their loss on the first 100 "
                                  "training examples was NaN or infinite)")
        assert error.startswith(f"Error: {fragment}") and error.endswith(how)
    else:
        assert_one_error_line(result, 1, fragment, "the weights are finite but too large", how)
    checkpoint = load_npz(out / "checkpoint.npz")
    assert f'"step": {saved},' in str(checkpoint["state"])
    assert np.abs(checkpoint["W1"]).max() < 10
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == saved // 10 and "NaN" not in "".join(rows)
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["optim"]["lr"] = 0.1
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 20
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(np.isfinite([row["val_loss"], row["test_loss"]]).all() for row in rows)


def test_a_stop_in_a_spike_keeps_the_epoch_ends_checkpoint_also_after_a_resume(
        tiny_data_dir, tmp_path, monkeypatch):
    """Ctrl-C at step 14 of 20 (epoch 2), whose weights are too large to checkpoint, with no
    mid-epoch checkpoints: the last good checkpoint is epoch 1's end (step 10), in the run and
    again in the run resumed from it; neither is "no checkpoint written yet"."""
    out = tmp_path / "run"
    spike = lambda step: SignalsAt(TooLargeAboveLr(step, 14, above=0), 14)  # noqa: E731
    args = train_args(out, tiny_data_dir, "--set", "train.batch_size=25", "--set",
                      "train.epochs=2")
    resume = ["train", "--resume", out, "--device", "cpu", "--data-dir", tiny_data_dir, "-q"]
    for command in (args, resume):
        wrap_steps(monkeypatch, spike)
        result = cli(*command)
        assert result.exit_code == 130, result.output
        assert result.stderr.startswith("interrupted after step 14, whose weights were too "
                                        "large to checkpoint"), result.stderr
        assert "so the last good checkpoint (step 10) is kept. Resume with: " in result.stderr
        assert '"step": 10,' in str(load_npz(out / "checkpoint.npz")["state"])
        unwrap_steps(monkeypatch)


def test_a_learning_rate_that_blows_up_in_epoch_1_leaves_no_run_and_says_what_works(
        tiny_data_dir, tmp_path):
    """The newcomer's case: lr 1e30 leaves weights near 1e28 after one step, finite but
    useless; nothing is saved, and starting over with a lower optim.lr, as told, works."""
    out = tmp_path / "run"
    args = train_args(out, tiny_data_dir, "--set", "train.batch_size=250", "--set",
                      "train.epochs=3")
    result = cli(*args, "--set", "optim.lr=1e30")
    assert_one_error_line(result, 1, "the evaluation loss became NaN or infinite at the end of "
                          "epoch 1 (step 1", "no checkpoint was written yet; start over with "
                          "a lower optim.lr")
    assert not out.exists()
    assert cli(*args, "--set", "optim.lr=0.1").exit_code == 0


@pytest.mark.parametrize("args, fragment", [
    (["--resume", "RUN", "--overwrite"], "drop --overwrite, or start the run over: gpumlp "
                                         "train --config RUN/config.yaml --out RUN --overwrite"),
    (["--resume", "RUN", "--out", ""], "drop --config, --seed, --init and --out"),
    (["--resume", ""], "'--resume': is empty; give a run's folder"),
    (["--config", SMOKE, "--overwrite"], "--overwrite replaces the run in --out; give --out DIR"),
    (["--config", SMOKE, "--out", ""], "--out is empty; give the run's folder, or drop --out"),
    (["--resume", "RUN", "--config", ""], "drop --config, --seed, --init and --out"),
    (["--resume", "RUN", "--init", ""], "drop --config, --seed, --init and --out"),
    (["--resume", "RUN", "--init", "RUN"], "drop --config, --seed, --init and --out"),
    (["--config", SMOKE, "--init", ""], "--init is empty; give a model.npz to start from"),
])
def test_resume_with_overwrite_and_empty_paths_are_usage_errors(finished, tiny_data_dir,
                                                                 tmp_path, monkeypatch, args,
                                                                 fragment):
    monkeypatch.chdir(tmp_path)
    before = digests(finished)
    args = [finished if a == "RUN" else a for a in args]
    result = cli("train", *args, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 2, fragment.replace("RUN", shell_path(finished)))
    if args == ["--resume", finished, "--overwrite"]:     # no run there: nothing to start over
        result = cli("train", "--resume", tmp_path / "none", "--overwrite")
        assert result.stderr.rstrip().endswith("never replaces it; drop --overwrite")
        (tmp_path / "mine").mkdir()                         # nor in a config of one's own
        (tmp_path / "mine" / "config.yaml").write_text("model: {hidden: 8}\n")
        result = cli("train", "--resume", tmp_path / "mine", "--overwrite")
        assert result.stderr.rstrip().endswith("never replaces it; drop --overwrite")
    assert digests(finished) == before
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how", ["interrupted", "finished"])
def test_a_resumed_runs_summary_gives_the_last_epochs_validation_numbers(
        tiny_data_dir, tmp_path, monkeypatch, how):
    """summary.json and the final line of a resumed run (stopped in its second epoch, or
    finished and resumed to write its results again from the checkpoint's rows) have the last
    epoch's val_accuracy and val_loss, as metrics.jsonl has them."""
    out = tmp_path / "run"
    if how == "interrupted":
        wrap_steps(monkeypatch, sigterm_at(4))
    first = cli(*train_args(out, tiny_data_dir, "--set", "train.epochs=2"))
    assert first.exit_code == (143 if how == "interrupted" else 0), first.output
    unwrap_steps(monkeypatch)
    for name in ("model.npz", "summary.json"):
        (out / name).unlink(missing_ok=True)
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert last["epoch"] == 2 and summary["steps"] == 6
    assert (summary["val_accuracy"], summary["val_loss"]) == (last["val_accuracy"],
                                                              last["val_loss"])
    assert result.stdout.startswith(f"val_accuracy {last['val_accuracy']:.4f}  val_loss "
                                    f"{last['val_loss']:.4f}  test_accuracy ")


class MovesTheFolderAt(WrappedStep):
    """The run's step, which moves the run's folder away at step `at` (a user's `mv`)."""

    def __init__(self, step, at: int, folder: Path):
        super().__init__(step, at)
        self.folder = folder

    def __call__(self, params, state, X, y, lr, t, masks):
        if t == self.at:
            self.folder.rename(self.folder.with_name("moved"))
        return self.step(params, state, X, y, lr, t, masks)


def test_the_resume_advice_for_a_folder_moved_away_carries_the_options_typed_too(
        tiny_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    wrap_steps(monkeypatch, lambda step: MovesTheFolderAt(step, at=2, folder=out))
    result = cli(*train_args(out, tiny_data_dir, "--set", "train.batch_size=25", "--set",
                             "train.checkpoint_every=4"))
    assert_one_error_line(result, 1, "the run folder is gone", "resume it there with gpumlp "
                          "train --resume FOLDER --device cpu --data-dir "
                          f"{shell_path(tiny_data_dir)}")
    assert (tmp_path / "moved" / "config.yaml").is_file()


def test_sigterm_saves_a_checkpoint_exits_143_and_puts_the_handlers_back(tiny_data_dir, tmp_path,
                                                                         monkeypatch):
    reference = tmp_path / "reference"
    args = ["--set", "train.batch_size=25", "--set", "train.epochs=2"]
    assert cli(*train_args(reference, tiny_data_dir, *args)).exit_code == 0
    wrap_steps(monkeypatch, sigterm_at(4))
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        before_int = signal.getsignal(signal.SIGINT)
        out = tmp_path / "run"
        result = cli(*train_args(out, tiny_data_dir, *args))
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before_int
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143, result.output
    assert result.stderr.strip() == ("terminated (SIGTERM); checkpoint saved. Resume with: "
                                     f"{resume_of(out, tiny_data_dir)}")
    assert '"step": 4,' in str(load_npz(out / "checkpoint.npz")["state"])
    unwrap_steps(monkeypatch)
    resume = ["train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu"]
    result = cli(*resume)
    assert result.exit_code == 0, result.output
    assert (out / "model.npz").read_bytes() == (reference / "model.npz").read_bytes()
    # the start line says where it goes on (a stop in epoch 1 looked like a new run)
    assert result.stderr.splitlines()[0].endswith(
        "250 examples, 10 batches per epoch, 2 epochs (resuming epoch 1 after batch 4 of 10)")
    result = cli(*resume, "--set", "train.epochs=3")
    assert result.stderr.splitlines()[0].endswith("3 epochs (resuming after epoch 2)")


@pytest.mark.parametrize("first, second, code, said", [
    (signal.SIGINT, signal.SIGTERM, 130, "interrupted"),
    (signal.SIGTERM, signal.SIGINT, 143, "terminated (SIGTERM)")])
def test_the_first_of_two_signals_during_training_says_how_the_run_ends(
        tiny_data_dir, tmp_path, monkeypatch, first, second, code, said):
    """Ctrl-C, then `docker stop` before the checkpoint is saved: the run was interrupted."""
    wrap_steps(monkeypatch, lambda step: SignalsAt(step, 2, first, second))
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_data_dir, "--set", "train.batch_size=25"))
    assert result.exit_code == code, result.output
    assert result.stderr.startswith(f"{said}; checkpoint saved.")


@pytest.mark.parametrize("signum, said", [(signal.SIGINT, "interrupted"),
                                           (signal.SIGTERM, "terminated (SIGTERM)")])
@pytest.mark.parametrize("when", ["last step", "summary line"])
def test_a_signal_after_the_last_step_lets_the_run_finish_exit_0_and_says_so(
        tiny_data_dir, tmp_path, monkeypatch, signum, said, when):
    """Ctrl-C or `docker stop` in the run's last step, or while its summary line is printed:
    nothing is left to stop, so the run is complete (model.npz, summary.json), exits 0 and
    says so in a note rather than ending as interrupted with a resume to do."""
    if when == "last step":  # 250 examples in batches of 25: step 10 is the last
        wrap_steps(monkeypatch, lambda step: SignalsAt(step, 10, signum))
    else:
        echo = click.echo

        def signalled(message=None, *args, **kwargs):
            if "test_accuracy " in str(message):
                signal.raise_signal(signum)
            echo(message, *args, **kwargs)
        monkeypatch.setattr(click, "echo", signalled)
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_data_dir, "--set", "train.batch_size=25"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("val_accuracy ") and "  test_accuracy " in result.stdout
    assert result.stderr.strip() == (f"note: {said} after the last step, so the run finished; "
                                     f"{shell_path(out)} is complete, with nothing to resume")
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    assert (out / "model.npz").is_file()


def test_on_a_terminal_the_bar_is_cleared_before_the_line_that_says_how_to_resume(
        tiny_data_dir, tmp_path, monkeypatch):
    from test_cli import Terminal

    from gpumlp import progress

    events = []

    class Shown(progress.Reporter):
        def __init__(self, quiet):
            super().__init__(False, stream=Terminal())

        def close(self):
            if self.bar is not None:
                events.append("bar cleared")
            super().close()

    echo = click.echo

    def recorded(message=None, *args, **kwargs):
        events.append(str(message))
        return echo(message, *args, **kwargs)

    wrap_steps(monkeypatch, lambda step: SignalsAt(step, 2))
    monkeypatch.setattr(progress, "Reporter", Shown)
    monkeypatch.setattr(click, "echo", recorded)
    result = cli(*train_args(tmp_path / "run", tiny_data_dir, "--set", "train.batch_size=25"))
    assert result.exit_code == 130, result.output
    said = next(i for i, e in enumerate(events) if e.startswith("interrupted; checkpoint saved"))
    assert "bar cleared" in events[:said]


def test_train_puts_back_the_handlers_it_found_when_called_without_the_command_wrapper(
        tiny_data_dir, tmp_path):
    """main(args, standalone_mode=False), as a program that embeds gpumlp calls it, sets no
    command-wide handlers that would put them back afterwards: training's own must."""
    signums = (signal.SIGINT, signal.SIGTERM)
    before = [signal.getsignal(s) for s in signums]
    try:
        result = CliRunner().invoke(cli_module.main,
                                    [str(a) for a in train_args(tmp_path / "run", tiny_data_dir)],
                                    standalone_mode=False)
        after = [signal.getsignal(s) for s in signums]
    finally:
        for signum, handler in zip(signums, before):
            signal.signal(signum, handler)
    assert result.exception is None, result.output
    assert (tmp_path / "run" / "model.npz").is_file()
    assert after == before


def test_an_out_path_that_cannot_be_a_folder_is_one_line_and_nothing_is_made(tiny_data_dir,
                                                                              tmp_path):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone" / "run")
    result = cli(*train_args(dangling, tiny_data_dir))
    gone = str(tmp_path / "gone" / "run")
    assert_one_error_line(result, 1, f"--out {dangling}: a link to {gone!r}, "
                          "which leads to no folder; point it at one, or pick another path")
    too_long = tmp_path / ("a" * 300)
    result = cli(*train_args(too_long, tiny_data_dir))
    assert_one_error_line(result, 1, f"--out {too_long}: cannot use that path (File name too "
                          "long); pick another path")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)                    # what --resume, report, ... say of it, --out says
    result = cli(*train_args(loop, tiny_data_dir))
    assert_one_error_line(result, 1, f"--out {loop}: a link that leads back to itself (fix or "
                          "remove it); pick another path")
    pipe = tmp_path / "pipe"                 # no regular file, so click's "is a file" lets it by
    os.mkfifo(pipe)
    result = cli(*train_args(pipe, tiny_data_dir))
    assert_one_error_line(result, 1, f"--out {pipe}: exists and is not a folder; pick another "
                          "path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "loop", "pipe"]
    assert not pipe.is_dir() and pipe.is_fifo()


def test_resume_of_a_folder_whose_config_yaml_is_a_pipe_says_so(tmp_path):
    """A named pipe called config.yaml was called missing ('no config.yaml there'), and
    nothing ever opens it (a pipe without a writer would block the reading)."""
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "config.yaml")
    result = cli("train", "--resume", tmp_path / "run")
    assert_one_error_line(result, 1, f"--resume {tmp_path / 'run'}: its config.yaml is not a "
                          "plain file (a pipe or a device), so not a run's")
    assert (tmp_path / "run" / "config.yaml").is_fifo()


def test_resume_of_a_checkpoint_without_its_config_says_to_put_config_yaml_back(
        finished, tiny_data_dir):
    """A checkpoint copied alone, or a config.yaml that a killed --overwrite had put aside:
    'no config.yaml there; give the run directory' named neither."""
    from gpumlp.runfiles import REPLACED
    (finished / "config.yaml").unlink()
    result = cli("train", "--resume", finished, "--data-dir", tiny_data_dir)
    assert_one_error_line(result, 1, f"--resume {finished}: its checkpoint.npz is there but no "
                          "config.yaml", "put the run's config.yaml back beside it")
    (finished / REPLACED).mkdir()
    (finished / "checkpoint.npz").rename(finished / REPLACED / "checkpoint.npz")
    result = cli("train", "--resume", finished, "--data-dir", tiny_data_dir)
    assert_one_error_line(result, 1, "no config.yaml there", f"; {finished / REPLACED} holds the "
                          "run an --overwrite killed")


@pytest.mark.parametrize("make, code, fragment", [
    (None, 1, "--resume {}: no such folder"),
    # not "give the run's folder: ." for README.md, as if the checkout were a run (a file of a
    # run's folder names that folder: tests/test_report.py)
    ("file", 2, "{} is a file; give a run's folder, as gpumlp train --out DIR wrote it"),
    ("dir", 1, "--resume {}: no config.yaml"),
])
def test_resume_says_what_is_wrong_with_the_folder(tiny_data_dir, tmp_path, make, code,
                                                   fragment):
    target = tmp_path / "target"
    if make == "file":
        target.write_text("x")
    elif make == "dir":
        target.mkdir()
    result = cli("train", "--resume", target, "--data-dir", tiny_data_dir)
    paths = (shell_path(target),) if make == "file" else (target,)
    assert_one_error_line(result, code, fragment.format(*paths))
    if make == "file":                     # nor --out of a file, nor --config of a run folder
        result = cli("train", "--out", target, "--data-dir", tiny_data_dir)
        assert_one_error_line(result, 2, f"{shell_path(target)} is a file; give a folder for the "
                              "run")
        (tmp_path / "config.yaml").write_text("model: {hidden: 8}\n")
        result = cli("train", "--config", tmp_path, "--data-dir", tiny_data_dir)
        assert_one_error_line(result, 2, f"config file {tmp_path} is a folder, not a file; give "
                              f"a YAML file, e.g. {shell_path(tmp_path / 'config.yaml')}")
    assert (target.exists(), target.is_dir()) == (make is not None, make == "dir")


def test_a_metrics_row_is_written_only_after_its_checkpoint(tiny_data_dir, tmp_path,
                                                            monkeypatch):
    seen = []
    append = RunFiles.append_metrics

    def spy(self, row):
        saved = json.loads(str(load_npz(self.path("checkpoint.npz"))["state"]))
        seen.append(saved["history"][-1] == row)
        append(self, row)

    monkeypatch.setattr(RunFiles, "append_metrics", spy)
    out = tmp_path / "run"
    assert cli(*train_args(out, tiny_data_dir, "--set", "train.epochs=2")).exit_code == 0
    assert seen == [True, True]


# --- default names, groups, data folder -------------------------------------------------------

def test_default_run_names_never_collide(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    same_second = SimpleNamespace(strftime=lambda fmt: "20250101-120000")
    monkeypatch.setattr(cli_module, "time", same_second)
    args = ["train", "--config", SMOKE, *TINY, "--set", "train.epochs=1", "--device", "cpu",
            "--data-dir", tiny_data_dir, "--quiet"]
    for _ in range(3):
        assert cli(*args).exit_code == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["smoke-20250101-120000", "smoke-20250101-120000-2", "smoke-20250101-120000-3"]
    assert all((tmp_path / "runs" / name / "model.npz").is_file() for name in runs)


def test_when_every_default_name_of_the_second_is_taken_pass_out_is_said(tmp_path, monkeypatch):
    """The 999 names of one second taken (runs started in a loop): one line saying to pass
    --out, and no folder made under another name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_module, "time", SimpleNamespace(strftime=lambda fmt: "20250101"))
    names = ["run-20250101", *(f"run-20250101-{n}" for n in range(2, 1000))]
    for name in names:
        (tmp_path / "runs" / name).mkdir(parents=True)
    with pytest.raises(GpumlpError) as info:
        cli_module.default_out(None)
    assert str(info.value) == "runs/run-20250101: 999 runs of that name already; pass --out"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(names)


@pytest.mark.parametrize("name, stem", [("configs/h256.yaml", "h256"), (".yaml", "yaml"),
                                        ("..my.yaml", "my"), ("pipe", "run")])
def test_a_default_run_folder_is_named_after_the_config_never_hidden_nor_a_pipes_number(
        tiny_data_dir, tmp_path, monkeypatch, name, stem):
    """--config ./.yaml made runs/.yaml-<time>, hidden from ls; --config <(...) (/dev/fd/63)
    made runs/63-<time>."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_module, "time", SimpleNamespace(strftime=lambda fmt: "20250101"))
    config = tmp_path / name
    config.parent.mkdir(exist_ok=True)
    if name == "pipe":
        os.mkfifo(config)
        writer = threading.Thread(target=Path(config).write_text,   # the other end of <(...)
                                  args=(Path(SMOKE).read_text(),), daemon=True)
        writer.start()                    # (a thread: fork() in pytest's threads may deadlock)
    else:
        shutil.copyfile(SMOKE, config)
    result = cli("train", "--config", config, *TINY, "--set", "train.epochs=1", "--device",
                 "cpu", "--data-dir", tiny_data_dir, "--quiet")
    if name == "pipe":
        writer.join(timeout=30)
        assert not writer.is_alive()
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [f"{stem}-20250101"]


def test_a_runs_link_to_a_missing_folder_is_named_not_taken_for_999_runs(tiny_data_dir,
                                                                         tmp_path, monkeypatch):
    """mkdir(parents=True) says FileExistsError for every name under a dangling `runs` link."""
    monkeypatch.chdir(tmp_path)
    Path("runs").symlink_to(tmp_path / "gone")
    result = cli("train", "--config", SMOKE, *TINY, "--device", "cpu", "--data-dir",
                 tiny_data_dir, "--quiet")
    assert_one_error_line(result, 1, "runs: a link to a missing folder, so no run folder can be "
                          "made in it; pass --out, or move runs away")
    assert not (tmp_path / "gone").exists()


def test_a_runs_that_is_a_file_says_to_pass_out(tiny_data_dir, tmp_path, monkeypatch):
    """No run folder can be made under a file named `runs`: the error says what to do."""
    monkeypatch.chdir(tmp_path)
    Path("runs").write_text("notes\n")
    result = cli("train", "--config", SMOKE, *TINY, "--device", "cpu", "--data-dir",
                 tiny_data_dir, "--quiet")
    assert_one_error_line(result, 1, "cannot create the run folder", "pass a writable --out")
    assert Path("runs").read_text() == "notes\n"


def test_a_failed_run_with_a_default_name_leaves_no_folder(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "--config", SMOKE, *TINY, "--device", "cpu", "--set", HUGE,
                 "--data-dir", tiny_data_dir, "--quiet")
    assert_one_error_line(result, 1, "out of memory")
    assert list((tmp_path / "runs").iterdir()) == []


GROUPS = [[name] for name, c in cli_module.main.commands.items() if isinstance(c, click.Group)]


@pytest.mark.parametrize("group", [[], *GROUPS])
def test_a_group_without_a_command_prints_its_help(group):
    assert ["data"] in GROUPS
    result = cli(*group)
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ") and " ".join(["", *group, "[OPTIONS]"]) in \
        result.stdout.splitlines()[0]
    assert "Commands:" in result.stdout and "Error" not in result.output


def test_a_missing_data_folder_is_named_by_where_it_came_from(tiny_data_dir, tmp_path):
    missing = tmp_path / "no-data"
    out = tmp_path / "run"
    args = ["train", "--config", SMOKE, "--device", "cpu", "--out", out, "--quiet"]
    result = cli(*args, "--data-dir", missing)
    assert_one_error_line(result, 1, f"--data-dir {missing}: no such folder", "drop --data-dir")
    assert result.stderr.count("no such") == 1 and "GPUMLP_DATA_DIR" not in result.stderr

    result = CliRunner().invoke(cli_module.main, [str(a) for a in args],
                                env={"GPUMLP_DATA_DIR": str(missing)})
    assert_one_error_line(result, 1, f"GPUMLP_DATA_DIR={missing}: no such folder",
                          "unset GPUMLP_DATA_DIR")
    assert "--data-dir" not in result.stderr
    assert not out.exists()


def test_a_missing_data_dir_given_with_the_variable_set_too_says_to_unset_it_as_well(
        tiny_data_dir, tmp_path):
    """--data-dir wins over GPUMLP_DATA_DIR: dropping --data-dir alone would use the folder
    the variable names, not the cache."""
    missing = tmp_path / "no-data"
    out = tmp_path / "run"
    result = CliRunner().invoke(cli_module.main, [
        "train", "--config", SMOKE, "--device", "cpu", "--out", str(out), "--quiet",
        "--data-dir", str(missing)], env={"GPUMLP_DATA_DIR": str(tiny_data_dir)})
    assert_one_error_line(result, 1, f"--data-dir {missing}: no such folder",
                          "drop --data-dir and unset GPUMLP_DATA_DIR to use the cache")
    assert not out.exists()


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_stop_while_training_is_set_up_leaves_the_run_being_overwritten_intact(
        finished, tiny_data_dir, monkeypatch, signum, code, said):
    """Ctrl-C or SIGTERM after the data loaded but before the first step (the set-up: data on
    the device, state, step): the old run stays byte for byte, no one-step checkpoint over it."""
    before = digests(finished)
    prepare_data = train_module.prepare_data

    def stopped_while_preparing(*args, **kwargs):
        signal.raise_signal(signum)          # caught by the run's StopFlag: sets it, returns
        return prepare_data(*args, **kwargs)

    monkeypatch.setattr(train_module, "prepare_data", stopped_while_preparing)
    result = cli(*train_args(finished, tiny_data_dir, "--overwrite"))
    assert result.exit_code == code
    assert result.stderr.strip().splitlines()[-1] == said
    assert digests(finished) == before


@pytest.mark.parametrize("where", ["lock", "start"])
@pytest.mark.parametrize("out_given", [True, False])
def test_a_stop_while_a_new_run_folder_is_made_leaves_no_folder(tiny_data_dir, tmp_path,
                                                                 monkeypatch, where, out_given):
    """Ctrl-C between making the folder and a whole config.yaml in it (locking it, writing
    config.yaml): 130 and no folder, not an empty one that --resume cannot take."""
    import gpumlp.runfiles as runfiles_module

    lock_run_, start = runfiles_module.lock_run, RunFiles.start

    def stopped_lock(folder, option):
        lock_run_(folder, option)
        raise KeyboardInterrupt

    def stopped_start(self, config, init):
        start(self, config, init)            # config.yaml written, then the signal
        raise KeyboardInterrupt

    if where == "lock":
        monkeypatch.setattr(runfiles_module, "lock_run", stopped_lock)
    else:
        monkeypatch.setattr(RunFiles, "start", stopped_start)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new" / "run"
    args = train_args(out, tiny_data_dir) if out_given else \
        [a for a in train_args(out, tiny_data_dir) if str(a) not in ("--out", str(out))]
    result = cli(*args)
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted"
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_stop_while_config_yaml_is_written_into_a_folder_that_was_there_keeps_the_folder(
        tiny_data_dir, tmp_path, monkeypatch):
    """An empty --out made beforehand (by the user, a script): it was not the run's to remove;
    its config.yaml, written whole, lets --resume start the run."""
    start = RunFiles.start

    def stopped_start(self, config, init):
        start(self, config, init)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunFiles, "start", stopped_start)
    out = tmp_path / "mine"
    out.mkdir()
    result = cli(*train_args(out, tiny_data_dir))
    assert result.exit_code == 130
    assert out.is_dir() and (out / "config.yaml").is_file()
    monkeypatch.setattr(RunFiles, "start", start)
    assert cli("train", "--resume", out, "--data-dir", tiny_data_dir, "-q").exit_code == 0
    assert (out / "model.npz").is_file()


def test_a_new_folder_another_train_locked_first_is_left_to_it(tiny_data_dir, tmp_path,
                                                               monkeypatch):
    """Two `train --out X` started together: both may see X missing; the one that loses the
    lock must not remove X, even empty, as the other is about to write its run there."""
    import gpumlp.runfiles as runfiles_module

    out = tmp_path / "shared-run"

    def locked_by_another(folder, option):
        raise runfiles_module.RunLocked(f"{option} {folder}: another gpumlp train is writing "
                                        "this run now")

    monkeypatch.setattr(runfiles_module, "lock_run", locked_by_another)
    result = cli(*train_args(out, tiny_data_dir))
    assert_one_error_line(result, 1, f"--out {out}: another gpumlp train is writing")
    assert out.is_dir()


def test_train_from_a_thread_other_than_the_main_one_runs(tiny_data_dir, tmp_path):
    """Python sets signal handlers only in the main thread; elsewhere the CLI leaves them be
    (Ctrl-C then reaches the main thread) instead of failing on them."""
    import threading

    results = []
    thread = threading.Thread(target=lambda: results.append(
        cli(*train_args(tmp_path / "run", tiny_data_dir))))
    thread.start()
    thread.join(timeout=120)
    assert results and results[0].exit_code == 0, results and results[0].output
    assert (tmp_path / "run" / "model.npz").is_file()


# --- a fresh --out keeps files that are not a run's -------------------------------------------

def test_a_fresh_out_folder_keeps_files_named_like_a_report_or_an_export(tiny_data_dir, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    for name in DERIVED_FILES:                 # report.md, the figures' names, model.onnx
        (out / name).write_text(f"the user's own {name}")
    before = digests(out)
    assert cli(*train_args(out, tiny_data_dir)).exit_code == 0
    after = digests(out)
    assert {name: after[name] for name in before} == before
    assert (out / "model.npz").is_file()


# --- a resume keeps the net, the data and the batches -----------------------------------------

@pytest.fixture
def stopped(tiny_data_dir, tmp_path, monkeypatch) -> Path:
    """A run stopped by SIGTERM at step 4 of 10 in its first epoch (checkpoint mid-epoch)."""
    wrap_steps(monkeypatch, sigterm_at(4))
    out = tmp_path / "stopped"
    args = ["--set", "train.batch_size=25", "--set", "train.epochs=2"]
    assert cli(*train_args(out, tiny_data_dir, *args)).exit_code == 143
    unwrap_steps(monkeypatch)
    return out


@pytest.mark.parametrize("name", ["summary.json", "model.npz", "metrics.jsonl", "config.yaml"])
def test_resume_with_a_folder_where_a_run_file_belongs_says_so_before_training(
        stopped, tiny_data_dir, name):
    kept = {p.name: p.read_bytes() for p in stopped.iterdir() if p.name != name}
    (stopped / name).unlink(missing_ok=True)
    (stopped / name).mkdir()
    result = cli("train", "--resume", stopped, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, f"--resume {stopped}: {stopped / name} is a folder where "
                          "the run keeps a file; move it out of the run and resume")
    assert {p.name: p.read_bytes() for p in stopped.iterdir() if p.name != name} == kept


@pytest.mark.skipif(sys.platform == "win32", reason="no flock(2) on Windows: runs are not locked")
def test_a_run_another_train_is_writing_is_refused_by_resume_and_by_overwrite(stopped,
                                                                             tiny_data_dir):
    before = {p.name: p.read_bytes() for p in stopped.iterdir()}
    other = lock_run(stopped, "--resume")                  # as another process's train holds it
    try:
        result = cli("train", "--resume", stopped, "--data-dir", tiny_data_dir, "--device", "cpu")
        assert_one_error_line(result, 1, f"--resume {stopped}: another gpumlp train is writing "
                              "this run now; wait for it to end (or stop it: it saves a "
                              "checkpoint first)")
        result = cli(*train_args(stopped, tiny_data_dir, "--overwrite"))
        assert_one_error_line(result, 1, f"--out {stopped}: another gpumlp train is writing")
        assert {p.name: p.read_bytes() for p in stopped.iterdir()} == before
        (stopped / "config.yaml").rename(stopped / "aside")   # an --overwrite moving it aside:
        result = cli("train", "--resume", stopped, "--data-dir", tiny_data_dir)  # not "no
        assert_one_error_line(result, 1, "another gpumlp train is writing")   # config.yaml"
        (stopped / "aside").rename(stopped / "config.yaml")
    finally:
        os.close(other)
    result = cli("train", "--resume", stopped, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output     # and the lock of a command ends with it:
    assert cli("train", "--resume", stopped, "--data-dir", tiny_data_dir).exit_code == 0


@pytest.mark.parametrize("how", ["ENOLCK", "no fcntl"])
def test_where_runs_cannot_be_locked_train_goes_on_unlocked_and_leaks_no_descriptor(
        stopped, tiny_data_dir, monkeypatch, how):
    """A file system whose flock(2) fails (ENOLCK: an NFS mount without its lock service), or
    a system without fcntl (Windows): train, --resume and a report's probe go on unlocked, as
    before runs were locked, and the folder opened for the lock is closed again."""
    import fcntl

    if how == "ENOLCK":
        def refused(fd, operation):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        monkeypatch.setattr(fcntl, "flock", refused)
    else:
        monkeypatch.setitem(sys.modules, "fcntl", None)     # `import fcntl`: ImportError
    opened = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    result = cli("train", "--resume", stopped, "--data-dir", tiny_data_dir, "--device", "cpu",
                 "-q")
    assert result.exit_code == 0, result.output
    assert (stopped / "model.npz").is_file()
    result = cli(*train_args(stopped, tiny_data_dir, "--overwrite"))
    assert result.exit_code == 0, result.output
    if opened is not None:
        assert len(os.listdir("/proc/self/fd")) == opened


def test_report_export_and_out_wait_for_a_train_writing_the_run_and_never_advise_resume(
        finished, stopped, tiny_data_dir):
    """A report or export made while a train writes the run would describe the model before
    it, with nothing to say so; a stopped run being resumed is not to be resumed again."""
    before = digests(finished)
    other = lock_run(finished, "--resume")                 # a resume training it longer
    try:
        assert_one_error_line(cli("report", finished, "--data-dir", tiny_data_dir), 1,
                              f"{finished}: a gpumlp train is writing this run now; make the "
                              "report when it ends")
        assert_one_error_line(cli("export", finished / "model.npz", "--overwrite"), 1,
                              f"{finished / 'model.npz'}: a gpumlp train is writing its run now")
        assert_one_error_line(cli(*train_args(finished, tiny_data_dir)), 1,
                              f"--out {finished}: another gpumlp train is writing this run now")
        assert digests(finished) == before
    finally:
        os.close(other)
    other = lock_run(stopped, "--resume")                  # a train not finished yet
    try:
        result = cli("evaluate", stopped / "checkpoint.npz", "--data-dir", tiny_data_dir)
        assert_one_error_line(result, 1, "a training checkpoint, not a model; a gpumlp train "
                              "writing its run now will write")
        assert "--resume" not in result.stderr
        result = cli("evaluate", stopped / "model.npz", "--data-dir", tiny_data_dir)
        assert_one_error_line(result, 1, "has not finished: a gpumlp train writing it now")
        assert_one_error_line(cli(*train_args(stopped, tiny_data_dir)), 1,
                              f"--out {stopped}: another gpumlp train is writing this run now")
    finally:
        os.close(other)
    assert cli("report", finished, "--data-dir", tiny_data_dir, "--overwrite").exit_code == 0


def test_a_momentary_shared_lock_does_not_make_train_think_another_train_runs(tmp_path):
    """report, export and --out probe a run's lock with a shared lock held for a moment
    (files.writing_now); a train locking the folder just then waits for it, not refuses."""
    import fcntl
    import threading

    folder = tmp_path / "run"
    folder.mkdir()
    probe = os.open(folder, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.03, os.close, args=(probe,)).start()  # the probe ends 30 ms later
    fd = lock_run(folder, "--out")
    assert fd is not None
    os.close(fd)


@pytest.mark.parametrize("command", ["resume", "report"])
def test_a_checkpoint_or_model_the_system_will_not_open_is_not_called_damaged(
        stopped, tiny_data_dir, monkeypatch, command):
    name = "checkpoint.npz" if command == "resume" else "model.npz"
    if command == "report":
        assert cli("train", "--resume", stopped, "--data-dir", tiny_data_dir).exit_code == 0
    locked = stopped / name
    real_open = open

    def refusing_open(path, *args, **kwargs):              # what chmod 000 does to a non-root
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(npzio, "open", refusing_open, raising=False)
    before = {p.name: p.read_bytes() for p in stopped.iterdir()}
    args = (["train", "--resume", stopped] if command == "resume" else ["report", stopped])
    result = cli(*args, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, f"{locked}: cannot be read (Permission denied); make it "
                          "readable and try again (the file itself may be intact)")
    assert "--overwrite" not in result.stderr and "start" not in result.stderr
    assert {p.name: p.read_bytes() for p in stopped.iterdir()} == before


@pytest.mark.parametrize("command", ["evaluate", "export", "predict", "init"])
def test_a_model_the_system_will_not_open_is_a_file_error_for_every_command(
        stopped, tiny_data_dir, tmp_path, monkeypatch, command):
    """An unreadable model.npz (or --init) is exit 1 with report's line, as a missing one is,
    not click's exit 2 of a mistyped option: the file, not the command line, is what is wrong."""
    assert cli("train", "--resume", stopped, "--data-dir", tiny_data_dir).exit_code == 0
    locked = stopped / "model.npz"
    real_open, real_access = open, os.access

    def refusing_open(path, *args, **kwargs):              # what chmod 000 does to a non-root
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(npzio, "open", refusing_open, raising=False)
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: Path(path) != locked
                        and real_access(path, mode, *a, **k))
    image = tmp_path / "digit.npy"
    np.save(image, np.pad(np.full((10, 4), 255, np.uint8), 9))
    args = {"evaluate": ["evaluate", locked, "--data-dir", tiny_data_dir],
            "export": ["export", locked, "--out", tmp_path / "m.onnx"],
            "predict": ["predict", locked, image],
            "init": train_args(tmp_path / "new", tiny_data_dir, "--init", locked)}[command]
    result = cli(*args, "--device", "cpu") if command != "export" else cli(*args)
    assert_one_error_line(result, 1, f"{locked}: cannot be read (Permission denied); make it "
                          "readable and try again (the file itself may be intact)")
    assert not (tmp_path / "new").exists() and not (tmp_path / "m.onnx").exists()


def edit_config(out: Path, section: str, key: str, value) -> None:
    config = yaml.safe_load((out / "config.yaml").read_text())
    config[section][key] = value
    (out / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("limit", [40, 260])
def test_a_limit_edited_below_what_the_run_needs_is_named_as_the_change(stopped, tiny_data_dir,
                                                                        limit):
    """config.yaml's data.limit lowered since the checkpoint is refused as the change it is,
    not as the val_size or batch size it leaves too large (which nobody changed)."""
    edit_config(stopped, "data", "limit", limit)
    before = digests(stopped)
    result = cli("train", "--resume", stopped, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, f"config.yaml changes data.limit (null -> {limit}) since "
                          "the checkpoint")
    assert digests(stopped) == before


def test_a_saved_cosine_floor_above_the_rate_is_fixed_by_the_set_the_error_names(stopped,
                                                                                 tiny_data_dir):
    """A config.yaml saved before optim.min_lr <= optim.lr was checked still resumes, with the
    --set the error gives."""
    edit_config(stopped, "optim", "schedule", "cosine")
    edit_config(stopped, "optim", "min_lr", 0.5)
    common = ["--data-dir", tiny_data_dir, "--device", "cpu", "-q"]
    result = cli("train", "--resume", stopped, *common)
    assert_one_error_line(result, 2, f"{stopped / 'config.yaml'}: config key 'optim.min_lr' "
                          "(0.5) is above optim.lr (0.1)", "e.g. optim.min_lr=0")
    assert not (stopped / "model.npz").exists()
    result = cli("train", "--resume", stopped, "--set", "optim.min_lr=0", *common)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((stopped / "config.yaml").read_text())["optim"]["min_lr"] == 0


def test_a_finished_run_saved_before_a_check_was_added_still_writes_its_results_again(
        tiny_data_dir, tmp_path):
    """A run an older gpumlp finished with optim.nesterov true and momentum 0 (refused since):
    a resume with nothing to train writes its results again, as for any finished run (the
    check's advice, a --set, was then refused as a change no step would use: a loop); one that
    trains on is refused, naming config.yaml, until the --set the error gives."""
    from gpumlp import config as config_module
    from gpumlp import runfiles

    out = tmp_path / "old"
    old = ["--set", "optim.nesterov=true", "--set", "optim.momentum=0"]
    with pytest.MonkeyPatch.context() as older:  # the older gpumlp, without the check
        for module in (config_module, runfiles):
            older.setattr(module, "checked_together", lambda config: config)
        assert cli(*train_args(out, tiny_data_dir, *old)).exit_code == 0
    model = (out / "model.npz").read_bytes()
    (out / "model.npz").unlink()
    common = ["--data-dir", tiny_data_dir, "--device", "cpu", "-q"]
    again = cli("train", "--resume", out, *common)
    assert again.exit_code == 0, again.output
    assert (out / "model.npz").read_bytes() == model
    on = cli("train", "--resume", out, "--set", "train.epochs=2", *common)
    assert_one_error_line(on, 2, f"{out / 'config.yaml'}: config key 'optim.nesterov' is true "
                          "with optim.momentum 0", "set optim.nesterov=false (plain SGD)")
    fixed = cli("train", "--resume", out, "--set", "train.epochs=2", "--set",
                "optim.nesterov=false", *common)
    assert fixed.exit_code == 0, fixed.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_stopped_run_saved_before_a_check_was_added_is_refused_before_it_trains(
        stopped, tiny_data_dir):
    """Without --set, the check of a resume that trains on is made once the checkpoint says a
    step is left, naming config.yaml (the CLI leaves it out for a finished run)."""
    edit_config(stopped, "optim", "nesterov", True)
    edit_config(stopped, "optim", "momentum", 0)
    before = (stopped / "checkpoint.npz").read_bytes()
    result = cli("train", "--resume", stopped, "--data-dir", tiny_data_dir, "--device", "cpu",
                 "-q")
    assert_one_error_line(result, 2, f"{stopped / 'config.yaml'}: config key 'optim.nesterov'")
    assert (stopped / "checkpoint.npz").read_bytes() == before
    assert not (stopped / "model.npz").exists()


@pytest.mark.parametrize("section, key, value, change", [
    ("data", "val_size", 100, "data.val_size (50 -> 100)"),
    ("data", "limit", 200, "data.limit (null -> 200)"),
    ("train", "batch_size", 50, "train.batch_size (25 -> 50)"),
    ("model", "activation", "tanh", "model.activation (\"relu\" -> \"tanh\")"),
    ("train", "seed", 3, "train.seed (0 -> 3)"),
    ("optim", "name", "adam", "optim.name (\"sgd\" -> \"adam\")"),   # its state is sgd's
])
def test_resume_refuses_a_config_yaml_that_changed_the_net_the_data_or_the_batches(
        stopped, tiny_data_dir, section, key, value, change):
    edit_config(stopped, section, key, value)
    before = digests(stopped)
    result = resume_quietly(stopped, tiny_data_dir)
    assert_one_error_line(result, 1, f"--resume {stopped}: config.yaml changes {change} since "
                          "the checkpoint", "put it back, or start a new run")
    assert digests(stopped) == before


def test_resume_with_set_takes_a_new_learning_rate_and_more_epochs_and_records_them(
        stopped, tiny_data_dir):
    before = (stopped / "config.yaml").read_bytes()
    resume = ["train", "--resume", stopped, "--data-dir", tiny_data_dir, "--device", "cpu", "-q"]
    result = cli(*resume, "--set", "optim.lr=0.05", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((stopped / "config.yaml").read_text())
    assert (config["optim"]["lr"], config["train"]["epochs"]) == (0.05, 3)
    assert (stopped / "config.yaml").read_bytes() != before
    assert json.loads((stopped / "summary.json").read_text())["steps"] == 30


@pytest.mark.parametrize("override, change, code", [
    ("model.hidden=32", "model.hidden (64 -> 32)", 2),
    ("optim.name=adam", 'optim.name ("sgd" -> "adam")', 2),
    ("train.batch_size=50", "train.batch_size (25 -> 50)", 2),
    # a change a two-key check would also refuse: named as a change (no new run can take it),
    # not with that check's advice (give smaller widths), which a resume could never follow
    ("model.hidden=[3000000000, 3000000000]", "model.hidden (64 -> [3000000000, 3000000000])",
     2),
])
def test_resume_with_set_refuses_what_would_make_it_another_run_and_changes_nothing(
        stopped, tiny_data_dir, override, change, code):
    before = digests(stopped)
    result = cli("train", "--resume", stopped, "--set", override, "--data-dir", tiny_data_dir,
                 "--device", "cpu", "-q")
    assert_one_error_line(result, code, f"--resume {stopped}: --set changes {change}; a resume "
                          "goes on with the same net", "drop that --set, or start a new run")
    assert digests(stopped) == before


def test_resume_with_set_of_a_run_with_no_epoch_left_is_refused_and_changes_nothing(
        finished, tiny_data_dir):
    before = digests(finished)
    resume = ["train", "--resume", finished, "--data-dir", tiny_data_dir, "--device", "cpu", "-q"]
    result = cli(*resume, "--set", "optim.lr=0.001")
    assert_one_error_line(result, 2, f"--resume {finished}: the run has trained all 1 of its "
                          "epochs, so no step would use the --set values: optim.lr (0.1 -> "
                          "0.001); raise train.epochs to train on with them, or drop --set")
    assert digests(finished) == before
    assert cli(*resume, "--set", "train.epochs=1").exit_code == 0     # restating is no change
    assert digests(finished) == before


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(finished, tiny_data_dir):
    result = cli("train", "--resume", finished, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("nothing to train: the run has done its 1 epoch; writing "
                                    "its results (to train longer, resume with --set "
                                    "train.epochs=N)\n")
    assert "training on" not in result.stderr


def test_resume_of_a_finished_run_refuses_a_config_yaml_edited_since_and_changes_nothing(
        finished, tiny_data_dir):
    """The checkpoint records the config its steps ran with: an edit of config.yaml that no
    step would use is refused as a --set is, rather than written into model.npz."""
    edit_config(finished, "optim", "lr", 0.07)
    before = digests(finished)
    result = cli("train", "--resume", finished, "--data-dir", tiny_data_dir, "--device", "cpu",
                 "-q")
    assert_one_error_line(result, 1, f"--resume {finished}: the run has trained all 1 of its "
                          "epochs, so no step would use config.yaml's changes since then: "
                          "optim.lr (0.1 -> 0.07); raise train.epochs to train on with them, "
                          "or undo them")
    assert digests(finished) == before
    both = cli("train", "--resume", finished, "--set", "optim.momentum=0.5", "--data-dir",
               tiny_data_dir, "--device", "cpu", "-q")
    assert_one_error_line(both, 2, "no step would use the --set values and config.yaml's "
                          "changes since then: optim.lr (0.1 -> 0.07), optim.momentum (0.9 -> "
                          "0.5); raise train.epochs to train on with them, or drop --set and "
                          "undo the edits")
    assert digests(finished) == before
    undone = cli("train", "--resume", finished, "--set", "optim.lr=0.1", "--data-dir",
                 tiny_data_dir, "--device", "cpu", "-q")        # a --set that undoes the edit
    assert undone.exit_code == 0, undone.output
    assert yaml.safe_load((finished / "config.yaml").read_text())["optim"]["lr"] == 0.1


def test_a_stop_before_a_resume_with_set_trains_keeps_config_yaml(stopped, tiny_data_dir,
                                                                  monkeypatch):
    """Ctrl-C while the resume sets up: the run stays as it was, its config.yaml too, as for a
    run with no checkpoint (whose config.yaml is written only when training starts)."""
    def stopped_while_preparing(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_module, "prepare_state", stopped_while_preparing)
    before = digests(stopped)
    result = cli("train", "--resume", stopped, "--set", "optim.lr=0.02", "--data-dir",
                 tiny_data_dir, "--device", "cpu", "-q")
    assert result.exit_code == 130
    assert digests(stopped) == before
    # said so (it was "interrupted" alone); the same command, its --set with it, goes on
    assert result.stderr == ("interrupted; the run is as it was: run the same command again to "
                             "resume it\n")


def test_the_printed_resume_leaves_out_a_device_and_data_folder_that_were_not_typed(
        tiny_data_dir, tmp_path, monkeypatch):
    """--device auto (the default) and a data folder from $GPUMLP_DATA_DIR come back by
    themselves on a resume: the command stays the short one."""
    wrap_steps(monkeypatch, sigterm_at(4))
    monkeypatch.setenv("GPUMLP_DATA_DIR", str(tiny_data_dir))
    out = tmp_path / "run"
    result = cli("train", "--config", SMOKE, *TINY, "--device", "auto", "--out", out, "-q",
                 "--set", "train.batch_size=25")
    assert result.exit_code == 143, result.output
    assert result.stderr.strip().endswith(f"Resume with: gpumlp train --resume {shell_path(out)}")


def test_the_commands_printed_for_a_folder_with_a_space_can_be_pasted(tiny_data_dir, tmp_path,
                                                                      monkeypatch):
    wrap_steps(monkeypatch, sigterm_at(4))
    out = tmp_path / "my run"
    result = cli(*train_args(out, tiny_data_dir, "--set", "train.batch_size=25"))
    assert result.exit_code == 143
    assert result.stderr.strip().endswith(f"gpumlp train --resume '{out}' --device cpu "
                                          f"--data-dir {shell_path(tiny_data_dir)}")
    unwrap_steps(monkeypatch)
    wrap_steps(monkeypatch, lambda step: PoisonedAboveLr(step, at=8, above=0.05))
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q")
    assert_one_error_line(result, 1, f"gpumlp train --resume '{out}' --device cpu --data-dir "
                          f"{shell_path(tiny_data_dir)} --set optim.lr=0.01")


@pytest.mark.parametrize("stop", [False, True], ids=["checkpoint_every", "ctrl_c"])
def test_a_mid_epoch_checkpoint_of_weights_with_an_absurd_loss_is_not_saved(tiny_data_dir,
                                                                            tmp_path,
                                                                            monkeypatch, stop):
    """Finite weights and a finite loss, but tens of thousands: no net to go on from, so the
    last good checkpoint stays the one before. The run trains on (here the loss falls back), or
    a Ctrl-C then exits 130 with that checkpoint kept."""
    class Inflated(PoisonedAboveLr):
        def __call__(self, params, state, X, y, lr, t, masks):
            if t == self.at and stop:
                signal.raise_signal(signal.SIGINT)  # to this thread: handled before it returns
            out = self.step(params, state, X, y, lr, t, masks)
            if t == self.at:
                params.W[-1][...] *= -1e4          # confidently wrong: losses of 5e4
            return out

    save_checkpoint = RunFiles.save_checkpoint
    wrap_steps(monkeypatch, lambda step: Inflated(step, at=6, above=0.0))
    saved = []
    monkeypatch.setattr(RunFiles, "save_checkpoint", lambda self, state, *a: saved.append(
        state.pos.step) or save_checkpoint(self, state, *a))
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_data_dir, "--set", "train.batch_size=25", "--set",
                             "train.checkpoint_every=3"))
    too_large = "(their loss on the first 100 training examples was 5.47e+04, above 230)"
    if stop:
        assert result.exit_code == 130, result.output
        assert result.stderr == (f"interrupted after step 6, whose weights were too large to "
                                 f"checkpoint {too_large}, so the last good checkpoint (step 3) "
                                 f"is kept. Resume with: {resume_of(out, tiny_data_dir)}\n")
        assert saved == [3]
        assert '"step": 3,' in str(load_npz(out / "checkpoint.npz")["state"])
        return
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("Warning: skipped the checkpoint at step 6: its weights were "
                                    f"too large to go on from {too_large}")
    assert saved[0] == 3 and 6 not in saved


def test_resume_with_an_invalid_set_value_is_a_usage_error_and_changes_nothing(stopped,
                                                                               tiny_data_dir):
    before = digests(stopped)
    result = cli("train", "--resume", stopped, "--set", "train.epochs=0", "--data-dir",
                 tiny_data_dir, "--device", "cpu", "-q")
    assert_one_error_line(result, 2, "config key 'train.epochs' must be >= 1")
    assert digests(stopped) == before


def test_resume_takes_a_config_yaml_with_a_new_learning_rate_and_more_epochs(stopped,
                                                                             tiny_data_dir):
    edit_config(stopped, "optim", "lr", 0.05)
    edit_config(stopped, "train", "epochs", 3)
    result = resume_quietly(stopped, tiny_data_dir)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert json.loads((stopped / "summary.json").read_text())["steps"] == 30


def test_the_start_over_advice_keeps_the_runs_init_weights(finished, tiny_data_dir, tmp_path,
                                                           monkeypatch):
    args = ["--init", finished / "model.npz", "--set", "train.batch_size=25", "--set",
            "train.epochs=2"]
    reference = tmp_path / "reference"              # the same run, never stopped
    assert cli(*train_args(reference, tiny_data_dir, *args)).exit_code == 0
    wrap_steps(monkeypatch, sigterm_at(14))
    out = tmp_path / "run from init"
    assert cli(*train_args(out, tiny_data_dir, *args)).exit_code == 143
    unwrap_steps(monkeypatch)
    arrays = load_npz(out / "checkpoint.npz")
    record = json.loads(str(arrays["state"]))
    record["rng"] = {}                              # a record that cannot be resumed
    from gpumlp.npzio import save_npz
    save_npz(out / "checkpoint.npz", {**arrays, "state": np.array(json.dumps(record))})
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q")
    assert result.exit_code == 1
    command = shlex.split(result.stderr.strip().split(": gpumlp ")[1])
    assert command[command.index("--init") + 1] == str(out / "init.npz")
    assert cli(*command, "--data-dir", tiny_data_dir, "--device", "cpu", "-q").exit_code == 0
    assert (out / "model.npz").read_bytes() == (reference / "model.npz").read_bytes()


def test_the_start_over_advice_asks_for_init_weights_that_init_npz_no_longer_holds(
        finished, tiny_data_dir, tmp_path):
    """config.yaml's first line says the run started from --init weights: without init.npz the
    advice asks for them (FILE), as a command without --init trains from random weights."""
    out = tmp_path / "from init"
    assert cli(*train_args(out, tiny_data_dir, "--init", finished / "model.npz")).exit_code == 0
    (out / "checkpoint.npz").unlink()
    (out / "init.npz").unlink()
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q")
    assert_one_error_line(result, 1, "nothing to resume")
    assert result.stderr.endswith(f"start the run over: gpumlp train --config "
                                  f"{shell_path(out)}/config.yaml --init FILE --out "
                                  f"{shell_path(out)} --overwrite (FILE: the weights it started "
                                  "from)\n")


@pytest.mark.parametrize("how", ["--set", "config.yaml"])
def test_a_run_stopped_at_an_epochs_end_can_be_ended_there(tiny_data_dir, tmp_path,
                                                           monkeypatch, how):
    """train.epochs lowered to the epochs done is used: it ends the run, as it may mid-epoch."""
    wrap_steps(monkeypatch, sigterm_at(10))
    out = tmp_path / "run"                          # stopped at step 10: the end of epoch 1
    args = ["--set", "train.batch_size=25", "--set", "train.epochs=3"]
    assert cli(*train_args(out, tiny_data_dir, *args)).exit_code == 143
    assert not (out / "model.npz").exists()
    unwrap_steps(monkeypatch)
    resume = ["train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q"]
    if how == "--set":
        resume += ["--set", "train.epochs=1"]
    else:
        edit_config(out, "train", "epochs", 1)
    result = cli(*resume)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 1


def test_resume_refuses_fewer_epochs_than_the_run_has_begun(tiny_data_dir, tmp_path,
                                                             monkeypatch):
    wrap_steps(monkeypatch, sigterm_at(14))
    out = tmp_path / "run"                         # stopped at step 14: batch 4 of epoch 2
    args = ["--set", "train.batch_size=25", "--set", "train.epochs=3"]
    assert cli(*train_args(out, tiny_data_dir, *args)).exit_code == 143
    unwrap_steps(monkeypatch)
    before = digests(out)
    resume = ["train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q"]
    message = (f"--resume {out}: train.epochs is 1, below the 2 epochs the run has trained or "
               "begun; give at least 2")
    assert_one_error_line(cli(*resume, "--set", "train.epochs=1"), 2, message)  # usage
    assert digests(out) == before                  # the refused --set is not recorded
    edit_config(out, "train", "epochs", 1)
    before = digests(out)
    assert_one_error_line(cli(*resume), 1, message)
    assert digests(out) == before
    edit_config(out, "train", "epochs", 2)         # the epoch under way may be the last
    assert cli(*resume).exit_code == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 20


def test_a_checkpoint_from_before_the_config_record_resumes_as_before_with_a_warning(
        stopped, tmp_path, tiny_data_dir):
    from gpumlp.npzio import save_npz

    reference = tmp_path / "reference"              # the same run, never stopped
    args = ["--set", "train.batch_size=25", "--set", "train.epochs=2"]
    assert cli(*train_args(reference, tiny_data_dir, *args)).exit_code == 0
    arrays = load_npz(stopped / "checkpoint.npz")
    record = json.loads(str(arrays["state"]))
    del record["fixed"], record["config"]           # as gpumlp wrote it before 2026-11-29
    save_npz(stopped / "checkpoint.npz", {**arrays, "state": np.array(json.dumps(record))})
    result = resume_quietly(stopped, tiny_data_dir)
    assert result.exit_code == 0, result.output
    assert result.stderr == ("Warning: the checkpoint comes from a gpumlp that did not record the "
                             "config its steps ran with, so edits to config.yaml since cannot be "
                             "checked; training on with config.yaml as it is\n")
    assert (stopped / "model.npz").read_bytes() == (reference / "model.npz").read_bytes()


def test_a_checkpoint_says_its_format_and_one_without_it_is_format_1(stopped, tiny_data_dir):
    """From 2026-11-30 the state record carries its layout's number, so that a later gpumlp's
    checkpoint is refused rather than misread; an earlier one, without it, still resumes."""
    from gpumlp.npzio import save_npz

    path = stopped / "checkpoint.npz"
    arrays = load_npz(path)
    record = json.loads(str(arrays["state"]))
    assert record["format"] == 1
    from gpumlp import __version__
    reshaped = {"fixed": list(record["fixed"].items()), "config": [record["config"]]}
    for changed in ({}, reshaped):   # a later format may give its entries other shapes
        arrays["state"] = np.array(json.dumps({**record, **changed, "format": 2}))
        save_npz(path, arrays)
        before = digests(stopped)
        later = resume_quietly(stopped, tiny_data_dir)
        assert_one_error_line(later, 1, f"{path}: written by a later gpumlp (checkpoint format "
                              f"2; this gpumlp {__version__} reads format 1); resume it with "
                              "that gpumlp, or upgrade this one")
        assert digests(stopped) == before
    del record["format"]
    arrays["state"] = np.array(json.dumps(record))
    save_npz(path, arrays)
    result = resume_quietly(stopped, tiny_data_dir)
    assert result.exit_code == 0, result.output


def resume_quietly(folder: Path, data_dir: Path):
    """`gpumlp train --resume folder -q` on the CPU and the tiny data: click's Result."""
    return cli("train", "--resume", folder, "--data-dir", data_dir, "--device", "cpu", "-q")


def damage_state(record: dict, how: str) -> None:
    """Change a checkpoint's state record (parsed JSON) as `how` says."""
    if how == "step_text":
        record["position"]["step"] = "four"
    elif how == "history_number":
        record["history"] = 5
    elif how == "rng_empty":
        record["rng"] = {}
    elif how == "position_extra":
        record["position"]["speed"] = 1
    elif how == "fixed_list":
        record["fixed"] = []
    elif how == "rng_huge":                         # NumPy: OverflowError, not ValueError
        record["rng"]["state"]["state"] = 2 ** 200
    elif how == "step_off":                         # step 4 of epoch 1 is batch 4
        record["position"]["step"] = 5
    elif how == "correct_huge":
        record["position"]["correct"] = 10 ** 9
    elif how == "correct_negative":
        record["position"]["correct"] = -1
    elif how == "batch_at_end":                     # step 10 of epoch 1 ends it: no batch left
        record["position"].update(step=10, batch=10)
    elif how == "format_text":
        record["format"] = "1"
    elif how == "format_zero":
        record["format"] = 0
    elif how == "loss_sum_huge":                    # JSON's integers: float() overflows
        record["position"]["loss_sum"] = 10 ** 400
    elif how == "loss_sum_nan":                     # the resume's first step blamed optim.lr
        record["position"]["loss_sum"] = float("nan")
    elif how == "seconds_inf":                      # "inf s on cpu", NaN in metrics.jsonl
        record["position"]["seconds"] = float("inf")
    elif how == "format_later":                     # a later gpumlp's layout
        record["format"] = 2
    elif how == "history_extra_row":                # a row for an epoch not finished
        record["history"] = [dict(GOOD_ROW)]
    elif how.startswith("history_row_"):            # at batch 4 of epoch 2, after one row
        record["position"].update(epoch=1, step=14)
        record["history"] = [{"history_row_lacks": {"epoch": 1}, "history_row_number": 5,
                              "history_row_huge": {**GOOD_ROW, "test_loss": 1e308},
                              "history_row_epoch": {**GOOD_ROW, "epoch": 2}}[how]]


GOOD_ROW = {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "test_loss": 0.4,
            "test_accuracy": 0.85, "lr": 0.01, "seconds": 1.5}


@pytest.mark.parametrize("how, fragment", [
    ("perm_short", "the epoch's order does not fit a training set of 250 examples in 10 batches"),
    ("perm_repeats", "the epoch's order does not fit a training set of 250 examples"),
    ("perm_float", "the epoch's order does not fit"),
    ("perm_missing", "the epoch's order is missing"),
    ("step_text", "its state record is missing or damaged"),
    ("history_number", "its state record is missing or damaged"),
    ("position_extra", "its state record is missing or damaged"),
    ("record_list", "its state record is missing or damaged"),
    ("fixed_list", "its state record is missing or damaged"),
    ("rng_empty", "its generator states are damaged"),
    ("rng_huge", "its generator states are damaged"),
    ("step_off", "its state record is missing or damaged"),
    ("correct_huge", "its state record is missing or damaged"),
    ("correct_negative", "its state record is missing or damaged"),
    ("batch_at_end", "the epoch's order does not fit a training set of 250 examples"),
    ("history_extra_row", "its state record is missing or damaged"),
    ("format_text", "its state record is missing or damaged"),
    ("format_zero", "its state record is missing or damaged"),
    ("history_row_lacks", "its state record is missing or damaged"),
    ("history_row_huge", "its state record is missing or damaged"),
    ("history_row_epoch", "its state record is missing or damaged"),
    ("history_row_number", "its state record is missing or damaged"),
    ("state_missing", "its state record is missing or damaged"),
    ("state_not_json", "its state record is missing or damaged"),
    ("velocity_nan", "its optimizer state holds NaN or infinite values"),
    ("velocity_huge", "its optimizer state holds NaN or infinite values (or ones too large "
                      "for float32)"),
    ("velocity_text", "its optimizer state holds <U1 values, not floats"),
    ("velocity_complex", "its optimizer state holds complex64 values, not floats"),
    ("loss_sum_huge", "its state record is missing or damaged"),
    ("loss_sum_nan", "its state record is missing or damaged"),
    ("seconds_inf", "its state record is missing or damaged"),
    ("scale_text", "its velocity scale (opt_scale) is damaged"),
    ("truncated", "not a readable .npz file"),
    ("weight_nan", "W1 holds NaN or infinite values"),
    ("weight_huge", "its weights are finite but too large to use: their loss on the first 100 "
                    "training examples is"),
    # the record's fixed keys match config.yaml, so the file is damaged: no advice to put
    # config.yaml back, which nobody changed
    ("velocity_missing", "optimizer state does not match the config; start the run over"),
    ("weight_missing", "array b2 is missing for hidden sizes [64]; start the run over"),
    ("weight_shape", "W2 has shape (63, 10) and dtype float32; expected (64, 10) floats; start "
                     "the run over"),
    # a checkpoint of before 2026-11-29 records no fixed keys: config.yaml may have changed
    ("weight_shape_older", "W2 has shape (63, 10) and dtype float32; expected (64, 10) floats; "
                           "put config.yaml back as the run had it, or start the run over"),
    ("velocity_shape", "optimizer state does not match the config"),
])
def test_resume_refuses_a_damaged_checkpoint_state_in_one_line(stopped, tiny_data_dir, how,
                                                               fragment):
    from gpumlp.npzio import save_npz

    path = stopped / "checkpoint.npz"
    arrays = load_npz(path)
    perm = arrays["perm"]
    if how == "truncated":                          # a copy cut short
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "perm_short":
        arrays["perm"] = perm[:-1]
    elif how == "perm_repeats":
        arrays["perm"] = np.zeros_like(perm)
    elif how == "perm_float":
        arrays["perm"] = perm.astype(np.float64)
    elif how == "perm_missing":                     # stopped at batch 4: the order is needed
        del arrays["perm"]
    elif how == "velocity_nan":
        arrays["opt_m0"] = np.full_like(arrays["opt_m0"], np.nan)
    elif how == "velocity_huge":                    # finite in float64, inf in float32
        arrays["opt_m0"] = np.full(arrays["opt_m0"].shape, 1e300)
    elif how == "velocity_text":                    # a traceback
        arrays["opt_m0"] = np.full(arrays["opt_m0"].shape, "x")
    elif how == "velocity_complex":                 # taken as its real part, silently
        arrays["opt_m0"] = arrays["opt_m0"].astype(np.complex64)
    elif how == "scale_text":                       # the fast CPU step's: a traceback
        assert arrays["opt_scale"].shape == (1,)
        arrays["opt_scale"] = np.array(["1"])
    elif how == "weight_nan":
        arrays["W1"] = np.full_like(arrays["W1"], np.nan)
    elif how == "weight_huge":                      # finite: the resume blamed optim.lr
        arrays["W1"] = arrays["W1"] * np.float32(1e20)
    elif how == "velocity_missing":
        del arrays["opt_m0"]
    elif how == "velocity_shape":                   # one row: it would broadcast unseen
        arrays["opt_m0"] = arrays["opt_m0"][:1]
    elif how == "weight_missing":
        del arrays["b2"]
    elif how.startswith("weight_shape"):            # one row short: a layer of 63 units
        arrays["W2"] = arrays["W2"][:-1]
        if how.endswith("older"):
            record = json.loads(str(arrays["state"]))
            del record["fixed"]
            arrays["state"] = np.array(json.dumps(record))
    elif how == "record_list":
        arrays["state"] = np.array("[]")
    elif how == "state_missing":
        del arrays["state"]
    elif how == "state_not_json":                   # cut short: no longer JSON
        arrays["state"] = np.array(str(arrays["state"])[:40])
    else:
        record = json.loads(str(arrays["state"]))
        damage_state(record, how)
        arrays["state"] = np.array(json.dumps(record))
    if how != "truncated":
        save_npz(path, arrays)
    before = digests(stopped)
    result = resume_quietly(stopped, tiny_data_dir)
    quoted = shell_path(stopped)                    # the message quotes the folder alone
    start_over = (f"start the run over: gpumlp train --config {quoted}/config.yaml --out "
                  f"{quoted} --overwrite")
    assert_one_error_line(result, 1, f"{path}: {fragment}", start_over)
    assert result.stderr.strip().endswith(start_over)
    assert digests(stopped) == before
    command = shlex.split(start_over.split(": gpumlp ")[1])
    again = cli(*command, "--data-dir", tiny_data_dir, "--device", "cpu", "-q")
    assert again.exit_code == 0, again.output                     # the advice works


def read_only(monkeypatch, folder: Path) -> None:
    """Make creating a file in `folder` fail as on a read-only mount (tests may run as root,
    whom permission bits do not stop)."""
    import gpumlp.errors as errors_module

    real = errors_module.tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(errors_module.tempfile, "TemporaryFile", temporary_file)


def test_resume_and_report_in_a_folder_they_cannot_write_say_so_in_one_line(
        stopped, finished, tiny_data_dir, monkeypatch):
    read_only(monkeypatch, stopped)
    before = digests(stopped)
    result = resume_quietly(stopped, tiny_data_dir)
    assert_one_error_line(result, 1, f"--resume {stopped}: cannot write there (Read-only file "
                          "system); make the folder writable, or resume a copy of it")
    assert digests(stopped) == before
    read_only(monkeypatch, finished)
    before = digests(finished)
    result = cli("report", finished, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, f"{finished}: cannot write the report there (Read-only "
                          "file system); make the folder writable, or report on a copy")
    assert digests(finished) == before


# --- resuming from damaged or edited run folders -------------------------------------------

def test_train_resume_refuses_a_finished_run_whose_checkpoint_is_gone(tiny_mnist, tmp_path):
    config = build_config(None, ["model.hidden=8", "train.epochs=1", "train.batch_size=100"])
    out = tmp_path / "run"
    train(config, CPU, tiny_mnist.mnist, out_dir=out)
    (out / "checkpoint.npz").unlink()
    before = (out / "model.npz").stat().st_mtime_ns, (out / "model.npz").read_bytes()
    with pytest.raises(GpumlpError, match="nothing to resume"):
        train(config, CPU, tiny_mnist.mnist, out_dir=out, resume=True)
    assert ((out / "model.npz").stat().st_mtime_ns, (out / "model.npz").read_bytes()) == before


def test_a_row_lost_between_a_checkpoint_and_its_append_is_rewritten_by_resume(tiny_mnist,
                                                                               tmp_path,
                                                                               monkeypatch):
    config = build_config(None, ["model.hidden=8", "train.epochs=2", "train.batch_size=100"])
    out = tmp_path / "run"

    def killed(self, row):
        raise Killed

    with monkeypatch.context() as m:    # killed after epoch 1's checkpoint, before its row
        m.setattr(RunFiles, "append_metrics", killed)
        with pytest.raises(Killed):
            train(config, CPU, tiny_mnist.mnist, out_dir=out)
    assert (out / "checkpoint.npz").exists() and (out / "metrics.jsonl").read_text() == ""
    train(config, CPU, tiny_mnist.mnist, out_dir=out, resume=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]


def test_a_checkpoint_with_a_well_formed_history_row_resumes(stopped, tiny_data_dir):
    """The control of the history_row_ cases above: the same edit with a good row is taken, so
    it is the row they damage that each refuses."""
    from gpumlp.npzio import save_npz

    path = stopped / "checkpoint.npz"
    arrays = load_npz(path)
    record = json.loads(str(arrays["state"]))
    record["position"].update(epoch=1, step=14)
    record["history"] = [dict(GOOD_ROW)]
    save_npz(path, {**arrays, "state": np.array(json.dumps(record))})
    result = resume_quietly(stopped, tiny_data_dir)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == GOOD_ROW and [row["epoch"] for row in rows] == [1, 2]


@pytest.mark.parametrize("text", ["", "# emptied by hand\n"])
def test_resume_with_an_emptied_config_yaml_says_so_not_what_the_defaults_change(
        stopped, tiny_data_dir, text):
    (stopped / "config.yaml").write_text(text)
    before = digests(stopped)
    result = cli("train", "--resume", stopped, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, f"--resume {stopped}: its config.yaml holds no config (a "
                          "run's holds every key); put it back as the run had it, or start a "
                          "new run")
    assert "->" not in result.stderr
    assert digests(stopped) == before


@pytest.mark.parametrize("names, said", [
    (["report.md", "model.onnx"], "the report (report.md and its figures) and model.onnx in the "
     "run describe the model before this resume; when it ends, make them again: gpumlp report "
     "{run}; gpumlp export {model} --overwrite"),
    (["learning_curves.png"], "the report (report.md and its figures) in the run describes the "
     "model before this resume; when it ends, make it again: gpumlp report {run}"),
    (["model.onnx"], "model.onnx in the run describes the model before this resume; when it "
     "ends, make it again: gpumlp export {model} --overwrite"),
    # the user's own report.md and model.onnx: `gpumlp report` would refuse it, and --overwrite
    # replace it; not gpumlp's to remake
    (["own:report.md", "own:model.onnx"], None),
])
def test_a_resume_that_trains_warns_that_a_report_or_an_export_is_of_the_model_before(
        stopped, tiny_data_dir, names, said):
    made = b"made from the model before"
    marked = {".png": PNG_SIGNATURE + PNG_MARK + made, ".md": sealed(REPORT_TITLE.encode() + made),
              ".onnx": b"\x08\x08" + PRODUCER_MARK + made}      # as gpumlp report/export mark
    files = {name.removeprefix("own:"): made if name.startswith("own:") else
             marked[Path(name).suffix] for name in names}
    for name, content in files.items():
        (stopped / name).write_bytes(content)
    result = resume_quietly(stopped, tiny_data_dir)
    assert result.exit_code == 0, result.output
    words = {"run": shell_path(stopped), "model": shell_path(stopped / "model.npz")}
    assert result.stderr == ("" if said is None else f"Warning: {said.format(**words)}\n")
    for name, content in files.items():                                 # kept: the user's call
        assert (stopped / name).read_bytes() == content
    again = resume_quietly(stopped, tiny_data_dir)
    assert (again.exit_code, again.stderr) == (0, "")                   # nothing left to train


@pytest.mark.parametrize("path, word", [("runs/h256", "runs/h256"), ("my run", "'my run'"),
                                        ("-dash", "./-dash"), ("/abs/-dash", "/abs/-dash"),
                                        ("it's", "'it'\"'\"'s'")])
def test_printed_paths_are_one_shell_word_that_no_command_takes_for_an_option(path, word):
    import shlex

    from gpumlp.errors import shell_path

    assert shell_path(path) == word
    assert shlex.split(word) == [f"./{path}" if path.startswith("-") else path]


@pytest.mark.parametrize("name", [b"bad\xff\xfe/run9", b"two\nlines", b"tab\there's\\",
                                  b"-\xff"])
def test_a_name_that_is_not_text_is_printed_as_bash_escapes_of_its_bytes(name):
    """A folder named in bytes that are not UTF-8 was printed as \\udcff in the resume
    command, a folder that does not exist; a line break broke the command in two."""
    from gpumlp.errors import shell_path

    word = shell_path(os.fsdecode(name))
    assert word.startswith("$'") and word.isascii() and word.isprintable()
    echoed = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True,
                            check=True).stdout
    assert echoed == (b"./" + name if name.startswith(b"-") else name)


def test_a_run_folder_named_with_a_dash_gets_warnings_that_paste(stopped, tiny_data_dir,
                                                                 monkeypatch):
    """`gpumlp report -dash` would read -dash as options: the stale-output warning says
    ./-dash, and the command it prints runs."""
    monkeypatch.chdir(stopped.parent)
    stopped.rename(stopped.parent / "-dash")
    (stopped.parent / "-dash" / "report.md").write_bytes(sealed(REPORT_TITLE.encode() + b"x\n"))
    result = cli("train", "--resume", "-dash", "--data-dir", tiny_data_dir, "--device", "cpu",
                 "-q")
    assert result.exit_code == 0, result.output
    command = result.stderr.strip().rpartition("again: ")[2]
    assert command == "gpumlp report ./-dash"


def test_a_run_folder_gone_while_training_says_so_and_how_to_go_on(tmp_path):
    import errno

    files = RunFiles(tmp_path / "moved")
    error = files.write_failed(files.path("checkpoint.npz"),
                               OSError(errno.ENOENT, "No such file or directory"), "kept")
    assert str(error) == (f"cannot write {files.path('checkpoint.npz')}: the run folder is gone "
                          "(moved or removed while training); kept wherever the folder went: "
                          "resume it there with gpumlp train --resume FOLDER")
    (tmp_path / "my run").mkdir()
    full = RunFiles(tmp_path / "my run").write_failed(
        tmp_path / "my run" / "metrics.jsonl", OSError(errno.ENOSPC, "No space left"), "kept")
    assert str(full).endswith(f"(No space left); kept; free some space, then: gpumlp train "
                              f"--resume '{tmp_path / 'my run'}'")
    limit = RunFiles(tmp_path / "my run").write_failed(    # as the cache's error says it
        tmp_path / "my run" / "model.npz", OSError(errno.EFBIG, "File too large"), "kept")
    assert "(File too large); kept; raise the file size limit (ulimit -f), then:" in str(limit)
    denied = OSError(errno.EACCES, "Permission denied")    # a temporary file and a rename: the
    folder = RunFiles(tmp_path / "my run")                 # folder's permissions refused it
    assert (f"(Permission denied); kept; make the folder {shell_path(folder.folder)} writable, "
            "then:") in str(folder.write_failed(folder.path("model.npz"), denied, "kept"))
    assert "(Permission denied); kept; make it writable, then:" in str(   # appended in place
        folder.write_failed(folder.path("metrics.jsonl"), denied, "kept", appended=True))


def test_a_full_disk_at_a_metrics_row_is_one_line_and_the_resume_rewrites_the_file(
        tiny_data_dir, tmp_path, monkeypatch):
    """The error says the checkpoint is intact and that a resume rewrites metrics.jsonl from
    it: the row cut short by the full disk is replaced by the whole one, and no row is lost or
    written twice."""
    from gpumlp import runfiles

    def full_at_the_second_row(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if Path(path).name == "metrics.jsonl" and "a" in mode and Path(path).stat().st_size:
            f.write('{"epoch": 2, "train_lo')      # what reached the disk before it was full
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(runfiles, "open", full_at_the_second_row, raising=False)
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_data_dir, "--set", "train.epochs=3"))
    assert_one_error_line(result, 1, f"cannot write {out / 'metrics.jsonl'} (No space left on "
                          "device); the checkpoint is intact (a resume rewrites the file from "
                          f"it); free some space, then: {resume_of(out, tiny_data_dir)}")
    assert json.loads(str(load_npz(out / "checkpoint.npz")["state"]))["position"]["epoch"] == 2
    assert not (out / "model.npz").exists()
    monkeypatch.setattr(runfiles, "open", open, raising=False)
    result = cli(*shlex.split(resume_of(out, tiny_data_dir))[1:], "-q")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]


class CupyLikeGenerator:
    """What CuPy's Generator shows of its state: `bit_generator.state` is a method that gives a
    device pointer, and it takes no state (assigning to it would just hide the method)."""

    def __init__(self, seed):
        self.seed = seed
        self.bit_generator = SimpleNamespace(state=lambda: 0x7F00_0000)


def test_a_cpu_checkpoint_resumed_on_a_gpu_reseeds_the_device_generator_not_overwrites_it():
    """A CPU run saves its device generator's state; CuPy's generator cannot take it, so a
    resume on a GPU reseeds it from the position (as a GPU run's resume does)."""
    from gpumlp.resume_state import restore_generators
    from gpumlp.runfiles import generator_state
    config = build_config(None, "train.seed=3")
    host = np.random.default_rng(5)
    meta = {"rng": host.bit_generator.state,
            "dev_rng": generator_state(np.random.default_rng(4))}
    gpu = SimpleNamespace(xp=SimpleNamespace(random=SimpleNamespace(
        default_rng=CupyLikeGenerator)))
    state = SimpleNamespace(rng=np.random.default_rng(0), dev_rng=CupyLikeGenerator(4),
                            pos=SimpleNamespace(step=70))
    restore_generators(state, meta, config, gpu, "run/checkpoint.npz")
    assert isinstance(state.dev_rng, CupyLikeGenerator)
    assert state.dev_rng.seed == resume_seed(3, 70)
    assert callable(state.dev_rng.bit_generator.state)
    assert state.rng.bit_generator.state == host.bit_generator.state
    assert generator_state(state.dev_rng) is None   # and a GPU run saves none


def test_a_gpu_checkpoint_resumed_on_the_cpu_reseeds_the_device_generator():
    """A GPU run saves no device generator state (CuPy's cannot say it): a resume on the CPU
    reseeds NumPy's from the position, as a GPU resume does, instead of calling it damaged."""
    from gpumlp.resume_state import restore_generators
    config = build_config(None, "train.seed=3")
    host = np.random.default_rng(5)
    meta = {"rng": host.bit_generator.state, "dev_rng": None}
    state = SimpleNamespace(rng=np.random.default_rng(0), dev_rng=np.random.default_rng(9),
                            pos=SimpleNamespace(step=70))
    restore_generators(state, meta, config, CPU, "run/checkpoint.npz")
    assert state.dev_rng.random() == np.random.default_rng(resume_seed(3, 70)).random()
    assert state.rng.bit_generator.state == host.bit_generator.state


def test_a_reseeded_resume_does_not_repeat_another_seeds_stream():
    """seed + 1 + step was the seed a fresh run with seed + step starts its device generator
    with (train.py: seed + 1): seed 0 resumed at step 2 drew seed 2's dropout and shifts."""
    fresh = {seed + 1 for seed in range(1000)}
    resumed = {resume_seed(seed, step) for seed in range(20) for step in range(0, 5000, 7)}
    assert not fresh & resumed and len(resumed) == 20 * len(range(0, 5000, 7))


def test_resume_of_a_folder_with_only_a_config_of_ones_own_refuses_and_keeps_it(
        tiny_data_dir, tmp_path):
    """A run killed before its first checkpoint left config.yaml with every key (the test
    above resumes it); a folder with a config.yaml written by hand is no run: resume refuses
    it, rather than training there over the user's file, comments and all."""
    out = tmp_path / "exp"
    out.mkdir()
    mine = "# my experiment\nmodel: {hidden: 8}   # small\ntrain: {epochs: 1}\n"
    (out / "config.yaml").write_text(mine)
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, "its config.yaml is not a run's", "it lacks 'data.",
                          f"gpumlp train --config {shell_path(out / 'config.yaml')}")
    assert (out / "config.yaml").read_text() == mine
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_out_whose_config_yaml_is_a_pipe_is_refused_without_reading_it(tiny_data_dir,
                                                                      tmp_path):
    """Whether --out's config.yaml is one's own is read from it: a FIFO there blocked train
    for good (read_yaml reads pipes, as --config <(...) needs)."""
    out = tmp_path / "fifo"
    out.mkdir()
    os.mkfifo(out / "config.yaml")
    done = subprocess.run([sys.executable, "-m", "gpumlp", *map(str, train_args(
        out, tiny_data_dir))], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 1 and done.stderr.startswith(f"Error: --out {out}: already holds")


def test_out_holding_a_config_of_ones_own_offers_no_resume_but_training_with_it(
        tiny_data_dir, tmp_path):
    """--out offered a --resume that --resume then refused (runfiles.resumable and
    RunFiles.check_resumable disagreed on a config.yaml written by hand)."""
    from gpumlp.runfiles import resumable
    out = tmp_path / "exp"
    out.mkdir()
    mine = "model: {hidden: 8}\ntrain: {epochs: 1}\n"
    (out / "config.yaml").write_text(mine)
    assert not resumable(out)
    result = cli("train", "--out", out, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, "holds a config.yaml of one's own (not a run's",
                          f"(--config {shell_path(out / 'config.yaml')} --out "
                          f"{shell_path(out / 'run')} trains with it)", "or pass --overwrite")
    assert "--resume" not in result.stderr
    assert (out / "config.yaml").read_text() == mine


@pytest.mark.parametrize("text, why", [
    ("my notes on the next run\n", "this one holds plain text, not a mapping"),
    ("- model.hidden=64\n- optim.lr=0.1\n", "this one holds a list, not a mapping"),
    ("!!binary aGVsbG8=\n", "this one holds binary data, not a mapping"),
    ("model: {hidden: [64\n", "this one is not valid YAML at line 2"),
    ("{{{ not yaml", "this one is not valid YAML"),
    ("model: {hidden: 64}\nmodel: {hidden: 32}\n", "this one has a bad key: key 'model' "
                                                    "appears twice (line 2)"),
])
def test_a_config_yaml_that_is_no_mapping_is_ones_own_for_out_and_resume(
        tiny_data_dir, tmp_path, text, why):
    """gpumlp writes config.yaml as a YAML mapping, whole: one that is not (plain text, a list,
    broken YAML), alone in the folder, is the user's. --out called it a run and offered a
    --resume, which then failed on its YAML; both now say it is one's own, and why, and keep it."""
    from gpumlp.runfiles import check_out_dir, own_config
    out = tmp_path / "exp"
    out.mkdir()
    (out / "config.yaml").write_text(text)
    assert own_config(out) and not resumable(out)
    result = cli(*train_args(out, tiny_data_dir))
    assert_one_error_line(result, 1, f"--out {out}: holds a config.yaml of one's own (not a "
                          f"run's, which is a YAML mapping of every key: {why}",
                          "give the run another folder, or pass --overwrite to replace it")
    assert "--resume" not in result.stderr and "trains with it" not in result.stderr
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 1, f"--resume {out}: no checkpoint.npz, and its config.yaml "
                          f"is not a run's (a run's is a YAML mapping of every key: {why}",
                          "give the run directory of an interrupted `gpumlp train`")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    assert (out / "config.yaml").read_text() == text
    (out / "metrics.jsonl").write_text("")  # beside a run's file: the run's, edited since
    assert not own_config(out)
    with pytest.raises(GpumlpError, match="already holds a run"):
        check_out_dir(out, overwrite=False)
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert_one_error_line(result, 2, f"config file {out / 'config.yaml'}")


def test_overwrite_replaces_a_config_yaml_that_is_no_mapping(tiny_data_dir, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "config.yaml").write_text("- a list\n")
    result = cli(*train_args(out, tiny_data_dir, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert build_config(out / "config.yaml").model.hidden == 64


@pytest.mark.parametrize("present", [
    frozenset(names) for k in range(6) for names in itertools.combinations(
        ("config.yaml", "checkpoint.npz", "model.npz", "summary.json", "metrics rows"), k)])
def test_out_offers_resume_exactly_where_resume_goes_on(tmp_path, present):
    """runfiles.resumable, by which report and check_out_dir offer --resume, must agree with
    RunFiles.check_resumable, what --resume itself lets through, for every mix of a run's files
    (a folder with metrics rows but no checkpoint was offered a resume that then refused);
    check_out_dir offers it for an unfinished run only (no summary.json)."""
    from gpumlp.config import Config, dump_config
    from gpumlp.runfiles import RunFiles, check_out_dir, resumable
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n' if "metrics rows" in present else "")
    for name in present - {"metrics rows"}:
        (run / name).write_text(dump_config(Config()) if name == "config.yaml" else "x")
    try:
        RunFiles(run).check_resumable()
        goes_on = True
    except GpumlpError:
        goes_on = False
    assert resumable(run) == goes_on
    with pytest.raises(GpumlpError) as refused:
        check_out_dir(run, overwrite=False)
    offered = goes_on and "summary.json" not in present
    assert ("resume it with --resume" in str(refused.value)) == offered


def test_a_finished_run_resumed_for_more_epochs_and_stopped_is_offered_the_resume(
        finished, tiny_data_dir, monkeypatch):
    """Its old model.npz and summary.json stay until the resume ends, so --out took it for a
    finished run and offered no --resume; config.yaml's train.epochs says more are to come."""
    wrap_steps(monkeypatch, sigterm_at(4))
    resume = ["train", "--resume", finished, "--data-dir", tiny_data_dir, "--device", "cpu", "-q"]
    assert cli(*resume, "--set", "train.epochs=3").exit_code == 143     # in its second epoch
    assert json.loads((finished / "summary.json").read_text())["epochs"] == 1
    refused = cli(*train_args(finished, tiny_data_dir))
    assert_one_error_line(refused, 1, "already holds a run", "resume it with --resume")
    unwrap_steps(monkeypatch)
    assert cli(*resume).exit_code == 0                                 # it finishes the epochs
    refused = cli(*train_args(finished, tiny_data_dir))
    assert "resume it with --resume" not in refused.stderr
    for damaged in ("train: 5\n", "train: [\n"):   # its epochs unreadable: not offered either
        (finished / "config.yaml").write_text(damaged)
        refused = cli(*train_args(finished, tiny_data_dir))
        assert_one_error_line(refused, 1, "already holds a run")
        assert "resume it with --resume" not in refused.stderr


@pytest.mark.parametrize("how", ["--resume", "--overwrite"])
def test_temporary_files_a_killed_write_left_are_removed_once_the_run_is_locked(
        finished, tiny_data_dir, how):
    """SIGKILL while a checkpoint is written (docker stop, after 10 s) leaves its temporary
    file, up to a checkpoint's size, which nothing removed. Another program's, and report's
    and export's (written without the train's lock), stay."""
    left = [".checkpoint.npz.k3x_9q0a.tmp", ".model.npz.abcdefgh.tmp", ".summary.json.00000000.tmp"]
    kept = [".report.md.abcdefgh.tmp", ".checkpoint.npz.short.tmp", "checkpoint.npz.abcdefgh.tmp",
            ".notes.txt.abcdefgh.tmp"]
    for name in left + kept:
        (finished / name).write_bytes(b"partial")
    if how == "--resume":
        result = cli("train", "--resume", finished, "--data-dir", tiny_data_dir, "--device", "cpu")
    else:
        result = cli(*train_args(finished, tiny_data_dir, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert [name for name in left + kept if (finished / name).exists()] == kept


@pytest.mark.parametrize("warmup, schedule, ends", [
    (1, "cosine", "reaches optim.lr only at its last step, and the cosine decay never begins"),
    (0.9, "cosine", "reaches optim.lr only at its last step, and the cosine decay never begins"),
    (4, "step", "ends at 0.25 of optim.lr (0.025), and the step decays never come"),
    (4, "step-late", "ends at 0.25 of optim.lr (0.025)"),     # its first decay past the run
    (1000, "constant", "ends at 0.001 of optim.lr (0.0001)"),
    (1, "constant", None), (0.9, "constant", None), (1.0001, "constant", None),
    (0.5, "cosine", None), (0, "cosine", None)])
def test_a_warmup_as_long_as_the_run_is_warned_of_even_when_quiet(tiny_data_dir, tmp_path,
                                                                  warmup, schedule, ends):
    """The last step inside the warm-up: the rate never reaches optim.lr (or at the last step, a
    cosine or step decay never coming), and the run exited 0 without a word. Not refused: a
    resume may add the epochs. 250 examples in batches of 100 are 3 steps: 0.9 epochs is 2.7
    steps, the last step's inside it. A constant rate 0.1% short of optim.lr or less is left."""
    step_epochs = 2 if schedule == "step-late" else 0.5
    result = cli(*train_args(tmp_path / "run", tiny_data_dir, "--set",
                             f"optim.schedule={schedule.removesuffix('-late')}", "--set",
                             f"optim.warmup_epochs={warmup}", "--set",
                             f"optim.step_epochs={step_epochs}"))
    assert result.exit_code == 0, result.output
    if ends is None:
        assert "Warning" not in result.stderr
    else:
        length = ("is not below train.epochs (1)" if warmup >= 1 else
                  f"ends within a step of train.epochs (1), at step {warmup * 3:g} of 3")
        assert (f"Warning: optim.warmup_epochs ({warmup:g}) {length}: the rate rises all run "
                f"and {ends}; shorten the warm-up, or give more epochs\n"
                in result.stderr), result.stderr     # and nothing more after {ends}


@pytest.mark.parametrize("epochs", ["true", "1.5", '"2"', "null", "[2]"])
def test_a_damaged_summary_says_no_epochs_and_makes_no_run_extended(tmp_path, epochs):
    from gpumlp.config import Config, dump_config
    from gpumlp.runfiles import extended, summary_epochs
    (tmp_path / "config.yaml").write_text(dump_config(Config()))      # train.epochs 10
    (tmp_path / "summary.json").write_text(f'{{"epochs": {epochs}}}')
    assert summary_epochs(tmp_path) is None and extended(tmp_path) is False
    (tmp_path / "summary.json").write_text('{"epochs": 2}')
    assert summary_epochs(tmp_path) == 2 and extended(tmp_path) is True


def test_a_config_of_ones_own_beside_a_summary_is_no_extended_run(tmp_path):
    """A hand-written config.yaml (lacking keys) says nothing of a run's epochs."""
    from gpumlp.runfiles import extended
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 5\n")
    (tmp_path / "summary.json").write_text('{"epochs": 2}')
    assert extended(tmp_path) is False


def test_a_metrics_file_of_one_byte_is_a_trained_run_for_resumable_too(tmp_path):
    """RunFiles.check_resumable counts any byte in metrics.jsonl as an epoch's row: a config.yaml
    beside a one-byte metrics.jsonl, with no checkpoint, is no run --resume goes on with."""
    from gpumlp.config import Config, dump_config
    from gpumlp.runfiles import resumable
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(Config()))
    (run / "metrics.jsonl").write_text("\n")
    with pytest.raises(GpumlpError, match="no checkpoint.npz"):
        RunFiles(run).check_resumable()
    assert not resumable(run)


# --- a resume that fails ---------------------------------------------------------------------

def test_a_resume_whose_first_checkpoint_fails_keeps_its_set_values_for_the_advised_resume(
        finished, tiny_data_dir, monkeypatch):
    """`--resume --set train.epochs=2` records epochs 2 in config.yaml when training starts;
    when its first checkpoint then cannot be written (a full disk), the error's advice is the
    plain resume, which must go on with what was asked: config.yaml keeps the --set values
    (putting the old file back made that resume train to the old end, or refuse the NaN
    advice's --set)."""
    from gpumlp import runfiles

    def full(path, arrays):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    real = runfiles.save_npz
    monkeypatch.setattr(runfiles, "save_npz", full)
    result = cli("train", "--resume", finished, "--set", "train.epochs=2", "--data-dir",
                 tiny_data_dir, "--quiet")
    assert result.exit_code == 1, result.output
    advice = result.stderr.strip().splitlines()[-1]
    assert advice.endswith(f"free some space, then: gpumlp train --resume {shell_path(finished)}"
                           f" --data-dir {shell_path(tiny_data_dir)}")  # as given, no --device
    assert yaml.safe_load((finished / "config.yaml").read_text())["train"]["epochs"] == 2
    monkeypatch.setattr(runfiles, "save_npz", real)
    assert cli("train", "--resume", finished, "--data-dir", tiny_data_dir, "-q").exit_code == 0
    assert json.loads((finished / "summary.json").read_text())["epochs"] == 2


def test_a_model_npz_that_cannot_be_written_at_the_end_says_how_to_write_it(
        finished, tiny_data_dir, monkeypatch):
    """The last epoch's checkpoint is written when model.npz fails: the error names the resume
    that writes model.npz from it, as a failed checkpoint's does."""
    from gpumlp import runfiles

    real = runfiles.save_model

    def refused(path, params, config):
        raise OSError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(runfiles, "save_model", refused)
    (finished / "model.npz").unlink()
    resume = ["train", "--resume", finished, "--set", "train.epochs=2", "--data-dir",
              tiny_data_dir, "--quiet"]
    result = cli(*resume)                        # (a warning on the fixture's report first)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"Error: cannot write {finished / 'model.npz'} (Operation not permitted); the last "
        f"epoch's checkpoint is intact (a resume writes the file from it); fix that, then: "
        f"gpumlp train --resume {shell_path(finished)} --data-dir {shell_path(tiny_data_dir)}")
    monkeypatch.setattr(runfiles, "save_model", real)
    assert cli("train", "--resume", finished, "--data-dir", tiny_data_dir, "-q").exit_code == 0
    assert (finished / "model.npz").is_file()


def test_files_a_run_writes_follow_the_umask_and_a_replaced_file_keeps_its_mode(tiny_data_dir,
                                                                               tmp_path):
    """Every file was made 0644 whatever the umask (a checkpoint readable by all under umask
    077), and a resume made a file the user had set to 0600 readable by all again."""
    out = tmp_path / "run"
    mask = os.umask(0o077)
    try:
        assert cli(*train_args(out, tiny_data_dir)).exit_code == 0
        assert cli("export", out / "model.npz").exit_code == 0
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {name: 0o600 for name in modes} and "model.onnx" in modes
    (out / "checkpoint.npz").chmod(0o640)
    mask = os.umask(0o022)
    try:
        assert cli("train", "--resume", out, "--set", "train.epochs=2", "--data-dir",
                   tiny_data_dir, "--device", "cpu", "-q").exit_code == 0
        assert cli(*train_args(tmp_path / "new", tiny_data_dir)).exit_code == 0
    finally:
        os.umask(mask)
    assert (out / "checkpoint.npz").stat().st_mode & 0o777 == 0o640   # replaced, mode kept
    assert (out / "model.npz").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "new" / "model.npz").stat().st_mode & 0o777 == 0o644
    for path in out.iterdir():                 # a run made read-only: a resume appends to
        path.chmod(0o444)                      # metrics.jsonl, so its owner keeps the right
    assert cli("train", "--resume", out, "--set", "train.epochs=3", "--data-dir",
               tiny_data_dir, "--device", "cpu", "-q").exit_code == 0
    assert {(out / name).stat().st_mode & 0o777 for name in (
        "metrics.jsonl", "checkpoint.npz", "model.npz", "summary.json")} == {0o644}


def test_the_umask_is_read_where_there_is_no_proc(monkeypatch):
    from gpumlp import npzio

    def no_proc(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")
    mask = os.umask(0o027)
    try:
        assert npzio.umask() == 0o027
        monkeypatch.setattr(npzio, "open", no_proc, raising=False)
        assert npzio.umask() == 0o027 and os.umask(0o027) == 0o027   # and put back
    finally:
        os.umask(mask)


@pytest.mark.parametrize("stuck", [None, "config.yaml", "metrics.jsonl"])
def test_a_first_checkpoint_refused_by_the_folder_says_so_not_what_the_clean_up_met(
        finished, tiny_data_dir, tmp_path, monkeypatch, stuck):
    """A folder made read-only before the first checkpoint: the clean-up's own failure to
    remove config.yaml replaced the error that ended the run ('config.yaml: Permission
    denied; check its permissions'). Whichever file cannot go (`stuck`; None: all), what
    stays is a run that --resume starts over, its --init weights with it."""
    import errno as errors
    from pathlib import Path as PathType

    from gpumlp import runfiles

    def refused(*args, **kwargs):
        raise PermissionError(errors.EACCES, "Permission denied")
    made_read_only = []

    def first_checkpoint(path, *args, **kwargs):
        if Path(path).name != "checkpoint.npz":              # init.npz, at the start
            return npzio.save_npz(path, *args, **kwargs)
        made_read_only.append(True)
        refused()
    out = tmp_path / "new-run"
    monkeypatch.setattr(runfiles, "save_npz", first_checkpoint)
    real_unlink = PathType.unlink
    monkeypatch.setattr(PathType, "unlink", lambda self, *a, **k: (
        refused() if self.parent == out and made_read_only and stuck in (None, self.name)
        else real_unlink(self, *a, **k)))
    result = cli(*train_args(out, tiny_data_dir, "--init", finished / "model.npz"))
    assert_one_error_line(result, 1, f"cannot write {out / 'checkpoint.npz'} (Permission "
                          f"denied); no checkpoint was written yet; make the folder "
                          f"{shell_path(out)} writable, then start it over: gpumlp train "
                          f"--resume {shell_path(out)}")     # its files stay: the same command
    made_read_only.clear()                                 # would find the folder taken
    monkeypatch.setattr(runfiles, "save_npz", npzio.save_npz)
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "-q")
    assert result.exit_code == 0, result.output
    assert (np.load(out / "init.npz")["W1"].tobytes() ==
            np.load(finished / "model.npz")["W1"].tobytes())


# --- from a mutation run: behaviours no test pinned down --------------------------------------

def killed_before_its_first_checkpoint(out, data_dir, **edits):
    """A finished run made into one killed before its first checkpoint, its config.yaml
    edited (SECTION__KEY=value; a value of None deletes the key)."""
    assert cli(*train_args(out, data_dir)).exit_code == 0
    for name in ("checkpoint.npz", "model.npz", "summary.json"):
        (out / name).unlink()
    (out / "metrics.jsonl").write_text("")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    for key, value in edits.items():
        section, name = key.split("__")
        if value is None:
            del saved[section][name]
        else:
            saved[section][name] = value
    (out / "config.yaml").write_text(yaml.safe_dump(saved))


def test_a_start_over_refuses_a_config_yaml_the_two_key_checks_refuse(tiny_data_dir, tmp_path):
    """A resume with no checkpoint yet starts the run over: config.yaml gets the checks a new
    run's config gets, those that read two keys too (lr * weight_decay >= 1 trained to chance)."""
    out = tmp_path / "run"
    killed_before_its_first_checkpoint(out, tiny_data_dir, optim__lr=0.1, optim__weight_decay=20)
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q")
    assert_one_error_line(result, 2, f"{out / 'config.yaml'}: config key 'optim.weight_decay' "
                                     "(20)")
    assert not (out / "model.npz").exists()


def test_a_killed_runs_config_that_lacks_a_key_is_still_a_runs(tiny_data_dir, tmp_path):
    """metrics.jsonl (written just after config.yaml) marks a run killed before its first
    checkpoint: its config.yaml, from a gpumlp with fewer keys, is the run's, and --resume
    starts the run over rather than calling it a config of one's own."""
    out = tmp_path / "run"
    killed_before_its_first_checkpoint(out, tiny_data_dir, train__eval_batch_size=None)
    assert keys_lacking(out) == [] and resumable(out)
    again = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q")
    assert again.exit_code == 0, again.output
    assert (out / "model.npz").is_file()


def test_resume_refuses_a_set_that_changes_the_dtype(tiny_data_dir, tmp_path):
    """train.dtype keeps it the same run: float32 weights and velocity are not a float64 run's."""
    out = tmp_path / "run"
    assert cli(*train_args(out, tiny_data_dir)).exit_code == 0
    before = digests(out)
    result = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q",
                 "--set", "train.epochs=2", "--set", "train.dtype=float64")
    assert_one_error_line(result, 2, '--set changes train.dtype ("float32" -> "float64")')
    assert digests(out) == before


def test_put_back_never_replaces_a_file_made_in_the_folder_since(finished):
    """The old run's report.md waits in .gpumlp-replaced/ while the new run starts; a
    report.md made in the folder meanwhile is someone's: put_back leaves both, says the old
    run is not back whole, and loses nothing."""
    old_report = (finished / "report.md").read_bytes()
    files = RunFiles(finished)
    files.start(build_config(None, ["model.hidden=8"]))
    assert (finished / REPLACED / "report.md").read_bytes() == old_report
    (finished / "report.md").write_text("written since")
    assert files.put_back() is False
    assert (finished / "report.md").read_text() == "written since"
    assert (finished / REPLACED / "report.md").read_bytes() == old_report
    assert (finished / "model.npz").is_file()                # the rest of the old run is back


def test_a_resume_with_no_step_left_does_not_warn_of_the_warmup(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    first = cli(*train_args(out, tiny_data_dir, "--set", "optim.schedule=cosine",
                            "--set", "optim.warmup_epochs=1"))
    assert first.exit_code == 0 and "Warning: optim.warmup_epochs" in first.stderr
    again = cli("train", "--resume", out, "--data-dir", tiny_data_dir, "--device", "cpu", "-q")
    assert again.exit_code == 0, again.output
    assert "warmup" not in again.stderr, again.stderr


def test_a_run_that_also_holds_runs_in_subfolders_is_replaced_by_overwrite(tiny_data_dir,
                                                                           tmp_path):
    """--out RUN --overwrite where RUN is a run that also holds a run in a subfolder: RUN is
    a run, replaced as one, not refused as a folder that holds other runs."""
    out = tmp_path / "run"
    assert cli(*train_args(out, tiny_data_dir)).exit_code == 0
    assert cli(*train_args(out / "inner", tiny_data_dir)).exit_code == 0
    result = cli(*train_args(out, tiny_data_dir, "--overwrite", "--set", "model.hidden=8"))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["hidden"] == 8
