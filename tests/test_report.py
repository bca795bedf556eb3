"""`gpumlp report`: the figures exist and are readable PNGs, and report.md's numbers are
those of metrics.jsonl (and of the model on the test set). Runs on the tiny MNIST."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpumlp.activations import ACTIVATIONS
from gpumlp.backend import CPU
from gpumlp.checkpoint import load_model
from gpumlp.cli_use import report
from gpumlp.data import to_inputs
from gpumlp.errors import shell_path
from gpumlp.model import forward, softmax
from gpumlp.report import (FIGURES, PNG_MARK, PNG_MARK_WITHIN, REPORT_TITLE, ReportError,
                           SplitOutputs, check_run, confident_mistakes, confusion_matrix,
                           make_report, plot_mistakes)
from use_helpers import assert_missing_extra, invoke, train_model, without_module


@pytest.fixture(scope="module")
def run_dir(tiny_mnist, tmp_path_factory) -> Path:
    """A 3-epoch run with a validation split, short enough to leave mistakes on the test set."""
    out = tmp_path_factory.mktemp("run")
    train_model(tiny_mnist.mnist, out, model__hidden=16, data__val_size=50, train__epochs=3,
                train__batch_size=50, optim__lr=0.002)
    return out


@pytest.fixture(scope="module")
def reported(run_dir, tiny_mnist) -> Path:
    """The run with its report, written by the library (the command is tested below)."""
    written = make_report(run_dir, tiny_mnist.mnist.test, CPU)
    assert [p.name for p in written] == [*FIGURES.values(), "report.md"]
    return run_dir


def test_the_command_writes_the_report_into_the_run_directory(tiny_mnist, tiny_data_dir, tmp_path):
    train_model(tiny_mnist.mnist, tmp_path, model__hidden=8, train__epochs=1, train__batch_size=50)
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"wrote {', '.join(FIGURES.values())}, report.md in {tmp_path}\n")
    assert all((tmp_path / name).is_file() for name in [*FIGURES.values(), "report.md"])
    markdown = (tmp_path / "report.md").read_text()
    assert "val_loss" not in markdown  # no validation split in this run, no column for it
    assert "validation accuracy" not in markdown                    # nor a headline number


def test_a_run_folder_named_in_bytes_that_are_not_utf8_gets_its_report(run_dir, tiny_mnist,
                                                                         tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/run\xff"))
    shutil.copytree(run_dir, odd, ignore=shutil.ignore_patterns("*.png", "report.md"))
    make_report(odd, tiny_mnist.mnist.test, CPU)
    assert (odd / "report.md").read_bytes().startswith(b"# Report: run\\udcff")


def test_with_label_smoothing_the_report_says_why_train_loss_sits_above_test_loss(
        tiny_mnist, tmp_path, monkeypatch):
    import gpumlp.report as report_module

    legends = []
    save_figure = report_module.save_figure

    def keep_legends(fig, path):
        legends.extend(text.get_text() for ax in fig.axes if ax.get_legend()
                       for text in ax.get_legend().get_texts())
        save_figure(fig, path)

    monkeypatch.setattr(report_module, "save_figure", keep_legends)
    train_model(tiny_mnist.mnist, tmp_path, model__hidden=8, train__epochs=1,
                train__batch_size=50, train__label_smoothing=0.1)
    make_report(tmp_path, tiny_mnist.mnist.test, CPU)
    assert "train (targets smoothed by 0.1)" in legends and "test" in legends
    assert ("train_loss is the objective: the cross-entropy against targets smoothed by "
            "train.label_smoothing 0.1, averaged over the epoch's steps; it cannot go below "
            "0.500, the entropy of those targets. test_loss is the cross-entropy against the "
            "true labels, measured after each epoch, with no such floor: that is why "
            "train_loss can sit above it.") \
        in (tmp_path / "report.md").read_text()                   # no validation split here


def test_the_smoothing_note_names_val_loss_when_the_run_has_it():
    from gpumlp.report import smoothing_note

    note = smoothing_note(0.2, 10, has_val=True)
    assert "cannot go below 0.867" in note      # -(0.82 ln 0.82 + 9 x 0.02 ln 0.02)
    assert note.endswith("val_loss and test_loss are the cross-entropy against the true labels, "
                         "measured after each epoch, with no such floor: that is why train_loss "
                         "can sit above them.")


def test_without_label_smoothing_the_report_has_no_such_note(reported):
    assert "smoothed" not in (reported / "report.md").read_text()


def table(markdown: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with `first_header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


def test_every_figure_is_a_readable_png_shown_in_report_md(reported):
    markdown = (reported / "report.md").read_text()
    for name in FIGURES.values():
        with Image.open(reported / name) as image:
            assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 400
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10, f"{name} looks blank"
        assert f"]({name})" in markdown


def test_the_epoch_table_holds_the_numbers_of_metrics_jsonl(reported):
    metrics = [json.loads(line) for line in (reported / "metrics.jsonl").read_text().splitlines()]
    rows = table((reported / "report.md").read_text(), "epoch")
    assert len(rows) == len(metrics) == 3
    for row, epoch in zip(rows, metrics):
        assert int(row["epoch"]) == epoch["epoch"]
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
                    "test_accuracy"):
            assert float(row[key]) == pytest.approx(epoch[key], abs=5e-5), key
        assert float(row["lr"]) == pytest.approx(epoch["lr"], rel=1e-3)
        assert float(row["seconds"]) == pytest.approx(epoch["seconds"], abs=0.005)  # to 0.01: fast epochs showed 0.0


def test_the_confusion_count_is_the_models_and_the_last_epochs_accuracy(reported, tiny_mnist):
    last = json.loads((reported / "metrics.jsonl").read_text().splitlines()[-1])
    markdown = (reported / "report.md").read_text()
    params, config = load_model(reported / "model.npz")
    X = to_inputs(tiny_mnist.mnist.test.images, "unit", "float32")
    right = int((forward(params, X, ACTIVATIONS["relu"]).A[-1].argmax(axis=1)
                 == tiny_mnist.mnist.test.labels).sum())
    n = len(tiny_mnist.mnist.test.labels)
    assert (f"gets {right} of {n} test images right (accuracy {right / n:.4f}), the same as"
            in markdown)
    assert f"{last['test_accuracy']:.4f}" == f"{right / n:.4f}"
    headline = re.search(r"test accuracy (\d\.\d{4}), test loss (\d+\.\d{4})", markdown)
    assert float(headline[1]) == pytest.approx(last["test_accuracy"], abs=5e-5)
    assert float(headline[2]) == pytest.approx(last["test_loss"], abs=5e-5)


def test_the_mistakes_listed_are_the_most_confident_wrong_answers(reported, tiny_mnist):
    params, _ = load_model(reported / "model.npz")
    test = tiny_mnist.mnist.test
    Z2 = softmax(forward(params, to_inputs(test.images, "unit", "float32"),
                         ACTIVATIONS["relu"]).A[-1])
    wrong = [i for i in range(len(test.labels)) if Z2[i].argmax() != test.labels[i]]
    assert wrong, "the fixture's model should make mistakes for this test to mean anything"
    expected = sorted(wrong, key=lambda i: -Z2[i].max())[:16]
    rows = table((reported / "report.md").read_text(), "test index")
    assert [int(row["test index"]) for row in rows] == expected
    for row in rows:
        i = int(row["test index"])
        assert int(row["label"]) == test.labels[i] != int(row["predicted"]) == Z2[i].argmax()
        assert float(row["probability"]) == pytest.approx(Z2[i].max(), abs=5e-5)


def test_confusion_matrix_and_mistakes_by_hand():
    labels = np.array([0, 0, 1, 2, 2, 2])
    Z2 = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.0, 1.0, 0.0],
                   [0.6, 0.0, 0.4], [0.0, 0.0, 1.0], [0.1, 0.8, 0.1]])
    out = SplitOutputs(labels, Z2)
    np.testing.assert_array_equal(confusion_matrix(labels, out.predicted, 3),
                                  [[1, 1, 0], [0, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(confident_mistakes(out), [5, 1, 3])   # p = 0.8, 0.7, 0.6
    assert confident_mistakes(out, count=1).tolist() == [5]


def figure_texts(monkeypatch) -> list[list[str]]:
    """Each figure report.save_figure is given, as the texts drawn on it (every Text artist,
    titles and suptitle included), appended as it is saved."""
    import gpumlp.report as report_module
    from matplotlib.text import Text

    figures, save_figure = [], report_module.save_figure

    def keep_texts(fig, path):
        figures.append([t.get_text() for t in fig.findobj(Text) if t.get_text()])
        save_figure(fig, path)

    monkeypatch.setattr(report_module, "save_figure", keep_texts)
    return figures


def test_a_model_without_mistakes_gets_a_figure_that_says_so(tmp_path, monkeypatch):
    """The figure of no mistakes says so in words (a PNG alone would pass for an empty grid),
    and shows no digit; with a mistake, it shows that one and does not say so."""
    texts = figure_texts(monkeypatch)
    out = SplitOutputs(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert confident_mistakes(out).size == 0
    plot_mistakes(np.zeros((2, 784)), out, confident_mistakes(out), tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as image:
        assert image.format == "PNG"
    assert "no test image is misclassified" in texts[0]
    assert not any(re.match(r"#\d+: true", text) for text in texts[0])   # no digit's title
    wrong = SplitOutputs(np.array([0, 1]), np.array([[0.9, 0.1], [0.7, 0.3]]))
    plot_mistakes(np.zeros((2, 784)), wrong, confident_mistakes(wrong), tmp_path / "w.png")
    assert "no test image is misclassified" not in texts[1]
    assert "#1: true 1, predicted 0\np = 0.700" in texts[1]


def test_a_folder_without_a_run_or_a_model_gets_one_error_line(tmp_path, run_dir, tiny_data_dir):
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and "no metrics.jsonl" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    (tmp_path / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and "no model.npz" in result.stderr
    (tmp_path / "metrics.jsonl").write_text("")
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.endswith(
        "no epoch finished yet; train at least one epoch first\n")
    for name in ("checkpoint.npz", "config.yaml"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.endswith(      # stopped in its first epoch
        f"no epoch finished yet; resume it for one: gpumlp train --resume {shell_path(tmp_path)}\n")


def test_a_run_without_a_model_is_told_to_resume_only_when_a_resume_can_go_on(
        tmp_path, run_dir, tiny_data_dir):
    """--resume needs checkpoint.npz and config.yaml (runfiles.resumable): without either, the
    run is trained again (from its config.yaml when it has one), as a resume would only fail."""
    def said() -> str:
        result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
        assert result.exit_code == 1 and result.stderr.count("\n") == 1
        return result.stderr
    (tmp_path / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    here = shell_path(tmp_path)
    assert said().endswith(f"no model.npz; it has no checkpoint.npz to resume from, so start the "
                           f"run over: gpumlp train --config {here}/config.yaml --out {here} "
                           "--overwrite\n")
    (tmp_path / "checkpoint.npz").write_bytes((run_dir / "checkpoint.npz").read_bytes())
    (tmp_path / "config.yaml").unlink()
    assert said().endswith(f"no model.npz; it has no config.yaml to resume from, so train it "
                           f"again: gpumlp train --config FILE --out {shell_path(tmp_path)} "
                           "--overwrite\n")
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert said().endswith(f"no model.npz; finish the run first (gpumlp train --resume "
                           f"{shell_path(tmp_path)})\n")


def test_a_run_from_init_weights_without_a_model_is_started_over_with_them(
        tmp_path, run_dir, tiny_data_dir):
    """A run that started from --init weights is started over with them: from its init.npz,
    else FILE where config.yaml's first line says there were some (without --init the command
    would train a different run from random weights, and drop init.npz)."""
    from gpumlp.resume_state import FROM_INIT

    (tmp_path / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    (tmp_path / "config.yaml").write_text(FROM_INIT + (run_dir / "config.yaml").read_text())
    (tmp_path / "init.npz").write_bytes((run_dir / "model.npz").read_bytes())
    here = shell_path(tmp_path)
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.endswith(
        f"so start the run over: gpumlp train --config {here}/config.yaml --init "
        f"{here}/init.npz --out {here} --overwrite\n")
    (tmp_path / "init.npz").unlink()
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.endswith(
        f"so start the run over: gpumlp train --config {here}/config.yaml --init FILE --out "
        f"{here} --overwrite (FILE: the weights it started from)\n")


@pytest.mark.parametrize("summary", ["older", "unreadable"])
def test_a_model_older_than_the_metrics_is_not_reported_as_theirs(tmp_path, run_dir,
                                                                  tiny_data_dir, summary):
    """A finished run resumed for more epochs and stopped keeps its old model.npz beside the
    new rows: its report would mix the two models. summary.json, written with model.npz, says
    which epoch the model is of; where it cannot say, the report goes on (the accuracy check
    in report.md is left)."""
    for name in ("metrics.jsonl", "config.yaml", "checkpoint.npz", "model.npz", "summary.json"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    record = json.loads((tmp_path / "summary.json").read_text())
    assert record["epochs"] == 3
    (tmp_path / "summary.json").write_text(json.dumps({**record, "epochs": 2})
                                           if summary == "older" else "{")
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    if summary == "older":
        assert result.exit_code == 1 and result.stderr.count("\n") == 1
        assert result.stderr.endswith(
            f"{tmp_path}: model.npz is the model of epoch 2 (summary.json), but metrics.jsonl "
            "goes on to epoch 3: the run was resumed and has not finished; finish the run first "
            f"(gpumlp train --resume {shell_path(tmp_path)})\n")
        assert not (tmp_path / "report.md").exists()
    else:
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("epochs", [1, 2, 7])
def test_the_learning_curves_mark_whole_epochs_only(run_dir, monkeypatch, epochs):
    """With one epoch, the integer locator fell back to ticks at 0.95, 0.975, ... 1.05."""
    import gpumlp.report as report_module
    from gpumlp.report import plot_learning_curves, read_metrics

    row = read_metrics(run_dir)[0]
    rows = [{**row, "epoch": e} for e in range(1, epochs + 1)]
    drawn = []
    monkeypatch.setattr(report_module, "save_figure", lambda fig, path: drawn.append(fig))
    plot_learning_curves(rows, "unused.png")
    for ax in drawn[0].axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_checkpoint_without_its_config_is_not_told_to_resume_for_an_epoch(
        tmp_path, run_dir, tiny_data_dir):
    """A run stopped in its first epoch is told to resume only when --resume can go on with it
    (runfiles.resumable): a checkpoint.npz with no config.yaml beside it cannot."""
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "checkpoint.npz").write_bytes((run_dir / "checkpoint.npz").read_bytes())
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.endswith(
        "no epoch finished yet; train at least one epoch first\n")


def test_a_run_without_a_model_says_where_a_killed_overwrite_left_the_old_run(
        tmp_path, run_dir, tiny_data_dir):
    """Its epochs done but no model.npz, beside the run a killed --overwrite put aside: the
    error says where that run is, as it does for a run with no epoch yet."""
    from gpumlp.runfiles import REPLACED

    for name in ("metrics.jsonl", "config.yaml", "checkpoint.npz"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    (tmp_path / REPLACED).mkdir()                   # the old run's files in it
    (tmp_path / REPLACED / "model.npz").write_bytes((run_dir / "model.npz").read_bytes())
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert (f"no model.npz; finish the run first (gpumlp train --resume {shell_path(tmp_path)})"
            in result.stderr)
    assert result.stderr.endswith(
        f"; {tmp_path / REPLACED} holds the run an --overwrite killed before its first "
        "checkpoint was replacing: move its files back into the folder to keep it\n")


def test_check_runs_error_does_not_chain_the_one_it_adds_to(tmp_path, run_dir):
    """check_run adds to read_metrics' error (where the old run is): the new one is raised
    alone, not 'during handling of' an error with the same message cut short."""
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="no epoch finished yet") as raised:
        check_run(tmp_path)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_a_run_with_only_its_metrics_lacks_both_files_a_resume_needs(tmp_path, run_dir,
                                                                       tiny_data_dir):
    (tmp_path / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.endswith(
        "no model.npz; it has no config.yaml or checkpoint.npz to resume from, so train it "
        f"again: gpumlp train --config FILE --out {shell_path(tmp_path)} --overwrite\n")


def test_a_file_named_like_the_aside_folder_is_not_said_to_hold_a_run(tmp_path, tiny_data_dir):
    """Only a folder REPLACED is where a killed --overwrite put the old run (aside_note)."""
    from gpumlp.runfiles import REPLACED

    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / REPLACED).write_text("not a run")
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.endswith(
        "no epoch finished yet; train at least one epoch first\n")


def test_a_model_file_given_for_the_run_folder_is_told_to_give_the_folder(run_dir, tiny_data_dir):
    result = invoke(report, run_dir / "model.npz", "--data-dir", tiny_data_dir)
    assert result.exit_code == 2 and result.stdout == ""     # (the gpumlp group prints this line
    assert result.stderr.endswith("\nError: Invalid value for 'RUN_DIR': "
                                  f"{shell_path(run_dir / 'model.npz')} is a file; give the "
                                  f"run's folder: {shell_path(run_dir)}\n")  # alone)


def test_the_resume_command_for_an_unfinished_run_pastes(tmp_path, run_dir, tiny_data_dir,
                                                          monkeypatch):
    """A folder named '-r un' is one word, and not an option: './-r un', quoted."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-r un").mkdir()
    for name in ("metrics.jsonl", "config.yaml", "checkpoint.npz"):
        (tmp_path / "-r un" / name).write_bytes((run_dir / name).read_bytes())
    result = invoke(report, "--data-dir", tiny_data_dir, "--device", "cpu", "--", "-r un")
    assert result.exit_code == 1
    assert result.stderr.strip().endswith("finish the run first (gpumlp train --resume './-r un')")


