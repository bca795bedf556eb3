"""`gpumlp export --format onnx`: onnxruntime, fed pixel/255, gives gpumlp's probabilities
(within 1e-5) and its predicted class, for 1 and 2 hidden layers and every activation."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest

from gpumlp.activations import ACTIVATIONS
from gpumlp.backend import CPU
from gpumlp.checkpoint import save_model
from gpumlp.cli_use import export
from gpumlp.errors import shell_path
from gpumlp.export_onnx import (INPUT, LOGITS, OPSET, PROBABILITIES, made_by_export,
                                model_bytes)
from gpumlp.mnist import load_mnist
from gpumlp.model import init_params
from gpumlp.predict import probabilities
from gpumlp.train import train
from use_helpers import assert_missing_extra, config_with, invoke, without_module

DEPTHS = {"1 hidden": "64", "2 hidden": "[64,32]"}


def run_onnx(model: bytes, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) from onnxruntime for uint8 pixel rows, fed as pixel/255."""
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    return tuple(session.run([LOGITS, PROBABILITIES],
                             {INPUT: pixels.astype(np.float32) / np.float32(255)}))


def assert_same_predictions(model: bytes, params, config, pixels: np.ndarray) -> None:
    expected = probabilities(params, config, pixels, CPU)
    _, got = run_onnx(model, pixels)
    assert got.shape == expected.shape == (len(pixels), 10)
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    assert np.abs(got - expected).max() < 1e-5


def random_model(hidden: str, **keys):
    config = config_with(model__hidden=hidden, **keys)
    widths = (784, *config.model.hidden_widths, 10)
    return init_params(widths, "he", np.random.default_rng(1), config.train.dtype), config


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("depth", DEPTHS)
def test_onnx_matches_gpumlp_on_random_weights_and_pixels(activation, depth):
    params, config = random_model(DEPTHS[depth], model__activation=activation)
    pixels = np.random.default_rng(2).integers(0, 256, size=(500, 784), dtype=np.uint8)
    assert_same_predictions(model_bytes(params, config), params, config, pixels)


@pytest.mark.parametrize("keys", [{"data__normalize": "standard"}, {"train__dtype": "float64"}],
                         ids=["standardised inputs", "float64 weights"])
def test_onnx_matches_gpumlp_with_standardised_inputs_and_float64_weights(keys):
    params, config = random_model("[32,16]", model__activation="tanh", **keys)
    pixels = np.random.default_rng(3).integers(0, 256, size=(500, 784), dtype=np.uint8)
    assert_same_predictions(model_bytes(params, config), params, config, pixels)


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_mnist(mnist_dir)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("depth", DEPTHS)
def test_onnx_matches_gpumlp_on_the_whole_mnist_test_set(mnist, activation, depth):
    config = config_with(model__hidden=DEPTHS[depth], model__activation=activation,
                         data__limit=2000, train__epochs=1)
    run = train(config, CPU, mnist)
    assert_same_predictions(model_bytes(run.params, config), run.params, config,
                            mnist.test.images)


def test_onnx_fed_load_digit_as_the_docs_show_gives_predicts_answer_for_a_drawing(mnist,
                                                                                    tmp_path):
    """predict's preprocessing is not in the graph: docs/using-models.md feeds the graph
    load_digit(path) / 255, which must give predict's probabilities for a dark-on-light
    drawing (where a plain resize gives nonsense)."""
    from PIL import Image

    from gpumlp.predict import predict_files
    from gpumlp.preprocess import load_digit

    config = config_with(model__hidden="64", data__limit=2000, train__epochs=1)
    run = train(config, CPU, mnist)
    page = np.full((120, 90), 250, np.uint8)
    page[20:100, 40:52] = 20                                   # a dark stroke: a "1"
    Image.fromarray(page).save(tmp_path / "one.png")
    [expected] = predict_files(run.params, config, [tmp_path / "one.png"], CPU)
    session = onnxruntime.InferenceSession(model_bytes(run.params, config),
                                           providers=["CPUExecutionProvider"])
    pixels = load_digit(tmp_path / "one.png").reshape(1, 784).astype(np.float32) / 255
    got = session.run([PROBABILITIES], {INPUT: pixels})[0][0]
    assert got.argmax() == expected.probabilities.argmax() == 1
    assert np.abs(got - expected.probabilities).max() < 1e-5


