"""Commands that use a trained model: `predict`, `report`, `export`.

Each needs an optional dependency (Pillow, matplotlib, onnx); without it the command
stops with one line naming the extra to install. gpumlp.cli registers these commands;
import this module after (or through) gpumlp.cli, which it builds on.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_common import (OneLineError, OutFile, RunDir, UserPath, device_option, domain_errors,
                         load_mnist_for, model_argument, require, test_data_dir_option)
from .errors import CheckpointError, json_text, one_line, shell_path


def result_line(result, top_k: int, as_json: bool) -> str:
    if as_json:
        if result.error is not None:
            return json.dumps({"file": json_text(result.path), "error": json_text(result.error)})
        top = result.top(top_k)
        return json.dumps({"file": json_text(result.path), "prediction": top[0][0],
                           "top": [{"class": c, "probability": p} for c, p in top]})
    name = one_line(str(result.path))  # one line a file, as errors
    return f"{name}: " + "  ".join(f"{c} ({p:.3f})" for c, p in result.top(top_k))


@click.command(short_help="Predict the digit in PNG, JPEG or BMP images, or .npy arrays.")
@model_argument
@click.argument("files", metavar="FILE...", nargs=-1, required=True,
                type=UserPath(readable=False))  # each read on its own: predict says why
@click.option("--top-k", "top_k", default=3, show_default=True, type=click.IntRange(1, 10),
              help="How many classes to print per file, most probable first.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line: file, prediction, top (or error).")
@device_option
@domain_errors
def predict(model_path, files, top_k, as_json, device):
    """Predict the digit in image files (PNG, JPEG, BMP) or .npy arrays.

    Each image is laid out as MNIST's digits are: grayscale, inverted when the ink is darker
    than the paper, cropped to the ink, scaled to fit 20x20 and centred by mass in 28x28
    (docs/using-models.md).
    One line per file; a file that cannot be read gets an error line and the others are
    still predicted, and the exit code is then 1.

    \b
    Examples:
      gpumlp predict runs/h256/model.npz digit.png
      gpumlp predict runs/h256/model.npz scans/*.jpg --top-k 1 --json
    """
    require("PIL", "Pillow", "predict")
    from .backend import get_backend
    from .checkpoint import load_model
    from .model import params_on
    from .predict import predict_files

    try:
        params, config = load_model(model_path)
    except CheckpointError as e:
        if str(files[0]).lower().endswith(".npz"):          # predict digit.png model.npz
            swapped = (files[0], model_path, *files[1:])
            raise CheckpointError(f"{e}; the model comes first: gpumlp predict "
                                  f"{' '.join(shell_path(f) for f in swapped)}") from None
        raise
    backend = get_backend(device)
    results = predict_files(params_on(backend, params), config, files, backend, str(model_path))
    for result in results:
        if result.error is not None and not as_json:
            click.echo(f"Error: {result.error}", err=True)
        else:
            click.echo(result_line(result, top_k, as_json))
    failed = sum(result.error is not None for result in results)
    if failed and len(results) > 1:
        raise OneLineError(f"{failed} of {len(results)} files could not be predicted")
    if failed:  # one file: its own error line above is the whole message
        raise SystemExit(1)


@click.command()
@click.argument("run_dir", metavar="RUN_DIR", type=RunDir())
@click.option("--overwrite", is_flag=True,
              help="Replace files under the report's names that an earlier report did not write.")
@device_option
@test_data_dir_option
@domain_errors
def report(run_dir, overwrite, device, data_dir):
    """Write figures and report.md into a run directory.

    Learning curves (from metrics.jsonl), the test set's confusion matrix, the first
    layer's weights as images and the most confidently wrong test images (from model.npz).
    An earlier report's files are replaced; other files under those names only with
    --overwrite.

    \b
    Example:
      gpumlp report runs/h256
    """
    from .report import check_run, make_report, matplotlib_quiet, mplbackend_ignored

    with mplbackend_ignored(), matplotlib_quiet():  # its first import: quiet as make_report's
        require("matplotlib", "matplotlib", "report")
    from .backend import get_backend

    check_run(Path(run_dir), overwrite)  # before the test set is fetched
    backend = get_backend(device)
    test = load_mnist_for(data_dir, split="test")
    written = make_report(Path(run_dir), test, backend, overwrite)
    click.echo(f"wrote {', '.join(p.name for p in written)} in {run_dir}")


@click.command()
@model_argument
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="File format to write.")
@click.option("--out", type=OutFile(),
              help="Output file, ending in .onnx (default: MODEL with the suffix .onnx).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing .onnx output file (never a .npz, nor the model).")
@domain_errors
def export(model_path, fmt, out, overwrite):
    """Write a trained model.npz in another format: ONNX.

    The ONNX graph takes "pixels", float32 rows of 784 values scaled to [0, 1] (pixel / 255)
    of MNIST-style digits (predict's preprocessing of your own images is not in the graph:
    gpumlp.preprocess.load_digit does it), and gives "logits" and "probabilities" (softmax),
    10 per row. The output's name must end
    in .onnx, which keeps it off a run's own files (config.yaml, metrics.jsonl, ...); an
    existing output file is replaced only with --overwrite; a .npz file never is.

    \b
    Example:
      gpumlp export runs/h256/model.npz --format onnx --out mnist.onnx
    """
    if out is not None and not out.strip():  # "" would otherwise mean the default
        raise OneLineError(f"--out is empty; give a file name such as mnist.{fmt}, or leave "
                           f"--out out to write the model's name with .{fmt}", exit_code=2)
    if out and not Path(out).name.lower().endswith(f".{fmt}"):  # also keeps it off a run's files
        raise OneLineError(f"--out {out}: the output's name must end in .{fmt}, the format "
                           f"written; give --out a name such as mnist.{fmt}", exit_code=2)
    require("onnx", "onnx", "onnx")
    from .checkpoint import load_model
    from .export_onnx import (OPSET, check_size, check_target, check_usable, float32_params,
                              model_bytes)
    from .files import writing_now
    from .npzio import atomic_write

    folder = Path(model_path).parent
    if (folder / "config.yaml").is_file() and writing_now(folder):  # a run being resumed
        raise OneLineError(f"{model_path}: a gpumlp train is writing its run now (model.npz "
                           "at its end); export the model when the train ends")
    params, config = load_model(model_path)
    check_size(params, str(model_path))
    params = float32_params(params, str(model_path))
    check_usable(params, config, str(model_path))
    target = Path(out) if out else Path(model_path).with_suffix(f".{fmt}")
    check_target(target, Path(model_path), overwrite, named=bool(out))
    try:
        atomic_write(target, model_bytes(params, config), new=not overwrite)
    except OSError as e:
        named = f"--out {target}" if out else f"{target} (the default --out)"
        raise OneLineError(f"{named}: cannot write there ({e.strerror or e}); "
                           "pick a writable path with --out") from None
    click.echo(f"wrote {target} (ONNX opset {OPSET}; input 'pixels' = pixel/255, "
               f"outputs 'logits', 'probabilities')")