def test_a_folder_that_does_not_exist_is_named_as_missing(tmp_path, tiny_data_dir):
    missing = tmp_path / "nonexistent"
    result = invoke(report, missing, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"Error: {missing}: no such folder; give the folder of a run")
    assert "metrics.jsonl" not in result.stderr
    assert not missing.exists()                          # nothing made on the way
    with pytest.raises(ReportError, match="no such folder"):
        check_run(missing)


def copy_run(run_dir: Path, to: Path) -> Path:
    """The files a report is made from, copied into `to`."""
    for name in ("metrics.jsonl", "model.npz"):
        shutil.copyfile(run_dir / name, to / name)
    return to


GOOD = '{"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.5, "test_loss": 2.1, ' \
       '"test_accuracy": 0.4, "lr": 0.01, "seconds": 0.2}'


@pytest.mark.parametrize("lines, error", [
    ([GOOD, '{"epoch": 3}'],
     "line 2 lacks train_loss, train_accuracy, test_loss, test_accuracy, lr, seconds"),
    ([GOOD, "", "[1,2]"], "line 3 is a JSON list, not a metrics row"),
    ([GOOD, GOOD.replace('"test_accuracy": 0.4', '"test_accuracy": "high"')],
     'line 2: test_accuracy is "high", not a number'),
    ([GOOD.replace('"epoch": 1', '"epoch": 1.5')], "line 1: epoch is 1.5, not a whole number"),
    ([GOOD.replace('"lr": 0.01', '"lr": true')], "line 1: lr is true, not a number"),
    ([GOOD, GOOD, "{not json"], "line 3 is not JSON"),
    ([GOOD.replace("}", ', "val_loss": 2.0}')], "line 1 lacks val_accuracy"),
    ([GOOD, GOOD.replace("}", ', "val_loss": 2.0, "val_accuracy": 0.5}')],
     "line 2 has val_loss and val_accuracy, line 1 has not"),
    ([GOOD.replace('"epoch": 1', '"epoch": ' + "9" * 400)],
     "line 1: epoch is " + "9" * 57 + "..., not from 1 to 1,000,000,000"),
    ([GOOD, GOOD.replace('"epoch": 1', '"epoch": 0')], "line 2: epoch is 0, not from 1 to"),
    ([GOOD.replace('"test_loss": 2.1', '"test_loss": 1e308'),             # matplotlib's axis
      GOOD.replace('"test_loss": 2.1', '"test_loss": -1e308')],           # broke on these
     "line 1: test_loss is 1e+308, beyond any value a run writes"),
    ([GOOD, GOOD.replace('"epoch": 1', '"epoch": 2').replace('"test_accuracy": 0.4',
                                                           '"test_accuracy": 5')],
     "line 2: test_accuracy is 5, not a share from 0 to 1"),
    ([GOOD.replace('"train_accuracy": 0.5', '"train_accuracy": -0.1')],
     "line 1: train_accuracy is -0.1, not a share from 0 to 1"),
    ([GOOD.replace('"train_loss": 2.0', '"train_loss": -2.0')],
     "line 1: train_loss is -2.0, below 0, which no run writes"),
    ([GOOD.replace('"seconds": 0.2', '"seconds": -1')], "line 1: seconds is -1, below 0"),
    ([GOOD.replace('"epoch": 1', '"epoch": 2'), GOOD],
     "line 1 is epoch 2 where epoch 1 belongs (one row per epoch, in order)"),
    ([GOOD, GOOD], "line 2 is epoch 1 where epoch 2 belongs"),
    ([GOOD, "", GOOD.replace('"epoch": 1', '"epoch": 5')], "line 3 is epoch 5 where epoch 2"),
], ids=["epoch only", "a list", "a string", "fractional epoch", "a bool", "not JSON",
        "half a validation", "validation in one row", "epoch of 400 digits", "epoch 0",
        "loss of 1e308", "accuracy of 5", "negative accuracy", "negative loss",
        "negative seconds", "out of order", "an epoch twice", "a gap"])