def test_the_command_writes_a_checked_onnx_file(tmp_path):
    params, config = random_model("[16,8]", model__activation="gelu")
    save_model(tmp_path / "model.npz", params, config)
    result = invoke(export, tmp_path / "model.npz", "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {tmp_path / 'model.onnx'} ")
    model = onnx.load(tmp_path / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import] == [OPSET]
    assert [i.name for i in model.graph.input] == [INPUT]
    assert [o.name for o in model.graph.output] == [LOGITS, PROBABILITIES]
    assert {"MatMul", "Add", "Sigmoid", "Softmax"} <= {node.op_type for node in model.graph.node}
    pixels = np.random.default_rng(4).integers(0, 256, size=(50, 784), dtype=np.uint8)
    assert_same_predictions((tmp_path / "model.onnx").read_bytes(), params, config, pixels)
    assert invoke(export, tmp_path / "model.npz", "--out", tmp_path / "b.onnx").exit_code == 0
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()


def test_made_by_export_knows_gpumlps_onnx_files_from_their_first_bytes(tmp_path):
    """What `train --overwrite` removes with the run it replaces: a model.onnx that `gpumlp
    export` wrote (its producer is gpumlp), never another file under that name."""
    params, config = random_model("8")
    ours = tmp_path / "ours.onnx"
    ours.write_bytes(model_bytes(params, config))
    model = onnx.load(ours)
    model.ir_version = 300                             # a varint of two bytes before the mark
    (tmp_path / "later.onnx").write_bytes(model.SerializeToString())
    model.producer_name = "pytorch"
    (tmp_path / "other.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "text.onnx").write_text("my own onnx")
    (tmp_path / "cut.onnx").write_bytes(ours.read_bytes()[:6])
    (tmp_path / "link.onnx").symlink_to(ours)
    (tmp_path / "folder.onnx").mkdir()
    assert made_by_export(ours) and made_by_export(tmp_path / "later.onnx")
    for name in ("other", "text", "cut", "link", "folder", "missing"):
        assert not made_by_export(tmp_path / f"{name}.onnx"), name


def test_a_file_that_is_not_a_model_and_an_unknown_format_are_refused(tmp_path):
    (tmp_path / "notes.npz").write_text("hello")
    result = invoke(export, tmp_path / "notes.npz")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert invoke(export, tmp_path / "notes.npz", "--format", "tflite").exit_code == 2
    assert not (tmp_path / "notes.onnx").exists()


def test_weights_too_large_for_one_onnx_file_are_refused_before_any_work(saved, monkeypatch):
    """protobuf writes at most 2 GiB: a larger model failed after a minute with a traceback."""
    import gpumlp.export_onnx as export_onnx
    params, _ = random_model("8")
    size = 4 * sum(a.size for a in (*params.W, *params.b))          # 6,370 float32 values
    monkeypatch.setattr(export_onnx, "ONNX_MAX_BYTES", size + export_onnx.GRAPH_MARGIN)
    assert invoke(export, saved / "model.npz", "--out", saved / "fits.onnx").exit_code == 0
    monkeypatch.setattr(export_onnx, "ONNX_MAX_BYTES", size + export_onnx.GRAPH_MARGIN - 1)
    monkeypatch.setattr(export_onnx, "onnx_model", lambda *a: pytest.fail("built the graph"))
    result = invoke(export, saved / "model.npz")
    assert_refused(result, f"{saved / 'model.npz'}: 0.00 GiB of weights as float32, more than "
                   "the 2 GiB an ONNX file can hold; export a smaller model")
    assert not (saved / "model.onnx").exists()


def test_without_onnx_the_error_names_the_extra(tmp_path, monkeypatch):
    without_module(monkeypatch, "onnx")
    assert_missing_extra(invoke(export, tmp_path / "model.npz"), "onnx")


@pytest.fixture
def saved(tmp_path):
    """A run folder with model.npz and checkpoint.npz; returns the folder."""
    params, config = random_model("8")
    save_model(tmp_path / "model.npz", params, config)
    shutil.copyfile(tmp_path / "model.npz", tmp_path / "checkpoint.npz")
    return tmp_path


def assert_refused(result, fragment: str) -> None:
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("named", [False, True])
def test_a_target_that_cannot_be_written_names_the_path_and_where_it_came_from(saved, named,
                                                                              monkeypatch):
    import gpumlp.npzio as npzio

    def refused(path, data, **kwargs):                   # what a read-only folder does
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(npzio, "atomic_write", refused)
    target = saved / ("mine.onnx" if named else "model.onnx")
    out = ["--out", str(target)] if named else []
    result = invoke(export, saved / "model.npz", *out)
    where = f"--out {target}" if named else f"{target} (the default --out)"
    assert_refused(result, f"Error: {where}: cannot write there (Permission denied); pick a "
                   "writable path with --out")


@pytest.mark.parametrize("out", ["model-copy.onnx", "link.onnx", "with-notes.onnx"])
@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)], ids=["", "--overwrite"])
def test_the_model_and_npz_files_are_never_written_over(saved, out, overwrite):
    import zipfile

    shutil.copyfile(saved / "model.npz", saved / "model-copy.onnx")   # a .npz by its content
    (saved / "link.onnx").symlink_to(saved / "model.npz")
    shutil.copyfile(saved / "model.npz", saved / "with-notes.onnx")   # and a note beside its
    with zipfile.ZipFile(saved / "with-notes.onnx", "a") as zf:       # arrays: still a .npz
        zf.writestr("README.txt", "my model")
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    result = invoke(export, saved / "model.npz", "--out", saved / out, *overwrite)
    assert_refused(result, f"--out {saved / out}: ")
    assert "model being exported" in result.stderr or "never writes" in result.stderr
    if out == "model-copy.onnx":  # its name already ends in .onnx: the advice says so
        assert "whatever its name; give --out another name ending in .onnx" in result.stderr
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert (saved / "link.onnx").is_symlink()


