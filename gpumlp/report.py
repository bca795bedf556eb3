"""A run directory's report: four PNG figures and a report.md that shows them.

    learning_curves.png      loss and accuracy per epoch: train, validation (if any), test
    confusion_matrix.png     true class against predicted class on the test set
    first_layer_weights.png  W1's columns as 28x28 images, one tile per hidden unit
    confident_mistakes.png   the test images that get the highest probability on a wrong class

The curves come from metrics.jsonl; the other three from model.npz and the test images.
Figures are drawn with matplotlib's Agg canvas (no window, no pyplot state); the numbers
in report.md are those of metrics.jsonl (losses and accuracies with 4 decimals).

Each file is written whole (a temporary file renamed over the name). The report replaces its
own earlier files; a file under one of its names that it did not write (not a PNG, a
report.md that is not a report, a link) is kept unless `overwrite` says otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .backend import Backend
from .checkpoint import load_model, parse_json
from .errors import GpumlpError, folder_problem, shell_path, write_problem
from .files import read_at_most, run_held, writing_now
from .mnist import Split
from .model import params_on
from .npzio import TargetAppeared, atomic_write, atomic_write_all
from .predict import outputs
from .resume_state import start_over_in
from .runfiles import aside_note, resumable, summary_epochs

FIGURES = {
    "learning_curves": "learning_curves.png",
    "confusion": "confusion_matrix.png",
    "weights": "first_layer_weights.png",
    "mistakes": "confident_mistakes.png",
}
UNITS_SHOWN = 64     # hidden units in the weights grid (the first ones)
MISTAKES_SHOWN = 16  # images in the mistakes grid
DPI = 110
SPLITS = (("train", "train", "C0"), ("val", "validation", "C2"), ("test", "test", "C3"))
REPORT = "report.md"
REPORT_TITLE = "# Report: "  # report.md's first line
# report.md's last line: a report.md whose content above it has another hash was edited since
# the report wrote it (or is not a report): the next report keeps it unless told to overwrite
REPORT_SEAL = b"<!-- written by gpumlp report; sha256 of the text above: %s -->\n"
REPORT_SEAL_RE = re.compile(rb"<!-- written by gpumlp report; sha256 of the text above: "
                            rb"([0-9a-f]{64}) -->\n\Z")
MAX_REPORT_MD = 1 << 24  # 16 MiB: larger than any report.md gpumlp writes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The text chunk every figure of the report carries, right after the PNG's header: what tells
# the report's own figures from a user's PNG of the same name.
PNG_MARK = b"tEXtSoftware\x00gpumlp report"
PNG_MARK_WITHIN = 96  # bytes read from the start: the signature, the IHDR chunk, the mark
# Figures of reports made before the mark carry matplotlib's own text chunk there instead;
# they count as the report's too, so that a report (or train --overwrite) after an upgrade
# replaces them as before, though it keeps any PNG that no matplotlib wrote.
OLD_PNG_MARK = b"tEXtSoftware\x00Matplotlib version"
ROW_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr",
            "seconds")         # what every metrics.jsonl row must hold (samples_per_second unused)
VAL_KEYS = ("val_loss", "val_accuracy")  # in every row of a run with a validation split, or none
MAX_VALUE = 1e30  # no loss, accuracy, rate or time a run writes comes near; a plot's axis breaks
ROW_HINT = "metrics.jsonl is written by gpumlp train; restore it or remove that line"
REWRITTEN = " (gpumlp train --resume rewrites it from the run's checkpoint)"
MAX_METRICS_BYTES = 256 << 20  # a row is about 250 bytes: a million epochs


class ReportError(GpumlpError):
    """The run directory lacks what the report is made from."""


class SplitOutputs(NamedTuple):
    labels: np.ndarray              # (n,) true classes
    Z2: np.ndarray                  # (n, c) predicted probabilities
    A2: np.ndarray | None = None    # (n, c) logits: they pick the class, as evaluate's do

    @property
    def predicted(self) -> np.ndarray:
        return (self.A2 if self.A2 is not None else self.Z2).argmax(axis=1)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl, one per epoch, checked; a ReportError naming the line if not
    (and, where the run has its checkpoint, that a resume rewrites the file from it)."""
    try:
        return read_rows(run_dir)
    except ReportError as e:
        if ROW_HINT in str(e) and (run_dir / "checkpoint.npz").is_file():
            raise ReportError(f"{e}{REWRITTEN}") from None
        raise


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        if path.exists() or path.is_symlink():
            raise ReportError(f"{path}: not a regular file (a folder, a pipe, a device or a "
                              "broken link); put the run's metrics.jsonl back there")
        raise ReportError(f"{run_dir}: no metrics.jsonl; give the folder of a run "
                          "(gpumlp train --out DIR)")
    data = read_at_most(path, MAX_METRICS_BYTES)
    if data is None:
        raise ReportError(f"{path}: more than {MAX_METRICS_BYTES >> 20} MiB, more than a "
                          "million epochs' rows; restore the run's metrics.jsonl")
    try:  # a BOM an editor added is no part of the rows; lines end in \n, \r\n or \r
        lines = re.split(r"\r\n|\r|\n", data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not UTF-8 text; {ROW_HINT}") from None
    numbered = [(number, metrics_row(line, f"{path}: line {number}"))
                for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        how = (f"resume it for one: gpumlp train --resume {shell_path(run_dir)}"
               if resumable(run_dir) else "train at least one epoch first")
        raise ReportError(f"{path}: no epoch finished yet; {how}")
    first, first_row = numbered[0]
    for epoch, (number, row) in enumerate(numbered, start=1):
        if (VAL_KEYS[0] in row) != (VAL_KEYS[0] in first_row):
            has, lacks = (number, first) if VAL_KEYS[0] in row else (first, number)
            raise ReportError(f"{path}: line {has} has {' and '.join(VAL_KEYS)}, line {lacks} "
                              f"has not (the rows of one run hold the same keys); {ROW_HINT}")
        if row["epoch"] != epoch:  # one row per epoch, in order, as the run wrote them
            raise ReportError(f"{path}: line {number} is epoch {row['epoch']} where epoch "
                              f"{epoch} belongs (one row per epoch, in order); {ROW_HINT}")
    return [row for _, row in numbered]


MAX_EPOCH = 10 ** 9  # more epochs than any run has; a 400-digit epoch overflows the plot


def metrics_row(line: str, where: str) -> dict:
    """One line of metrics.jsonl as a dict of numbers; a ReportError saying what is wrong."""
    try:
        row = parse_json(line)
    except ValueError as e:
        raise ReportError(f"{where} is {e}; {ROW_HINT}") from None
    if not isinstance(row, dict):
        raise ReportError(f"{where} is a JSON {type(row).__name__}, not a metrics row (an object "
                          f"with {', '.join(ROW_KEYS)}); {ROW_HINT}")
    return check_row(row, where)


def check_row(row: dict, where: str) -> dict:
    """`row`, a metrics row as `gpumlp train` writes it (also in a checkpoint's record); a
    ReportError saying what is wrong."""
    missing = [key for key in ROW_KEYS if key not in row]
    if VAL_KEYS[0] in row or VAL_KEYS[1] in row:
        missing += [key for key in VAL_KEYS if key not in row]
    if missing:
        raise ReportError(f"{where} lacks {', '.join(missing)}; {ROW_HINT}")
    for key in ROW_KEYS + VAL_KEYS:
        value = row.get(key, 0)
        wanted = int if key == "epoch" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ReportError(f"{where}: {key} is {json_shown(value)}, not "
                              f"{'a whole number' if key == 'epoch' else 'a number'}; {ROW_HINT}")
        if key == "epoch" and not 1 <= value <= MAX_EPOCH:  # a plot's axis needs a float
            raise ReportError(f"{where}: epoch is {json_shown(value)}, not from 1 to "
                              f"{MAX_EPOCH:,}; {ROW_HINT}")
        if MAX_VALUE <= abs(value) < float("inf"):  # NaN and inf: a diverged run's, shown as such
            raise ReportError(f"{where}: {key} is {json_shown(value)}, beyond any value a run "
                              f"writes; {ROW_HINT}")
        if key.endswith("_accuracy") and not (0 <= value <= 1 or math.isnan(value)):
            raise ReportError(f"{where}: {key} is {json_shown(value)}, not a share from 0 to 1; "
                              f"{ROW_HINT}")
        if value < 0:  # a loss, a rate, a time
            raise ReportError(f"{where}: {key} is {json_shown(value)}, below 0, which no run "
                              f"writes; {ROW_HINT}")
    return row


def json_shown(value: object, limit: int = 60) -> str:
    """`value` as JSON for a one-line message, cut to `limit` characters."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        return "a value too deep or too long to show"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def foreign_outputs(run_dir: Path) -> list[str]:
    """The report's file names in `run_dir` taken by something the report did not write:
    a link, a folder, a .png without the report's mark (PNG_MARK), a report.md without its
    seal or edited since (REPORT_SEAL)."""
    names = []
    for name in [*FIGURES.values(), REPORT]:
        path = run_dir / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            names.append(name)
        elif path.is_file():
            if name.endswith(".png"):
                with open(path, "rb") as f:
                    head = f.read(PNG_MARK_WITHIN)
                ours = head.startswith(PNG_SIGNATURE) and (PNG_MARK in head
                                                           or OLD_PNG_MARK in head)
            else:
                data = read_at_most(path, MAX_REPORT_MD)
                ours = data is not None and is_sealed(data)
            if not ours:
                names.append(name)
    return names


def sealed(text: bytes) -> bytes:
    """report.md's bytes with its seal: the hash of `text` on a last line of its own."""
    text = text if text.endswith(b"\n") else text + b"\n"
    return text + REPORT_SEAL % hashlib.sha256(text).hexdigest().encode()


def is_sealed(data: bytes) -> bool:
    """Whether `data` ends in a seal whose hash is that of the text above it (not edited)."""
    seal = data[data.rfind(b"\n", 0, len(data) - 1) + 1:]
    match = REPORT_SEAL_RE.fullmatch(seal)
    body = data[:len(data) - len(seal)]
    return match is not None and match.group(1).decode() == hashlib.sha256(body).hexdigest()


Target = Path | io.BytesIO  # where a figure goes: its file, or a buffer


def save_figure(fig, path: Target) -> None:
    """The figure as a PNG at `path`, written whole (a link there is replaced, not followed),
    or into a buffer (make_report writes its files once all are drawn)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": "gpumlp report"})  # PNG_MARK
    if isinstance(path, io.BytesIO):
        path.write(buffer.getvalue())
    else:
        atomic_write(path, buffer.getvalue())


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, c: int = 10) -> np.ndarray:
    """counts[i, j] = test images of true class i predicted as j."""
    return np.bincount(labels.astype(np.int64) * c + predicted, minlength=c * c).reshape(c, c)


def confident_mistakes(out: SplitOutputs, count: int = MISTAKES_SHOWN) -> np.ndarray:
    """Indices of the wrong predictions with the highest predicted probability, highest first."""
    wrong = np.flatnonzero(out.predicted != out.labels)
    confidence = out.Z2[wrong, out.predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:count]]


@contextlib.contextmanager
def mplbackend_ignored():
    """matplotlib imported with MPLBACKEND out of the environment, where a name it does not know
    fails the import; the report draws on Agg canvases and never uses a backend."""
    saved = os.environ.pop("MPLBACKEND", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved


@contextlib.contextmanager
def matplotlib_quiet():
    """matplotlib's warnings through logging held back while it loads and draws: where its
    config folder cannot be written (a read-only HOME, MPLCONFIGDIR unusable) it says so in
    two lines on stderr and works on from a temporary folder, which changes nothing here."""
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def smoothing_note(smoothing: float, c: int, has_val: bool) -> str:
    """Why train_loss sits above test_loss (and val_loss) in a run with label smoothing e over
    c classes: its targets (1 - e) onehot + e / c have an entropy it cannot go below."""
    on, off = 1 - smoothing + smoothing / c, smoothing / c
    floor = -(on * np.log(on) + (c - 1) * off * np.log(off))
    evaluated, them = ("val_loss and test_loss are", "them") if has_val else ("test_loss is", "it")
    return (f"train_loss is the objective: the cross-entropy against targets smoothed by "
            f"train.label_smoothing {smoothing:g}, averaged over the epoch's steps; it cannot go "
            f"below {floor:.3f}, the entropy of those targets. {evaluated} the cross-entropy "
            "against the true labels, measured after each epoch, with no such floor: that is "
            f"why train_loss can sit above {them}.")


def plot_learning_curves(rows: list[dict], path: Target, smoothing: float = 0.0) -> None:
    """Loss and accuracy per epoch, one line per split; with label smoothing the train loss's
    legend says that it is against the smoothed targets."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(11, 4.2)
    epochs = [row["epoch"] for row in rows]
    for ax, metric, label in zip(fig.subplots(1, 2), ("loss", "accuracy"),
                                 ("mean cross-entropy loss", "accuracy (fraction correct)")):
        for key, name, colour in SPLITS:
            if f"{key}_{metric}" in rows[0]:
                if key == "train" and metric == "loss" and smoothing:
                    name = f"train (targets smoothed by {smoothing:g})"
                ax.plot(epochs, [row[f"{key}_{metric}"] for row in rows], marker="o",
                        color=colour, label=name)
        ax.set(title=f"{metric.capitalize()} per epoch", xlabel="epoch", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(set(epochs)) == 1:  # one epoch in view: the locator falls back to fractions
            ax.set_xticks(epochs[:1])
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_confusion(counts: np.ndarray, path: Target) -> None:
    fig = new_figure(7.5, 6.5)
    ax = fig.subplots()
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    c = counts.shape[0]
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    n, right = int(counts.sum()), int(np.trace(counts))
    ax.set(title=f"Confusion matrix, test set ({right} of {n} right, accuracy {right / n:.4f})",
           xlabel="predicted class", ylabel="true class", xticks=range(c), yticks=range(c))
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    save_figure(fig, path)


def plot_first_layer(W1: np.ndarray, path: Target, units: int = UNITS_SHOWN) -> None:
    """One 28x28 tile per hidden unit: its incoming weights, on one colour scale."""
    shown = W1[:, :units]                                           # (d, units)
    cols = int(np.ceil(np.sqrt(shown.shape[1])))
    rows = int(np.ceil(shown.shape[1] / cols))
    fig = new_figure(max(1.25 * cols + 1.4, 6.5), 1.3 * rows + 1.0)
    limit = float(np.percentile(np.abs(shown), 99.5)) or 1.0
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k < shown.shape[1]:
            image = ax.imshow(shown[:, k].reshape(28, 28), cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"unit {k + 1}", fontsize=8)
    fig.suptitle(f"First-layer weights W1, units 1-{shown.shape[1]} of {W1.shape[1]}\n"
                 "one tile per hidden unit: its 784 input weights as a 28x28 image")
    fig.supxlabel("pixel column (0-27 in each tile)")
    fig.supylabel("pixel row (0-27 in each tile)")
    fig.colorbar(image, ax=axes.tolist(), shrink=0.6, label="weight (red +, blue -)")
    save_figure(fig, path)


def plot_mistakes(images: np.ndarray, out: SplitOutputs, picked: np.ndarray,
                  path: Target) -> None:
    cols = 4
    rows = max(1, int(np.ceil(len(picked) / cols)))
    fig = new_figure(2.1 * cols, 2.3 * rows + 0.7)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, i in zip(axes, list(picked) + [None] * (len(axes) - len(picked))):
        ax.set(xticks=[], yticks=[])  # keep the frame: white paper needs an edge
        if i is None:
            ax.set_axis_off()
        else:
            guess = out.predicted[i]
            ax.imshow(images[i].reshape(28, 28), cmap="gray_r", vmin=0, vmax=255)
            ax.set_title(f"#{i}: true {out.labels[i]}, predicted {guess}\n"
                         f"p = {out.Z2[i, guess]:.3f}", fontsize=9)
    if not len(picked):
        axes[0].text(0.5, 0.5, "no test image is misclassified", ha="center", va="center")
    fig.suptitle("Test images the model gets most confidently wrong")
    fig.supxlabel("#test index: true label, predicted class; p = probability given to it")
    save_figure(fig, path)


def markdown(run_dir: Path, rows: list[dict], counts: np.ndarray, out: SplitOutputs,
             picked: np.ndarray, smoothing: float = 0.0) -> str:
    last = rows[-1]
    keys = ["train_loss", "train_accuracy"] + (["val_loss", "val_accuracy"] if "val_loss" in last
                                                else []) + ["test_loss", "test_accuracy"]
    right, n = int(np.trace(counts)), int(counts.sum())
    same = f"{right / n:.4f}" == f"{last['test_accuracy']:.4f}"
    agree = "the same as" if same else "which differs from"
    why = "" if same else ": model.npz or the test set is not the one of the last epoch"
    lines = [
        f"{REPORT_TITLE}{run_dir.name}", "",
        (f"After epoch {last['epoch']}: "
         + (f"validation accuracy {last['val_accuracy']:.4f}, " if "val_loss" in last else "")
         + f"test accuracy {last['test_accuracy']:.4f}, "
         f"test loss {last['test_loss']:.4f}, train accuracy {last['train_accuracy']:.4f}."), "",
        "## Learning curves", "", f"![learning curves]({FIGURES['learning_curves']})", "",
        "Per epoch, from metrics.jsonl:", "",
        *((smoothing_note(smoothing, counts.shape[0], "val_loss" in last), "")
          if smoothing else ()),
        "| epoch | " + " | ".join(keys) + " | lr | seconds |",
        "|---:|" + "---:|" * (len(keys) + 2),
        *(f"| {row['epoch']} | " + " | ".join(f"{row[k]:.4f}" for k in keys)
          + f" | {row['lr']:.4g} | {row['seconds']:.2f} |" for row in rows), "",
        "## Confusion matrix (test set)", "",
        (f"model.npz gets {right} of {n} test images right (accuracy {right / n:.4f}), {agree} "
         f"the last epoch's test_accuracy in metrics.jsonl ({last['test_accuracy']:.4f}){why}."),
        "",
        f"![confusion matrix]({FIGURES['confusion']})", "",
        "## First-layer weights", "",
        ("Each tile is one hidden unit's column of W1 reshaped to 28x28: red pixels push the "
         "unit up, blue ones down."), "", f"![first-layer weights]({FIGURES['weights']})", "",
        "## Most confidently wrong test images", "",
        f"![confident mistakes]({FIGURES['mistakes']})", "",
        "| test index | label | predicted | probability |", "|---:|---:|---:|---:|",
        *(f"| {i} | {out.labels[i]} | {out.predicted[i]} | {out.Z2[i, out.predicted[i]]:.4f} |"
          for i in picked), "",
    ]
    return "\n".join(lines)


def finish_hint(run_dir: Path) -> str:
    """How to get the model.npz of a run that lacks it: resume it where `gpumlp train
    --resume` can go on with it, else start it over (from its config.yaml and --init weights
    when it has them)."""
    if resumable(run_dir):
        return f"finish the run first (gpumlp train --resume {shell_path(run_dir)})"
    # not resumable: it lacks its config.yaml, or its checkpoint after training began
    lacks = [name for name in ("config.yaml", "checkpoint.npz") if not (run_dir / name).is_file()]
    if (run_dir / "config.yaml").is_file():
        how = start_over_in(run_dir)
    else:
        how = f"train it again: gpumlp train --config FILE --out {shell_path(run_dir)} --overwrite"
    return f"it has no {' or '.join(lacks)} to resume from, so {how}"


def check_run(run_dir: Path, overwrite: bool = False) -> list[dict]:
    """The metrics of a run that has finished an epoch and has its model.npz, once the report's
    file names are known to be free or the report's own (or `overwrite` says to replace them)."""
    what = folder_problem(run_dir)
    if what is not None:
        raise ReportError(f"{run_dir}: {what}; give the folder of a run, as written by "
                          "gpumlp train --out DIR")
    if writing_now(run_dir):  # its model and metrics are about to change
        raise ReportError(f"{run_dir}: a gpumlp train is writing this run now; make the report "
                          "when it ends")
    try:
        rows = read_metrics(run_dir)
        if not (run_dir / "model.npz").is_file():
            raise ReportError(f"{run_dir}: no model.npz; {finish_hint(run_dir)}")
        trained = summary_epochs(run_dir)
        if trained is not None and rows[-1]["epoch"] > trained:  # resumed, then stopped
            raise ReportError(f"{run_dir}: model.npz is the model of epoch {trained} "
                              f"(summary.json), but metrics.jsonl goes on to epoch "
                              f"{rows[-1]['epoch']}: the run was resumed and has not finished; "
                              f"{finish_hint(run_dir)}")
    except ReportError as e:  # the run a killed --overwrite put aside may be the one meant
        raise ReportError(f"{e}{aside_note(run_dir)}") from None
    why = write_problem(run_dir)
    if why is not None:
        raise ReportError(f"{run_dir}: cannot write the report there ({why}); make the folder "
                          "writable, or report on a copy of the run")
    foreign = foreign_outputs(run_dir)
    folders = [name for name in foreign
               if (run_dir / name).is_dir() and not (run_dir / name).is_symlink()]
    if folders:
        are, them = ("are folders", "them") if len(folders) > 1 else ("is a folder", "it")
        raise ReportError(f"{run_dir}: {', '.join(folders)} {are}, where the report writes "
                          f"files; move {them} out of the way")
    if foreign and not overwrite:
        it = "them" if len(foreign) > 1 else "it"
        raise ReportError(f"{run_dir}: {', '.join(foreign)} not marked as made by gpumlp "
                          f"report (another program's, an older gpumlp's, or changed since: the "
                          f"report would replace {it}); move {it} away, or pass --overwrite")
    return rows


def make_report(run_dir: str | Path, test: Split, backend: Backend,
                overwrite: bool = False) -> list[Path]:
    """Write the figures and report.md into `run_dir`; the paths written, report.md last.
    The run is held from the check to the last file (files.run_held): a `gpumlp train` that
    starts meanwhile is refused, where its new run would have got this report."""
    with run_held(run_dir):
        return write_report(Path(run_dir), test, backend, overwrite)


def write_report(run_dir: Path, test: Split, backend: Backend, overwrite: bool) -> list[Path]:
    """`make_report`'s work, once the run is held."""
    with matplotlib_quiet():
        return draw_and_write(run_dir, test, backend, overwrite)


def draw_and_write(run_dir: Path, test: Split, backend: Backend, overwrite: bool) -> list[Path]:
    """Check the run, draw the figures and the report in memory, then write them all."""
    rows = check_run(run_dir, overwrite)
    free = () if overwrite else {run_dir / name for name in (*FIGURES.values(), REPORT)
                                 if not os.path.lexists(run_dir / name)}  # kept free
    with mplbackend_ignored():  # loaded here, so that the drawing below never reads it
        import matplotlib  # noqa: F401
    params, config = load_model(run_dir / "model.npz")
    A2, Z2 = outputs(params_on(backend, params), config, test.images, backend,
                     str(run_dir / "model.npz"))
    out = SplitOutputs(test.labels.astype(np.int64), Z2, A2)
    counts = confusion_matrix(out.labels, out.predicted, Z2.shape[1])
    picked = confident_mistakes(out)
    paths = {key: run_dir / name for key, name in FIGURES.items()}
    drawn = {key: io.BytesIO() for key in FIGURES}  # all drawn before any file is written
    smoothing = config.train.label_smoothing
    plot_learning_curves(rows, drawn["learning_curves"], smoothing)
    plot_confusion(counts, drawn["confusion"])
    plot_first_layer(params.W[0], drawn["weights"])
    plot_mistakes(test.images, out, picked, drawn["mistakes"])
    report = run_dir / REPORT
    text = sealed(markdown(run_dir, rows, counts, out, picked, smoothing)
                  .encode("utf-8", "backslashreplace"))  # a folder name not UTF-8: legible
    # all or none: a full disk leaves the old report whole, never new figures beside it
    try:
        atomic_write_all({**{path: drawn[key].getvalue() for key, path in paths.items()},
                          report: text}, new=free)
    except TargetAppeared:
        if foreign_outputs(run_dir):  # another program's file: the user's to move
            raise
        raise ReportError(f"{run_dir}: another gpumlp report wrote its report there while this "
                          "one was being made; this one wrote nothing (run gpumlp report again "
                          "to make it anew)") from None
    return [*paths.values(), report]