def test_a_row_that_is_not_a_metrics_row_is_one_error_line_naming_it(
        run_dir, tiny_data_dir, tmp_path, lines, error):
    copy_run(run_dir, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + "\n")
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"Error: {metrics}: {error}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert metrics.read_text() == "\n".join(lines) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "model.npz"]
    assert "--resume" not in result.stderr       # no checkpoint here to rewrite the file from


def test_a_damaged_row_of_a_run_with_its_checkpoint_says_a_resume_rewrites_it(
        run_dir, tiny_data_dir, tmp_path):
    copy_run(run_dir, tmp_path)
    shutil.copyfile(run_dir / "checkpoint.npz", tmp_path / "checkpoint.npz")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"epoch": 1', '"epoch": 1.5'))
    result = invoke(report, tmp_path, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.stderr.rstrip().endswith("restore it or remove that line (gpumlp train "
                                           "--resume rewrites it from the run's checkpoint)")


def test_metrics_with_a_bom_or_a_line_separator_inside_a_string_are_read(run_dir, tmp_path):
    """An editor's BOM is no part of the first row; U+2028 inside a JSON string (a key someone
    added) is no line end; CRLF and CR line ends are line ends."""
    copy_run(run_dir, tmp_path)
    second = GOOD.replace('"epoch": 1', '"epoch": 2').replace("}", ', "note": "a\u2028b"}')
    for text in ("\ufeff" + GOOD + "\n" + second + "\n", GOOD + "\r\n" + second + "\r\n",
                 GOOD + "\r" + second):
        (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8", newline="")
        rows = check_run(tmp_path)
        assert [row["epoch"] for row in rows] == [1, 2], repr(text)


def test_a_metrics_file_that_is_no_regular_file_or_too_large_is_one_error_line(
        run_dir, tmp_path, monkeypatch):
    import gpumlp.report as report_module

    copy_run(run_dir, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    kept = metrics.read_bytes()
    monkeypatch.setattr(report_module, "MAX_METRICS_BYTES", len(kept) - 1)
    with pytest.raises(ReportError, match="metrics.jsonl: more than 0 MiB, more than a million"):
        check_run(tmp_path)
    metrics.unlink()
    metrics.symlink_to(tmp_path / "gone")
    with pytest.raises(ReportError, match="metrics.jsonl: not a regular file"):
        check_run(tmp_path)


def test_a_metrics_file_that_is_not_text_is_one_error_line(run_dir, tmp_path):
    copy_run(run_dir, tmp_path)
    (tmp_path / "metrics.jsonl").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ReportError, match="metrics.jsonl: not UTF-8 text"):
        check_run(tmp_path)


def test_the_report_replaces_its_own_files_but_not_others_unless_told(
        run_dir, tiny_data_dir, tmp_path):
    (tmp_path / "run").mkdir()
    run = copy_run(run_dir, tmp_path / "run")
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    (run / "report.md").symlink_to(notes)
    (run / FIGURES["confusion"]).write_text("not a picture")
    args = (run, "--data-dir", tiny_data_dir, "--device", "cpu")
    refused = invoke(report, *args)
    assert refused.exit_code == 1 and refused.stdout == ""
    assert refused.stderr == (f"Error: {run}: {FIGURES['confusion']}, report.md not marked as "
                              "made by gpumlp report (another program's, an older gpumlp's, or "
                              "changed since: the report would replace them); move them away, or "
                              "pass --overwrite\n")
    assert (run / FIGURES["confusion"]).read_text() == "not a picture"
    assert not (run / FIGURES["learning_curves"]).exists()
    assert invoke(report, *args, "--overwrite").exit_code == 0
    assert notes.read_text() == "my notes\n"          # the link is replaced, not followed
    assert not (run / "report.md").is_symlink()
    assert (run / "report.md").read_text().startswith(f"# Report: {run.name}\n")
    again = invoke(report, *args)                       # its own files: replaced without asking
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == sorted(
        ["metrics.jsonl", "model.npz", "report.md", *FIGURES.values()])


@pytest.mark.parametrize("edit", ["append", "change", "drop the seal"])
def test_a_report_md_edited_since_the_report_wrote_it_is_kept_unless_told(
        run_dir, tiny_data_dir, tmp_path, edit):
    """report.md ends in a seal, the hash of the text above it: notes added to it, a number
    changed, or the seal removed make it the user's, which the next report keeps (it replaced
    any report.md whose first line was the title)."""
    run = copy_run(run_dir, tmp_path)
    args = (run, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert invoke(report, *args).exit_code == 0
    written = (run / "report.md").read_bytes()
    assert written.startswith(REPORT_TITLE.encode()) and written.endswith(b" -->\n")
    assert invoke(report, *args).exit_code == 0             # its own, unedited: replaced
    body, seal = written[:written.rindex(b"<!--")], written[written.rindex(b"<!--"):]
    mine = {"append": body + b"\n## My notes\n" + seal,
            "change": body.replace(b"test accuracy", b"test accuracy (!)", 1) + seal,
            "drop the seal": body}[edit]
    (run / "report.md").write_bytes(mine)
    refused = invoke(report, *args)
    assert refused.exit_code == 1
    assert "report.md not marked as made by gpumlp report" in refused.stderr
    assert (run / "report.md").read_bytes() == mine
    assert invoke(report, *args, "--overwrite").exit_code == 0


def test_a_report_that_fails_while_drawing_writes_no_file(run_dir, tiny_data_dir, tmp_path,
                                                          monkeypatch):
    """All figures and report.md are made before any is written: a failure in the last figure
    left the first ones new beside the old report.md."""
    import gpumlp.report as report_module

    run = copy_run(run_dir, tmp_path)
    args = (run, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert invoke(report, *args).exit_code == 0
    # the inode too: a figure drawn again has the same bytes, but its write makes a new file
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in run.iterdir()}

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(report_module, "plot_mistakes", no_memory)
    failed = invoke(report, *args)
    assert failed.exit_code == 1 and "out of memory" in failed.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in run.iterdir()} == before


def test_a_disk_that_fills_while_the_report_is_written_changes_no_file(
        run_dir, tiny_data_dir, tmp_path, monkeypatch):
    """Every file is written in full before the first one replaces its old self: a disk full at
    the third figure left the first two new beside the old report.md."""
    run = copy_run(run_dir, tmp_path)
    args = (run, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert invoke(report, *args).exit_code == 0
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in run.iterdir()}
    real_fsync, synced = os.fsync, []

    def fills_at_the_third_file(fd):
        synced.append(fd)
        if len(synced) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fills_at_the_third_file)
    failed = invoke(report, *args)
    assert failed.exit_code == 1 and "No space left on device" in failed.stderr, failed.stderr
    assert len(synced) == 3
    # nothing replaced, and no temporary file left behind
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in run.iterdir()} == before


