"""A file that appears where gpumlp was about to write a new one, after the check that none was
there (another program, a second gpumlp), is kept: `data image`, `export` and `report` without
--overwrite publish their new files with a hard link, which fails where a name exists, where a
rename would have replaced it. Before 2026-11-30 the file was silently replaced."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from use_helpers import invoke, train_model

from gpumlp import npzio
from gpumlp.cli_data import data
from gpumlp.cli_use import export, report
from gpumlp.npzio import TargetAppeared, atomic_write, atomic_write_all
from gpumlp.report import FIGURES, REPORT

PRECIOUS = b"my own notes"


def appearing_at(monkeypatch, target: Path, content: bytes = PRECIOUS) -> None:
    """Someone writes `content` at `target` just after gpumlp staged its temporary file there."""
    real = npzio.stage

    def stage_then_appear(path, data, suffix):
        tmp = real(path, data, suffix)
        if Path(path) == target:
            target.write_bytes(content)
        return tmp

    monkeypatch.setattr(npzio, "stage", stage_then_appear)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_new_file_is_written_where_none_is_and_an_old_one_replaced(tmp_path):
    atomic_write(tmp_path / "a", b"1", new=True)
    atomic_write(tmp_path / "a", b"2")
    assert (tmp_path / "a").read_bytes() == b"2" and leftovers(tmp_path) == []
    with pytest.raises(TargetAppeared, match="a: a file appeared there .* pass --overwrite$"):
        atomic_write(tmp_path / "a", b"3", new=True)
    assert (tmp_path / "a").read_bytes() == b"2" and leftovers(tmp_path) == []


def test_a_new_path_given_as_text_is_kept_free_as_one_given_as_a_path(tmp_path):
    (tmp_path / "a").write_bytes(PRECIOUS)
    with pytest.raises(TargetAppeared):
        atomic_write_all({tmp_path / "a": b"1"}, new={str(tmp_path / "a")})
    assert (tmp_path / "a").read_bytes() == PRECIOUS and leftovers(tmp_path) == []


def test_a_file_appearing_stops_the_write_before_any_other_is_replaced(tmp_path, monkeypatch):
    """All or none: the new files go first; one that finds a name takes back those written
    before it, and the files to replace are left as they were."""
    old, first, second = tmp_path / "old", tmp_path / "first", tmp_path / "second"
    old.write_bytes(b"old")
    appearing_at(monkeypatch, second)
    with pytest.raises(TargetAppeared):
        atomic_write_all({old: b"new", first: b"1", second: b"2"}, new={first, second})
    assert old.read_bytes() == b"old" and second.read_bytes() == PRECIOUS
    assert not first.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP, errno.EINVAL])
def test_without_hard_links_a_new_file_is_renamed_in_after_a_last_look(tmp_path, monkeypatch,
                                                                       code):
    def no_links(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", no_links)
    atomic_write(tmp_path / "a", b"1", new=True)
    assert (tmp_path / "a").read_bytes() == b"1" and leftovers(tmp_path) == []
    with pytest.raises(TargetAppeared):
        atomic_write(tmp_path / "a", b"2", new=True)
    assert (tmp_path / "a").read_bytes() == b"1" and leftovers(tmp_path) == []


def assert_kept(result, target: Path) -> None:
    assert result.exit_code == 1, result.output
    assert result.stderr == (f"Error: {target}: a file appeared there while gpumlp was writing "
                             "it, and was left as it is; move it away, or pass --overwrite\n")
    assert target.read_bytes() == PRECIOUS and leftovers(target.parent) == []


def test_data_image_keeps_a_file_that_appeared_while_it_wrote(tiny_data_dir, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "digit.png"
    appearing_at(monkeypatch, out)
    assert_kept(invoke(data, "image", "0", out, "--data-dir", tiny_data_dir), out)
    replaced = invoke(data, "image", "0", out, "--data-dir", tiny_data_dir, "--overwrite")
    assert replaced.exit_code == 0 and out.read_bytes().startswith(b"\x89PNG")


def test_export_keeps_a_file_that_appeared_while_it_wrote(tiny_mnist, tmp_path, monkeypatch):
    train_model(tiny_mnist.mnist, tmp_path / "run", model__hidden=8, train__epochs=1)
    out = tmp_path / "mnist.onnx"
    appearing_at(monkeypatch, out)
    assert_kept(invoke(export, tmp_path / "run" / "model.npz", "--out", out), out)


def test_report_keeps_a_file_that_appeared_while_it_wrote_and_writes_none(tiny_mnist,
                                                                          tiny_data_dir, tmp_path,
                                                                          monkeypatch):
    run = tmp_path / "run"
    train_model(tiny_mnist.mnist, run, model__hidden=8, train__epochs=1, train__batch_size=50)
    before = sorted(p.name for p in run.iterdir())
    appearing_at(monkeypatch, run / REPORT)
    assert_kept(invoke(report, run, "--data-dir", tiny_data_dir, "--device", "cpu"), run / REPORT)
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, REPORT])  # no figure
    assert not any((run / name).exists() for name in FIGURES.values())


def test_a_report_another_report_wrote_meanwhile_is_not_called_a_foreign_file(
        tiny_mnist, tiny_data_dir, tmp_path, monkeypatch):
    """Two `gpumlp report RUN` at once: the one that lost was told to move the other's report
    away or pass --overwrite, as if it were another program's file."""
    from gpumlp.report import sealed
    run = tmp_path / "run"
    train_model(tiny_mnist.mnist, run, model__hidden=8, train__epochs=1, train__batch_size=50)
    theirs = sealed(b"# Report: run\n")                  # what the other gpumlp report wrote
    appearing_at(monkeypatch, run / REPORT, theirs)
    result = invoke(report, run, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr == (
        f"Error: {run}: another gpumlp report wrote its report there while this one was being "
        "made; this one wrote nothing (run gpumlp report again to make it anew)\n")
    assert (run / REPORT).read_bytes() == theirs and leftovers(run) == []

