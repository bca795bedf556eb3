"""Damaged or hostile input files: one error line (exit 1), never a traceback, never memory
spent on what a file only claims to hold, and nothing written.

The hostile files are small and built here: headers that lie about their size, zip entries
patched to claim encryption or an unknown compression method, JSON nested 100,000 levels deep.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import struct
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from use_helpers import config_with, invoke

from gpumlp.backend import CPU
from gpumlp.checkpoint import load_init, load_model, save_model
from gpumlp.cli import evaluate, train
from gpumlp.cli_use import export, predict, report
from gpumlp.config import build_config
from gpumlp.errors import CheckpointError, shell_path
from gpumlp.model import init_params
from gpumlp.npzio import load_npz
from gpumlp.preprocess import ImageError, read_gray
from gpumlp.train import Interrupted
from gpumlp.train import train as run_training

DEEP_JSON = "[" * 100_000 + "]" * 100_000
LONG_NUMBER = "9" * 5000  # Python reads at most 4,300 digits into an int


@pytest.fixture(scope="module")
def model_arrays(tmp_path_factory) -> dict[str, np.ndarray]:
    """The arrays of a small untrained float32 model.npz (hidden 16), config included."""
    path = tmp_path_factory.mktemp("model") / "model.npz"
    config = build_config(None, ["model.hidden=16"])
    save_model(path, init_params((784, 16, 10), "he", np.random.default_rng(0)), config)
    with np.load(path) as npz:
        return {name: npz[name] for name in npz.files}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def lying_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    """A version 1.0 .npy header announcing `shape` (no data follows)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    text = text.ljust(118) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def write_npz(path: Path, members: dict[str, bytes],
              compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def model_members(arrays: dict[str, np.ndarray], **replaced: np.ndarray) -> dict[str, bytes]:
    return {f"{name}.npy": npy_bytes(value) for name, value in {**arrays, **replaced}.items()}


def assert_one_error(result, *fragments: str) -> str:
    """Exit 1, nothing on stdout, one "Error: " line holding `fragments`; that line."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- JSON: nesting and numbers Python refuses to read -------------------------------------

@pytest.mark.parametrize("config, reason", [
    (DEEP_JSON, "JSON nested too deeply"),
    ('{"model": {"hidden": ' + LONG_NUMBER + "}}", "JSON with a number too long to read"),
    ('{"model" 1}', "not JSON: Expecting ':' delimiter (character 10)"),
], ids=["nested", "long number", "not JSON"])
def test_a_model_config_python_cannot_read_is_one_error_line(model_arrays, tmp_path, config,
                                                            reason):
    path = tmp_path / "model.npz"
    np.savez(path, **{**model_arrays, "config": np.array(config)})
    for command in (evaluate, predict):
        args = [path] if command is evaluate else [path, tmp_path / "digit.png"]
        result = invoke(command, *args, "--device", "cpu")
        assert_one_error(result, f"{path}: its config is invalid ({reason}); not a gpumlp "
                         "model file")


@pytest.mark.parametrize("key, value, reason", [
    ("hidden", -3, "config key 'model.hidden' must be a width from 1 to 2^40 or a non-empty "
                   "list of them, got -3"),
    ("activation", "swish", "config key 'model.activation' must be one of relu, leaky_relu, "
                            "sigmoid, tanh, gelu, got 'swish'"),
], ids=["hidden", "activation"])
def test_a_model_config_of_values_gpumlp_refuses_is_one_error_line(model_arrays, tmp_path, key,
                                                                  value, reason):
    """JSON that reads, naming a net gpumlp cannot build: the config's own check says why."""
    config = json.loads(str(model_arrays["config"]))
    config["model"][key] = value
    path = tmp_path / "model.npz"
    np.savez(path, **{**model_arrays, "config": np.array(json.dumps(config))})
    for command in (evaluate, predict):
        args = [path] if command is evaluate else [path, tmp_path / "digit.png"]
        result = invoke(command, *args, "--device", "cpu")
        assert_one_error(result, f"{path}: its config is invalid ({reason})")


@pytest.mark.parametrize("line, reason", [
    (DEEP_JSON, "is JSON nested too deeply"),
    ('{"epoch": 1, "lr": ' + LONG_NUMBER + "}", "is JSON with a number too long to read"),
], ids=["nested", "long number"])
def test_a_metrics_row_python_cannot_read_is_one_error_line(tmp_path, line, reason):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(line + "\n")
    result = invoke(report, tmp_path, "--device", "cpu")
    assert_one_error(result, f"{metrics}: line 1 {reason}; ")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


# --- .npz archives ------------------------------------------------------------------------

def patched_entries(data: bytes, field: str) -> bytes:
    """The zip archive `data` with every entry, local and central header, marked encrypted
    (field "encrypted") or compressed by the unknown method 99 (field "method")."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos, central = zf.infolist(), zf.start_dir
    out = bytearray(data)
    local_at, central_at = {"encrypted": (6, 8), "method": (8, 10)}[field]

    def patch(at: int) -> None:
        value = struct.unpack_from("<H", out, at)[0] | 1 if field == "encrypted" else 99
        struct.pack_into("<H", out, at, value)

    for info in infos:
        patch(info.header_offset + local_at)
        patch(central + central_at)
        name, extra, comment = struct.unpack_from("<HHH", out, central + 28)
        central += 46 + name + extra + comment
    return bytes(out)


@pytest.mark.parametrize("field, reason", [
    ("encrypted", "member 'W1.npy' is encrypted"),
    ("method", "member 'W1.npy': unsupported compression method"),
])
def test_an_encrypted_or_unknown_compression_member_is_not_a_readable_npz(model_arrays, tmp_path,
                                                                         field, reason):
    good = write_npz(tmp_path / "good.npz", model_members(model_arrays)).read_bytes()
    path = tmp_path / "model.npz"
    path.write_bytes(patched_entries(good, field))
    with pytest.raises(CheckpointError, match="not a readable .npz file"):
        load_npz(path)
    assert_one_error(invoke(evaluate, path, "--device", "cpu"),
                     f"{path}: not a readable .npz file ({reason})")
    assert path.read_bytes() == patched_entries(good, field)


def test_a_member_whose_header_claims_more_data_than_it_holds_is_refused_unread(model_arrays,
                                                                               tmp_path):
    members = model_members(model_arrays)
    members["x.npy"] = lying_header((1_000_000, 1_000_000))        # 8 TB announced, none held
    path = write_npz(tmp_path / "model.npz", members)
    assert_one_error(invoke(evaluate, path, "--device", "cpu"),
                     f"{path}: not a readable .npz file (damaged: the header of member 'x.npy' "
                     "announces 8,000,000,000,000 bytes", "the member holds 0)")
    with pytest.raises(CheckpointError, match="damaged"):
        load_npz(path)


def test_a_member_larger_than_its_array_is_refused(model_arrays, tmp_path):
    members = model_members(model_arrays)
    members["padding.npy"] = npy_bytes(np.zeros(1)) + bytes(4 * 2**20)  # 4 MiB after the array
    path = write_npz(tmp_path / "model.npz", members, zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"damaged: .* member 'padding.npy' announces 8 "
                                              r"bytes .*; the member holds 4,194,312\)"):
        load_model(path)


def test_a_model_reads_only_the_members_its_config_needs(model_arrays, tmp_path):
    members = model_members(model_arrays)
    members["padding.npy"] = npy_bytes(np.zeros(2**22))                # 32 MiB, well-formed
    path = write_npz(tmp_path / "model.npz", members, zipfile.ZIP_DEFLATED)
    tracemalloc.start()
    try:
        params, _ = load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(params.W[0], model_arrays["W1"])
    assert peak < 8 * 2**20, f"{peak:,} bytes traced: the padding member was read"


def test_members_not_named_npy_are_left_out_and_a_false_npy_is_still_refused(
        model_arrays, tmp_path, tiny_data_dir):
    """A README.txt added to a model or an --init is not an array: ignored, as numpy.load
    ignores it; a member named x.npy that holds no .npy array is refused as before."""
    notes = {"README.txt": b"trained on MNIST\n", "notes/": b""}
    weights = {k: v for k, v in model_arrays.items() if k != "config"}
    model = write_npz(tmp_path / "model.npz", {**model_members(model_arrays), **notes})
    init = write_npz(tmp_path / "init.npz", {**model_members(weights), **notes})
    assert list(load_npz(model)) == list(model_arrays)
    np.testing.assert_array_equal(load_model(model)[0].W[1], model_arrays["W2"])
    np.testing.assert_array_equal(load_init(init, (784, 16, 10), "float32").b[0],
                                  model_arrays["b1"])
    result = invoke(evaluate, model, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 0 and "test_accuracy" in result.stdout, result.output
    run = tmp_path / "run"
    result = invoke(train, "--init", init, "--set", "model.hidden=16", "--set", "train.epochs=1",
                    "--device", "cpu", "--data-dir", tiny_data_dir, "--out", run, "--quiet")
    assert result.exit_code == 0 and (run / "model.npz").is_file(), result.output

    false = write_npz(tmp_path / "false.npz", {**model_members(weights), "x.npy": b"notes\n"})
    reason = f"{false}: not a readable .npz file (member 'x.npy': not a .npy array)"
    with pytest.raises(CheckpointError) as info:
        load_init(false, (784, 16, 10), "float32")
    assert str(info.value) == reason
    result = invoke(train, "--init", false, "--set", "model.hidden=16", "--device", "cpu",
                    "--data-dir", tiny_data_dir, "--out", tmp_path / "run2")
    assert_one_error(result, reason)
    assert not (tmp_path / "run2").exists()


def test_good_files_load_as_numpy_loads_them(tmp_path):
    arrays = {"W": np.arange(12.0).reshape(3, 4), "fortran": np.asfortranarray(
                  np.arange(6, dtype=">i4").reshape(2, 3)),
              "config": np.array("héllo"), "empty": np.zeros((0, 5), np.float32),
              "record": np.zeros(3, dtype=[("x", "<f4"), ("y", "u1")]),
              "half": np.ones(2, np.float16)}
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        path = write_npz(tmp_path / f"{compression}.npz",
                         {f"{k}.npy": npy_bytes(v) for k, v in arrays.items()}, compression)
        loaded = load_npz(path)
        with np.load(path) as expected:
            assert list(loaded) == expected.files
            for name in expected.files:
                assert loaded[name].dtype == expected[name].dtype
                assert loaded[name].shape == expected[name].shape
                assert loaded[name].flags.f_contiguous == expected[name].flags.f_contiguous
                assert loaded[name].tobytes() == expected[name].tobytes()


# --- weights that do not fit the config's dtype -------------------------------------------

def test_float64_weights_beyond_float32_are_refused_not_turned_infinite(model_arrays, tmp_path,
                                                                        tiny_data_dir):
    path = tmp_path / "model.npz"
    np.savez(path, **{**model_arrays, "W1": model_arrays["W1"].astype(np.float64) * 1e300})
    digit = tmp_path / "digit.npy"
    np.save(digit, np.eye(28, dtype=np.uint8) * 255)
    message = f"{path}: W1 holds values up to "
    for args in ([evaluate, path, "--data-dir", tiny_data_dir], [predict, path, digit]):
        assert_one_error(invoke(*args, "--device", "cpu"), message, "do not fit float32")
    assert_one_error(invoke(export, path), message, "do not fit float32")
    assert not (tmp_path / "model.onnx").exists()


def test_a_float64_model_beyond_float32_is_not_exported_as_infinite_weights(tmp_path):
    """A float64 run's model loads as float64 (evaluate and predict use it so); the ONNX graph
    holds float32, where 1e100 is infinite and every output NaN: refused, nothing written."""
    pytest.importorskip("onnx")
    path = tmp_path / "model.npz"
    config = build_config(None, ["model.hidden=16", "train.dtype=float64"])
    params = init_params((784, 16, 10), "he", np.random.default_rng(0), "float64")
    save_model(path, params._replace(W=(params.W[0] * 1e100, params.W[1])), config)
    assert_one_error(invoke(export, path), f"{path}: W1 holds values up to ",
                     "do not fit float32; the ONNX graph stores float32 weights")
    assert not (tmp_path / "model.onnx").exists()


def test_a_float64_model_that_fits_float32_but_overflows_there_is_not_exported(tmp_path):
    """W1 of 1e37 fits float32, but the graph computes in float32, where the logits overflow
    to NaN probabilities: refused as evaluate and predict refuse such weights."""
    pytest.importorskip("onnx")
    path = tmp_path / "model.npz"
    config = build_config(None, ["model.hidden=16", "train.dtype=float64"])
    params = init_params((784, 16, 10), "he", np.random.default_rng(0), "float64")
    save_model(path, params._replace(W=(np.sign(params.W[0]) * 1e37, params.W[1])), config)
    assert_one_error(invoke(export, path), f"{path}: its weights are finite but too large to use")
    assert not (tmp_path / "model.onnx").exists()


def test_init_weights_beyond_float32_are_refused(model_arrays, tmp_path, tiny_data_dir):
    init = tmp_path / "init.npz"
    weights = {k: v for k, v in model_arrays.items() if k != "config"}
    np.savez(init, **{**weights, "b2": np.full(10, 1e300)})
    result = invoke(train, "--init", init, "--set", "model.hidden=16", "--device", "cpu",
                    "--data-dir", tiny_data_dir, "--out", tmp_path / "run")
    assert_one_error(result, f"{init}: b2 holds values up to 1e+300, which do not fit float32",
                     "train.dtype=float64")
    assert not (tmp_path / "run").exists()


def test_finite_weights_too_large_to_use_are_one_error_line_not_nan_results(
        model_arrays, tmp_path, tiny_data_dir):
    path = tmp_path / "model.npz"  # float32 and finite, but Z1 overflows to inf, Z2 to inf - inf
    np.savez(path, **{**model_arrays, "W1": np.sign(model_arrays["W1"]) * np.float32(3e38)})
    digit = tmp_path / "digit.npy"
    np.save(digit, np.eye(28, dtype=np.uint8) * 255)
    message = f"{path}: its weights are finite but too large to use"
    for args in ([evaluate, path, "--data-dir", tiny_data_dir], [predict, path, digit, "--json"]):
        line = assert_one_error(invoke(*args, "--device", "cpu"), message, "lower optim.lr")
        assert "NaN" not in line.split(":")[0]
    if importlib.util.find_spec("onnx") is not None:  # nor an ONNX graph of NaN outputs
        assert_one_error(invoke(export, path), message, "lower optim.lr")
        assert not (tmp_path / "model.onnx").exists()
    run = tmp_path / "run"
    result = invoke(train, "--init", path, "--set", "model.hidden=16", "--device", "cpu",
                    "--data-dir", tiny_data_dir, "--out", run)
    assert_one_error(result, "the --init weights are finite but too large to use: their loss on "
                     "the first 100 training examples is nan", "start from other weights")
    assert not run.exists()


def test_init_weights_with_a_finite_but_huge_loss_name_init_not_the_rate(
        model_arrays, tmp_path, tiny_data_dir):
    """W1 * 1e20: the loss is finite (about 1e19), and used to pass the --init check, then
    fail the first epoch with advice to lower optim.lr, which could not help."""
    path = tmp_path / "big.npz"
    np.savez(path, **{**model_arrays, "W1": model_arrays["W1"] * np.float32(1e20)})
    run = tmp_path / "run"
    result = invoke(train, "--init", path, "--set", "model.hidden=16", "--device", "cpu",
                    "--data-dir", tiny_data_dir, "--out", run)
    line = assert_one_error(result, "the --init weights are finite but too large to use: their "
                            "loss on the first 100 training examples is ",
                            "(above 230); start from other weights, or without --init")
    assert "nan" not in line and "optim.lr" not in line
    assert not run.exists()


# --- a run's other files in place of its model; a model of other widths as --init ----------

@pytest.fixture(scope="module")
def interrupted(tiny_mnist, tmp_path_factory) -> Path:
    """The folder (its name holds a space) of a run stopped in its first epoch: config.yaml,
    metrics.jsonl and checkpoint.npz, no model.npz."""
    run = tmp_path_factory.mktemp("stopped run")
    asked = iter([False])  # the set-up is not stopped; the first step is
    with pytest.raises(Interrupted):
        run_training(config_with(model__hidden=8, train__epochs=2, train__batch_size=50), CPU,
                     tiny_mnist.mnist, out_dir=run, should_stop=lambda: next(asked, True))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.npz", "config.yaml",
                                                     "metrics.jsonl"]
    return run


def model_commands(path: Path, tmp_path: Path) -> list[list]:
    """evaluate, predict and export of the model `path`: each loads it the same way."""
    digit = tmp_path / "digit.npy"
    np.save(digit, np.eye(28, dtype=np.uint8) * 255)
    return [[evaluate, path, "--device", "cpu"], [predict, path, digit, "--device", "cpu"],
            [export, path, "--out", tmp_path / "model.onnx"]]


def test_a_checkpoint_given_as_a_model_says_how_to_finish_the_run(interrupted, tmp_path):
    checkpoint = interrupted / "checkpoint.npz"
    for args in model_commands(checkpoint, tmp_path):
        line = assert_one_error(invoke(*args))
        assert line == (f"Error: {checkpoint}: a training checkpoint, not a model; finish the run "
                        f"with gpumlp train --resume '{interrupted}' (it writes "
                        f"'{interrupted}/model.npz')")
    assert not (tmp_path / "model.onnx").exists()
    moved = tmp_path / "saved.npz"   # a checkpoint copied out of its run: no run to resume
    shutil.copyfile(checkpoint, moved)
    line = assert_one_error(invoke(evaluate, moved, "--device", "cpu"))
    assert line == (f"Error: {moved}: a training checkpoint, not a model; give a model.npz, "
                    "which gpumlp train writes into its run's folder at the end")
    other = tmp_path / "arrays.npz"  # no config and no checkpoint state: not a gpumlp file
    np.savez(other, W1=np.zeros((784, 8), np.float32))
    assert_one_error(invoke(evaluate, other, "--device", "cpu"),
                     f"{other}: no config string inside; not a gpumlp model file")


def test_a_run_folder_given_as_the_model_names_the_file_to_give(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.npz").write_bytes(b"")
    for args in model_commands(run, tmp_path):
        result = invoke(*args)
        assert result.exit_code == 2
        assert (f"Error: Invalid value for 'MODEL': {shell_path(run)} is a run's folder; give "
                f"its model, {shell_path(run / 'model.npz')}\n") in result.stderr
    result = invoke(train, "--init", run, "--out", tmp_path / "new")   # as --init
    assert result.exit_code == 2 and (
        f"Error: Invalid value for '--init': {shell_path(run)} is a run's folder; give its "
        f"model, {shell_path(run / 'model.npz')}") in result.stderr
    (tmp_path / "empty").mkdir()
    result = invoke(train, "--init", tmp_path / "empty", "--out", tmp_path / "new")
    assert result.exit_code == 2 and (f"Error: Invalid value for '--init': "
                                      f"{shell_path(tmp_path / 'empty')} is a folder; give a "
                                      "model.npz") in result.stderr
    assert not (tmp_path / "new").exists()
    result = invoke(evaluate, tmp_path, "--device", "cpu")   # a folder with no model in it,
    assert result.exit_code == 2 and (                       # in the words --init has
        f"Error: Invalid value for 'MODEL': {shell_path(tmp_path)} is a folder; give a "
        "model.npz") in result.stderr


def test_an_onnx_export_given_as_the_model_names_the_model_npz_to_give(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.onnx").write_bytes(b"onnx")
    onnx, npz = shell_path(run / "model.onnx"), shell_path(run / "model.npz")  # as shell words
    for args in model_commands(run / "model.onnx", tmp_path):    # no model.npz beside it
        result = invoke(*args)
        assert result.exit_code == 2
        assert (f"'MODEL': {onnx} is an ONNX export, which gpumlp does not read; give "
                "the model.npz it was made from: a run's model.npz\n") in result.stderr
    (run / "model.npz").write_bytes(b"")
    for args in model_commands(run / "model.onnx", tmp_path):
        result = invoke(*args)
        assert result.exit_code == 2 and f"made from: {npz}\n" in result.stderr


def test_the_missing_model_of_an_unfinished_run_says_how_to_finish_it(interrupted, tmp_path):
    model = interrupted / "model.npz"
    for args in model_commands(model, tmp_path):
        line = assert_one_error(invoke(*args))
        assert line == (f"Error: {model}: no such file; the run in '{interrupted}' has not "
                        f"finished: gpumlp train --resume '{interrupted}' writes it")
    for missing in (interrupted / "modl.npz", tmp_path / "model.npz"):  # a typo; no run there
        line = assert_one_error(invoke(evaluate, missing, "--device", "cpu"))
        assert line == f"Error: {missing}: no such file"


def test_the_advice_for_an_unfinished_run_writes_the_model(interrupted, tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    result = invoke(train, "--resume", run, "--data-dir", tiny_data_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert invoke(evaluate, run / "model.npz", "--data-dir", tiny_data_dir,
                  "--device", "cpu").exit_code == 0
    line = assert_one_error(invoke(evaluate, run / "checkpoint.npz", "--device", "cpu"))
    assert line == (f"Error: {run / 'checkpoint.npz'}: a training checkpoint, not a model; give "
                    f"the run's model, {shell_path(run / 'model.npz')}")  # finished: it is there
    (run / "model.npz").unlink()  # a finished run (summary.json) that lost its model: no advice
    line = assert_one_error(invoke(evaluate, run / "model.npz", "--device", "cpu"))
    assert line == f"Error: {run / 'model.npz'}: no such file"


@pytest.mark.parametrize("dropped", ["W2", "b1"])
def test_a_model_missing_a_layers_array_says_which_and_that_it_was_changed(model_arrays,
                                                                          tmp_path, dropped):
    model = tmp_path / "model.npz"
    np.savez(model, **{k: v for k, v in model_arrays.items() if k != dropped})
    line = assert_one_error(invoke(evaluate, model, "--device", "cpu"))
    assert line == (f"Error: {model}: array {dropped} is missing for hidden sizes [16]: not "
                    "the net its own config describes, so the file was changed after gpumlp "
                    "wrote it; train it again")


def test_a_model_whose_arrays_do_not_fit_its_own_config_says_it_was_changed(tmp_path):
    small = build_config(None, ["model.hidden=16"])
    model = tmp_path / "model.npz"
    save_model(model, init_params(small.model.layer_widths, "he", np.random.default_rng(0)),
               build_config(None, ["model.hidden=32"]))
    line = assert_one_error(invoke(evaluate, model, "--device", "cpu"))
    assert line == (f"Error: {model}: W1 has shape (784, 16) and dtype float32; expected "
                    "(784, 32) floats: not the net its own config describes, so the file was "
                    "changed after gpumlp wrote it; train it again")


@pytest.mark.parametrize("hidden, advice", [
    ("16", "it was trained with model.hidden 16: train with --set model.hidden=16"),
    ("[16,8]", "it was trained with model.hidden [16, 8]: train with "
               "--set 'model.hidden=[16,8]'"),
], ids=["one layer", "two layers"])
def test_init_from_a_model_of_other_widths_says_which_it_was_trained_with(tmp_path, tiny_data_dir,
                                                                          hidden, advice):
    config = build_config(None, [f"model.hidden={hidden}"])
    model = tmp_path / "model.npz"
    save_model(model, init_params(config.model.layer_widths, "he", np.random.default_rng(0)),
               config)
    common = ["--device", "cpu", "--data-dir", tiny_data_dir, "--quiet"]
    wider = ["--set", "model.hidden=32", *common, "--out", tmp_path / "run"]
    line = assert_one_error(invoke(train, "--init", model, *wider))
    assert line == (f"Error: {model}: W1 has shape (784, 16) and dtype float32; expected "
                    f"(784, 32) floats; {advice} (or its config)")
    plain = tmp_path / "weights.npz"  # no config: nothing to say about the widths it had
    with np.load(model) as npz:
        np.savez(plain, **{name: npz[name] for name in npz.files if name != "config"})
    assert assert_one_error(invoke(train, "--init", plain, *wider)).endswith("(784, 32) floats")
    damaged = tmp_path / "damaged.npz"  # a config it cannot read: no hint, and not its error
    with np.load(model) as npz:
        np.savez(damaged, **{**{name: npz[name] for name in npz.files},
                             "config": np.array('{"model": ')})
    assert assert_one_error(invoke(train, "--init", damaged, *wider)) == (
        f"Error: {damaged}: W1 has shape (784, 16) and dtype float32; expected (784, 32) floats")
    assert not (tmp_path / "run").exists()
    result = invoke(train, "--init", model, "--set", f"model.hidden={hidden}", "--set",
                    "train.epochs=1", *common, "--out", tmp_path / "ok")
    assert result.exit_code == 0, result.output  # the advice works


def test_the_init_width_hint_of_a_deep_model_stays_one_short_line(tmp_path):
    from gpumlp.checkpoint import load_init

    config = build_config(None, [f"model.hidden={[4] * 40}"])               # 40 hidden layers
    model = tmp_path / "deep.npz"
    save_model(model, init_params(config.model.layer_widths, "he", np.random.default_rng(0)),
               config)
    with pytest.raises(CheckpointError) as error:
        load_init(model, (784, 8, 10), "float32")
    message = str(error.value)
    assert message.endswith("train with its config") and "--set" not in message
    assert len(message) < 300


# --- .npy pictures and what is not a file -------------------------------------------------

@pytest.mark.parametrize("content, fragment", [
    (lying_header((1_000_000, 1_000_000)), ".npy array of 1000000x1000000 pixels, more than"),
    (lying_header((28, 28), "|u1") + bytes(100),
     "damaged .npy array: its header announces 784 bytes of data, the file holds 100"),
    (npy_bytes(np.zeros((28, 28), np.uint8)) + bytes(10), "the file holds 794"),
    (lying_header((10**12,), "<f8"), ".npy array of shape (1000000000000,); expected one grey"),
], ids=["huge", "short", "long", "huge 1-D"])
def test_a_npy_header_that_lies_is_refused_before_the_data_is_read(tmp_path, content, fragment):
    path = tmp_path / "digit.npy"
    path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        read_gray(path)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)


def test_a_lying_npy_among_good_ones_does_not_stop_the_batch(model_arrays, tmp_path):
    model = tmp_path / "model.npz"
    np.savez(model, **model_arrays)
    good = tmp_path / "good.npy"
    np.save(good, np.eye(28, dtype=np.uint8) * 255)
    liar = tmp_path / "liar.npy"
    liar.write_bytes(lying_header((100_000, 100_000)))
    result = invoke(predict, model, good, liar, good, "--device", "cpu")
    assert result.exit_code == 1
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == [str(good)] * 2
    refused = (f"Error: {liar}: .npy array of 100000x100000 pixels, more than 16,777,216 pixels "
               "(4096x4096); scale it down")
    assert result.stderr.splitlines() == [refused, "Error: 1 of 3 files could not be predicted"]


def lab_tiff(path: Path) -> None:
    """A TIFF in the LAB colour space, which Pillow opens and loads but cannot convert."""
    from PIL import Image
    Image.new("RGB", (28, 28)).convert("LAB").save(path)


def broken_blp(path: Path) -> None:
    """A BLP whose encoding byte is wrong: Pillow's BLP decoder raises its own error class
    (a NotImplementedError), neither OSError nor ValueError."""
    from PIL import Image
    Image.new("P", (28, 28)).save(path)
    data = bytearray(path.read_bytes())
    data[8] = 9
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, make", [("lab.tiff", lab_tiff), ("broken.blp", broken_blp)])
def test_a_picture_pillow_cannot_decode_or_convert_is_one_line_and_the_rest_go_on(
        model_arrays, tmp_path, name, make):
    pytest.importorskip("PIL")
    model = tmp_path / "model.npz"
    np.savez(model, **model_arrays)
    good = tmp_path / "good.npy"
    np.save(good, np.eye(28, dtype=np.uint8) * 255)
    bad = tmp_path / name
    make(bad)
    result = invoke(predict, model, bad, good, "--device", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == [str(good)]
    said = result.stderr.splitlines()
    assert len(said) == 2 and said[1] == "Error: 1 of 2 files could not be predicted"
    assert said[0].startswith(f"Error: {bad}: damaged or unsupported image (")


def test_a_missing_picture_named_with_a_line_break_keeps_its_error_on_one_line(model_arrays,
                                                                              tmp_path):
    model = tmp_path / "model.npz"
    np.savez(model, **model_arrays)
    good = tmp_path / "good.npy"
    np.save(good, np.eye(28, dtype=np.uint8) * 255)
    result = invoke(predict, model, tmp_path / "a\nb.png", good, "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"Error: {tmp_path}/a\\nb.png: no such file",
                                          "Error: 1 of 2 files could not be predicted"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_a_picture_from_a_pipe_is_read_as_from_a_file(tmp_path):
    """As `gpumlp predict model.npz <(curl ...)` gives it."""
    picture = tmp_path / "digit.npy"
    np.save(picture, np.eye(28, dtype=np.uint8) * 255)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(picture.read_bytes(),))
    writer.start()
    np.testing.assert_array_equal(read_gray(fifo), read_gray(picture))
    writer.join()


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_an_endless_input_is_refused_after_the_cap_not_read_for_ever(model_arrays, tmp_path):
    model = tmp_path / "model.npz"
    np.savez(model, **model_arrays)
    link = tmp_path / "digit.png"
    link.symlink_to("/dev/zero")
    result = invoke(predict, model, link, "--device", "cpu")
    assert_one_error(result, f"{link}: more than the 257 MiB an image may take; scale it down")
    assert_one_error(invoke(evaluate, link, "--device", "cpu"), f"{link}: not a regular file")


def test_a_file_of_exactly_the_size_cap_is_read_and_one_byte_more_is_not(tmp_path, monkeypatch):
    from gpumlp import preprocess

    picture = npy_bytes(np.eye(28, dtype=np.uint8) * 255)           # 912 bytes
    monkeypatch.setattr(preprocess, "MAX_FILE_BYTES", len(picture))
    path = tmp_path / "digit.npy"
    path.write_bytes(picture)
    assert read_gray(path).shape == (28, 28)
    path.write_bytes(picture + b"\0")
    with pytest.raises(ImageError) as info:
        read_gray(path)
    assert str(info.value) == f"{path}: more than the 0 MiB an image may take; scale it down"


def test_the_size_cap_holds_the_largest_npy_picture_gpumlp_accepts(tmp_path):
    """4096x4096 float64 levels: 128 MiB and a header, read whole (a sparse file: no disk)."""
    from gpumlp.preprocess import MAX_SIDE

    header = lying_header((MAX_SIDE, MAX_SIDE), "<f8")
    path = tmp_path / "big.npy"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + MAX_SIDE * MAX_SIDE * 8)          # zeros
    assert read_gray(path).shape == (MAX_SIDE, MAX_SIDE)


@pytest.mark.parametrize("change, says", [
    ({"W5": np.zeros((3, 3), np.float32)}, "arrays ['W5'] do not fit hidden sizes [16]"),
    ({"W3": np.zeros((10, 10), np.float32), "b4": np.zeros(3, np.float32)},
     "arrays ['W3', 'b4'] do not fit hidden sizes [16]"),
    ({"W1": np.zeros((784, 16), np.int32)}, "W1 has shape (784, 16) and dtype int32"),
], ids=["a_layer_far_beyond", "layers_beyond", "integer_weights"])
def test_init_or_model_weights_of_another_layout_are_refused(model_arrays, tmp_path, change,
                                                             says):
    """Guards check_layout: a layer beyond the net's depth (the next one or any later) and
    weights that are not floats are refused by --init and by a model load alike, not dropped
    or converted."""
    path = tmp_path / "weights.npz"
    np.savez(path, **{**model_arrays, **change})
    for load in (lambda: load_init(path, (784, 16, 10), "float32"), lambda: load_model(path)):
        with pytest.raises(CheckpointError) as info:
            load()
        assert says in str(info.value)


def test_a_model_whose_config_string_is_over_the_limit_is_refused_unread(model_arrays,
                                                                         tmp_path):
    """Guards checkpoint.MAX_CONFIG_CHARS: a config string past a million characters is refused
    from its .npy header, before it is read and parsed."""
    from gpumlp.checkpoint import MAX_CONFIG_CHARS

    path = tmp_path / "model.npz"
    np.savez(path, **{**model_arrays, "config": np.array(" " * (MAX_CONFIG_CHARS + 1))})
    with pytest.raises(CheckpointError, match=f"holds {MAX_CONFIG_CHARS + 1:,} characters, more "
                                              f"than the {MAX_CONFIG_CHARS:,} a config may hold"):
        load_model(path)


@pytest.mark.parametrize("member, reason", [
    (b"\x93NUMPY\x01\x00" + struct.pack("<H", 20_000) + b" " * 20_000,
     ".npy header of 20,000 bytes, more than 10,000"),
    (lying_header((-2, -5)) + bytes(80), ".npy header with a negative dimension (-2, -5)"),
    (b"\x93NUMPY\x01\x00\x00", ".npy header cut short"),             # 1 of its 2 length bytes
    (None, "two members are named 'W1'"),
    (b"\x93NUMPY\x09\x00" + lying_header((2,))[8:], "unknown .npy format version 9.0"),
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': <f8}  \n", "malformed .npy header"),
    (lying_header((2,), "<x9") + bytes(16), "malformed .npy header"),   # no such dtype
], ids=["header_too_long", "negative_dimension", "length_cut_short", "name_twice",
        "later_version", "not_a_dict", "unknown_dtype"])
def test_a_member_with_a_header_numpy_may_not_refuse_says_why(model_arrays, tmp_path, member,
                                                              reason):
    """Guards Npz's own header checks (before NumPy sees a header): a header longer than
    NumPy's limit, a negative dimension (two make a positive size), a length cut short, an
    array name given twice (which one would be read?), a later format version, and a header
    NumPy's parser refuses are each refused, saying which."""
    path = tmp_path / "model.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in model_members(model_arrays).items():
            zf.writestr(name, data)
        with pytest.warns(UserWarning, match="Duplicate name") if member is None else \
                contextlib.nullcontext():
            zf.writestr("W1.npy" if member is None else "x.npy",
                        npy_bytes(model_arrays["W1"]) if member is None else member)
    with pytest.raises(CheckpointError) as info:
        load_npz(path)
    assert f"{path}: not a readable .npz file (" in str(info.value)
    assert reason in str(info.value)