def test_a_users_own_png_under_a_figure_name_is_kept_and_the_reports_own_are_marked(
        run_dir, tiny_data_dir, tmp_path):
    """A real PNG of the user's (a digit saved as confusion_matrix.png) is no figure of the
    report's: refused without --overwrite, as a text file is. The report's own figures carry
    its mark in a text chunk, which is how it knows them."""
    run = copy_run(run_dir, tmp_path)
    Image.new("L", (28, 28), 0).save(run / FIGURES["confusion"])
    mine = (run / FIGURES["confusion"]).read_bytes()
    with pytest.raises(ReportError, match=f"{FIGURES['confusion']} not marked as made by gpumlp"):
        check_run(run)
    assert (run / FIGURES["confusion"]).read_bytes() == mine
    assert invoke(report, run, "--data-dir", tiny_data_dir, "--overwrite").exit_code == 0
    for name in FIGURES.values():
        head = (run / name).read_bytes()[:PNG_MARK_WITHIN]
        assert PNG_MARK in head, name
    check_run(run)                                      # all its own now: no refusal


def test_figures_of_a_report_made_before_the_mark_still_count_as_the_reports(run_dir,
                                                                            tmp_path):
    """They carry matplotlib's own text chunk where the mark now is: after an upgrade, report
    and train --overwrite replace them as before, not keep them as a user's pictures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = copy_run(run_dir, tmp_path)
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(run / FIGURES["confusion"], format="png")  # matplotlib's default metadata
    plt.close(fig)
    assert PNG_MARK not in (run / FIGURES["confusion"]).read_bytes()[:PNG_MARK_WITHIN]
    check_run(run)                                       # no refusal: the report's own


def test_a_folder_under_a_report_name_is_refused_even_with_overwrite(run_dir, tmp_path):
    copy_run(run_dir, tmp_path)
    (tmp_path / FIGURES["weights"]).mkdir()
    for overwrite in (False, True):
        with pytest.raises(ReportError, match=f"{FIGURES['weights']} is a folder"):
            check_run(tmp_path, overwrite)


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    without_module(monkeypatch, "matplotlib")
    assert_missing_extra(invoke(report, tmp_path), "report")


def test_a_backend_matplotlib_does_not_know_in_mplbackend_does_not_stop_the_report(
        tmp_path, monkeypatch):
    """matplotlib's import fails on MPLBACKEND=bogus (ValueError, a traceback before); the
    report never uses a backend, so the variable is set aside while matplotlib loads (a fresh
    process: here matplotlib is loaded already) and put back after."""
    import os
    import subprocess
    import sys

    from gpumlp.report import mplbackend_ignored

    env = {**os.environ, "MPLBACKEND": "bogus"}
    done = subprocess.run([sys.executable, "-m", "gpumlp", "report", str(tmp_path / "none")],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"Error: {tmp_path / 'none'}: no such folder"), done.stderr
    assert done.stderr.count("\n") == 1
    monkeypatch.setenv("MPLBACKEND", "bogus")
    with mplbackend_ignored():
        assert "MPLBACKEND" not in os.environ
    assert os.environ["MPLBACKEND"] == "bogus"


def report_in_a_fresh_process(run_dir: Path, tmp_path: Path, **env):
    """make_report on a copy of the run in tmp_path, in a new Python (matplotlib not loaded
    yet) with `env` added to the environment; the finished process."""
    import subprocess
    import sys

    copy_run(run_dir, tmp_path)
    code = ("import numpy as np, sys; from gpumlp.backend import CPU; from gpumlp.mnist import "
            "Split; from gpumlp.report import make_report; rng = np.random.default_rng(0); "
            "test = Split(rng.integers(0, 256, (40, 784), dtype=np.uint8), "
            "rng.integers(0, 10, 40).astype(np.uint8)); "
            "print(make_report(sys.argv[1], test, CPU)[-1].name)")
    return subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120, check=False)


def test_make_report_from_python_ignores_a_bad_mplbackend_too(run_dir, tmp_path):
    """The library, not only the command: make_report called in a fresh process."""
    done = report_in_a_fresh_process(run_dir, tmp_path, MPLBACKEND="bogus")
    assert (done.returncode, done.stdout) == (0, "report.md\n"), done.stderr


def test_a_config_folder_matplotlib_cannot_write_adds_nothing_to_stderr(run_dir, tmp_path):
    """matplotlib warned in two lines ("mkdir -p failed ...", "Matplotlib created a temporary
    cache directory ...") where its config folder cannot be written; the report is the same."""
    done = report_in_a_fresh_process(run_dir, tmp_path, MPLCONFIGDIR="/proc/nowhere")
    assert (done.returncode, done.stdout, done.stderr) == (0, "report.md\n", "")


def test_the_report_command_adds_nothing_to_stderr_where_matplotlib_cannot_write_its_folder(
        run_dir, mnist_dir, tmp_path):
    """The command imports matplotlib to check it is installed, before make_report: its two
    warning lines came from there."""
    import subprocess
    import sys

    copy_run(run_dir, tmp_path)
    done = subprocess.run([sys.executable, "-m", "gpumlp", "report", str(tmp_path), "--data-dir",
                           str(mnist_dir), "--device", "cpu"], capture_output=True, text=True,
                          env={**os.environ, "MPLCONFIGDIR": "/proc/nowhere"}, timeout=120,
                          check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.startswith("wrote ")


def test_a_train_that_starts_while_the_report_is_drawn_is_refused(run_dir, tiny_data_dir,
                                                                   tmp_path, monkeypatch):
    """The report checks that no train writes the run, then reads model.npz, draws for seconds
    and writes: a `train --out RUN --overwrite` started in between removed the old run and its
    report, and the report then wrote figures and a report.md of the old model (its accuracy,
    "the same as metrics.jsonl") into the new run. The report holds the run while it works."""
    import gpumlp.report as report_module
    from gpumlp.runfiles import RunLocked, lock_run

    run = copy_run(run_dir, tmp_path)
    plot_confusion, tried = report_module.plot_confusion, []

    def a_train_starts_now(*args):
        try:
            fd = lock_run(run, "--out")  # what `gpumlp train --out RUN --overwrite` takes first
        except RunLocked as e:
            tried.append(str(e))
        else:
            os.close(fd)
            tried.append("locked")
        plot_confusion(*args)

    monkeypatch.setattr(report_module, "plot_confusion", a_train_starts_now)
    result = invoke(report, run, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(tried) == 1 and tried[0] != "locked", tried
    assert "gpumlp report" in tried[0]  # the refusal says what holds the run


def test_report_md_says_the_models_own_count_and_when_it_differs_from_the_last_epoch():
    """A model.npz that is not the last epoch's (or another test set): report.md gives the
    model's own accuracy and says that it differs; the headline quotes metrics.jsonl's."""
    from gpumlp.report import markdown
    row = {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8125, "test_loss": 0.25,
           "test_accuracy": 0.9375, "lr": 0.1, "seconds": 1.0}
    labels = np.array([0, 1, 1, 0])
    out = SplitOutputs(labels, np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]]))
    counts = confusion_matrix(labels, out.predicted, 2)                       # 3 of 4 right
    text = markdown(Path("run"), [row], counts, out, confident_mistakes(out))
    assert ("After epoch 1: test accuracy 0.9375, test loss 0.2500, train accuracy 0.8125."
            in text)
    assert ("model.npz gets 3 of 4 test images right (accuracy 0.7500), which differs from "
            "the last epoch's test_accuracy in metrics.jsonl (0.9375): model.npz or the test "
            "set is not the one of the last epoch.") in text
    same = markdown(Path("run"), [{**row, "test_accuracy": 0.75}], counts, out, np.array([2]))
    assert "(accuracy 0.7500), the same as the last epoch's" in same
    validated = markdown(Path("run"), [{**row, "val_loss": 0.375, "val_accuracy": 0.875}],
                         counts, out, confident_mistakes(out))     # the numbers to tune on
    assert ("After epoch 1: validation accuracy 0.8750, test accuracy 0.9375, test loss 0.2500, "
            "train accuracy 0.8125." in validated)


def test_a_file_that_is_not_a_png_is_foreign_even_with_the_mark_inside(tmp_path):
    from gpumlp.report import foreign_outputs
    (tmp_path / FIGURES["confusion"]).write_bytes(b"notes " + PNG_MARK + b"\n")
    assert foreign_outputs(tmp_path) == [FIGURES["confusion"]]