@pytest.mark.parametrize("out", ["model.npz", "checkpoint.npz", "new.npz", "config.yaml",
                                 "metrics.jsonl", "summary.json", "report.md",
                                 "learning_curves.png", "model.onnx.bak", "onnx"])
@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)], ids=["", "--overwrite"])
def test_an_out_not_named_onnx_is_a_usage_error_and_the_run_is_untouched(saved, out, overwrite):
    """An export over a run's config.yaml would break `train --resume`: only *.onnx is written."""
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md",
                 "learning_curves.png"):
        (saved / name).write_text(f"the run's {name}")
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    result = invoke(export, saved / "model.npz", "--out", saved / out, *overwrite)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert f"--out {saved / out}: the output's name must end in .onnx" in result.stderr
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_is_a_usage_error_not_the_default(saved, out):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    result = invoke(export, saved / "model.npz", "--out", out)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("Error: --out is empty; give a file name such as mnist.onnx, or "
                             "leave --out out to write the model's name with .onnx\n")
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_an_out_ending_in_a_slash_is_a_usage_error_not_a_file_of_that_name(saved):
    """`--out x.onnx/` means a folder: Path would drop the '/' and write the file x.onnx."""
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    from test_cli import assert_one_error_line, cli
    out = f"{saved / 'x.onnx'}/"
    assert_one_error_line(cli("export", saved / "model.npz", "--out", out), 2,
                          f"{shell_path(out)} ends in '/', the name of a folder")
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_an_out_named_onnx_in_any_case_is_written(saved):
    result = invoke(export, saved / "model.npz", "--out", saved / "Model.ONNX")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(saved / "Model.ONNX"), full_check=True)


def test_an_existing_file_is_replaced_only_with_overwrite(saved):
    notes = saved / "notes.onnx"
    notes.write_text("keep me")
    result = invoke(export, saved / "model.npz", "--out", notes)
    assert_refused(result, f"--out {notes}: already exists; pass --overwrite")
    assert notes.read_text() == "keep me"
    assert invoke(export, saved / "model.npz", "--out", notes, "--overwrite").exit_code == 0
    onnx.checker.check_model(onnx.load(notes), full_check=True)


def test_a_file_one_may_not_read_is_still_replaced_with_overwrite(saved, monkeypatch):
    """Replacing needs no read right: click's readable check refused it, 'is not readable'."""
    target = saved / "write-only.onnx"
    target.write_text("old")
    target.chmod(0o200)
    access = os.access                                    # as for a user who is not root
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if os.fspath(path) == str(target) and mode & os.R_OK else access(path, mode, **kw)))
    result = invoke(export, saved / "model.npz", "--out", target)
    assert_refused(result, f"--out {target}: already exists; pass --overwrite")
    assert invoke(export, saved / "model.npz", "--out", target, "--overwrite").exit_code == 0
    assert target.stat().st_mode & 0o777 == 0o600              # its owner may read what it got
    onnx.checker.check_model(onnx.load(target), full_check=True)


def test_the_default_output_is_not_replaced_without_overwrite(saved):
    assert invoke(export, saved / "model.npz").exit_code == 0
    (saved / "model.onnx").write_bytes(b"an older export")
    result = invoke(export, saved / "model.npz")
    assert_refused(result, f"{saved / 'model.onnx'} (the default --out): already exists")
    assert (saved / "model.onnx").read_bytes() == b"an older export"
    assert invoke(export, saved / "model.npz", "--overwrite").exit_code == 0
    onnx.checker.check_model(onnx.load(saved / "model.onnx"), full_check=True)


def test_a_folder_at_the_default_output_is_refused_even_with_overwrite(saved):
    (saved / "model.onnx").mkdir()
    result = invoke(export, saved / "model.npz", "--overwrite")
    assert_refused(result, "exists and is not a plain file")
    assert (saved / "model.onnx").is_dir()
