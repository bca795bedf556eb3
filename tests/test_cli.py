"""Every command through click's CliRunner: what it writes, what it prints, and how it fails
(one `Error:` line, exit 2 for a bad config or device, 1 for anything else, no traceback)."""

from __future__ import annotations

import errno
import io
import json
import os
import platform
import shutil
import signal
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from help_helpers import assert_help_has_an_example
from gpumlp import backend
from gpumlp.backend import CPU
from gpumlp.cli import main
from gpumlp.config import build_config
from gpumlp.train import train

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
TINY = ["--set", "data.limit=null", "--set", "data.val_size=50"]  # smoke.yaml on 300 examples
METRIC_KEYS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
               "test_accuracy", "lr", "seconds", "samples_per_second"}
SUMMARY_KEYS = {"test_accuracy", "test_loss", "epochs", "seconds", "device"}


def cli(*args):
    """Invoke `gpumlp ARGS`; only a clean exit (SystemExit) may end it, never a traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{result.exception!r} escaped: {result.output}"
    assert "Traceback" not in result.output
    return result


def assert_one_error_line(result, exit_code, *fragments):
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


@pytest.fixture
def no_cupy(monkeypatch):
    """As on a machine without CuPy, whatever this machine has (a broken CuPy's import error,
    noted by an earlier import, forgotten)."""
    monkeypatch.setattr(backend, "_import_cupy", lambda: None)
    monkeypatch.setattr(backend, "CUPY_IMPORT", [])


@pytest.fixture(scope="module")
def trained_model(tiny_mnist, tmp_path_factory) -> Path:
    """model.npz of a smoke run on the tiny MNIST, written by the library."""
    out = tmp_path_factory.mktemp("trained")
    train(build_config(SMOKE, ["data.limit=null", "data.val_size=50"]), CPU, tiny_mnist.mnist,
          out_dir=out)
    return out / "model.npz"


def relu_mlp(arrays, X):
    """Logits of the MLP in a model.npz's arrays, in float64 with plain NumPy."""
    Z, k = X, 1
    while f"W{k}" in arrays:
        A = Z @ arrays[f"W{k}"].astype(np.float64) + arrays[f"b{k}"]
        k += 1
        Z = np.maximum(A, 0) if f"W{k}" in arrays else A
    return Z


# --- train ------------------------------------------------------------------------------------

def test_train_writes_the_run_directory(tiny_data_dir, tmp_path, no_cupy):
    out = tmp_path / "run"
    result = cli("train", "--config", SMOKE, *TINY, "--device", "auto", "--out", out,
                 "--data-dir", tiny_data_dir)
    assert result.exit_code == 0, result.output
    assert "training on cpu" in result.stderr           # auto says which device it took
    assert "epoch   2" in result.stderr                 # one plain line per epoch
    assert str(out) in result.stdout

    assert build_config(out / "config.yaml") == build_config(SMOKE, TINY[1::2])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(set(row) == METRIC_KEYS for row in rows)
    with np.load(out / "model.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["W1", "W2", "b1", "b2", "config"]
        assert npz["W1"].shape == (784, 64) and npz["W2"].shape == (64, 10)
        assert npz["W1"].dtype == np.float32
        assert json.loads(str(npz["config"]))["model"]["hidden"] == 64
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["epochs"] == 2
    assert summary["test_accuracy"] == rows[-1]["test_accuracy"] > 0.9
    assert summary["device"].startswith("cpu")
    last = rows[-1]  # a validation split: its numbers, the ones to tune on, come first
    assert {key: summary[key] for key in ("val_accuracy", "val_loss")} == {
        "val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"]}
    assert result.stdout.startswith(
        f"val_accuracy {last['val_accuracy']:.4f}  val_loss {last['val_loss']:.4f}  "
        f"test_accuracy {last['test_accuracy']:.4f}  test_loss {last['test_loss']:.4f}  "
        "epochs 2  ")


def test_a_run_without_a_validation_split_has_no_validation_numbers(tiny_data_dir, tmp_path):
    """No val_* key in summary.json (not null), and the final line as before it had them."""
    out = tmp_path / "run"
    result = cli("train", "--config", SMOKE, "--set", "data.limit=null", "--set",
                 "data.val_size=0", "--set", "train.epochs=1", "--device", "cpu", "--out", out,
                 "--data-dir", tiny_data_dir, "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS | {"steps"}
    assert result.stdout.startswith(f"test_accuracy {summary['test_accuracy']:.4f}  test_loss "
                                    f"{summary['test_loss']:.4f}  epochs 1  ")


def test_train_quiet_prints_only_the_summary(tiny_data_dir, tmp_path):
    result = cli("train", "--config", SMOKE, *TINY, "--set", "train.epochs=1", "--device", "cpu",
                 "--out", tmp_path / "q", "--data-dir", tiny_data_dir, "--quiet", "--seed", "5")
    assert result.exit_code == 0 and result.stderr == ""
    assert len(result.stdout.strip().splitlines()) == 1
    assert build_config(tmp_path / "q" / "config.yaml").train.seed == 5


def test_train_from_init_weights_matches_a_numpy_sgd_step(tiny_mnist, tiny_data_dir, tmp_path):
    """One SGD step (momentum 0, the whole set as one batch, no shuffle) from given weights,
    against the same step written here with plain NumPy in float64."""
    h, lr = 16, 0.5
    rng = np.random.default_rng(11)
    init = {"W1": rng.normal(0, 0.05, (784, h)), "b1": rng.normal(0, 0.1, h),
            "W2": rng.normal(0, 0.3, (h, 10)), "b2": rng.normal(0, 0.1, 10)}
    init = {k: v.astype(np.float32) for k, v in init.items()}
    np.savez(tmp_path / "init.npz", **init)
    out = tmp_path / "run"
    result = cli("train", "--init", tmp_path / "init.npz", "--device", "cpu", "--out", out,
                 "--data-dir", tiny_data_dir, "--quiet",
                 "--set", f"model.hidden={h}", "--set", "train.epochs=1",
                 "--set", "train.batch_size=300", "--set", "data.shuffle=false",
                 "--set", "optim.momentum=0", "--set", f"optim.lr={lr}")
    assert result.exit_code == 0, result.output

    X = tiny_mnist.mnist.train.images / 255.0                      # (m, d) float64
    y = tiny_mnist.mnist.train.labels
    m = len(y)
    W1, b1, W2, b2 = (init[k].astype(np.float64) for k in ("W1", "b1", "W2", "b2"))
    A1 = X @ W1 + b1
    Z1 = np.maximum(A1, 0)
    A2 = Z1 @ W2 + b2
    P = np.exp(A2 - A2.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    G2 = (P - np.eye(10)[y]) / m                                    # dL/dA2
    G1 = (G2 @ W2.T) * (A1 > 0)                                     # dL/dA1
    expected = {"W1": W1 - lr * X.T @ G1, "b1": b1 - lr * G1.sum(0),
                "W2": W2 - lr * Z1.T @ G2, "b2": b2 - lr * G2.sum(0)}
    with np.load(out / "model.npz", allow_pickle=False) as npz:
        for name, want in expected.items():
            assert np.abs(want - init[name]).max() > 1e-3           # the step really moved it
            np.testing.assert_allclose(npz[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_out_holding_a_run_is_refused_without_overwrite(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old = {"model.npz": b"old weights", "summary.json": b'{"test_accuracy": 0.5}\n'}
    for name, data in old.items():
        (out / name).write_bytes(data)
    args = ["train", "--config", SMOKE, *TINY, "--set", "train.epochs=1", "--device", "cpu",
            "--out", out, "--data-dir", tiny_data_dir, "--quiet"]
    assert_one_error_line(cli(*args), 1, f"--out {out}: already holds a run (model.npz, "
                          "summary.json); pick another folder, or pass --overwrite to replace it")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    (out / "summary.json").unlink()            # no config.yaml: nothing --resume could take
    assert_one_error_line(cli(*args), 1, "already holds a run (model.npz); pick another folder, "
                          "or pass --overwrite to replace it")
    (out / "config.yaml").write_text("{}\n")
    (out / "checkpoint.npz").write_bytes(b"a checkpoint")   # not finished: resuming is a way on
    assert_one_error_line(cli(*args), 1, "pick another folder, resume it with --resume, or pass "
                          "--overwrite to replace it")
    (out / "checkpoint.npz").unlink()          # a model but no checkpoint: --resume refuses it
    assert "--resume" not in cli(*args).stderr
    old = {p.name: p.read_bytes() for p in out.iterdir()}

    assert cli(*args, "--overwrite").exit_code == 0
    assert (out / "model.npz").read_bytes() != old["model.npz"]
    assert (out / "config.yaml").is_file()


# --- evaluate ---------------------------------------------------------------------------------

def test_evaluate_json_equals_an_independent_recomputation(trained_model, tiny_mnist,
                                                           tiny_data_dir):
    result = cli("evaluate", trained_model, "--device", "cpu", "--data-dir", tiny_data_dir,
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    with np.load(trained_model, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files if name != "config"}
    test = tiny_mnist.mnist.test
    logits = relu_mlp(arrays, test.images / 255.0)
    accuracy = float((logits.argmax(axis=1) == test.labels).mean())
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_p[np.arange(len(test.labels)), test.labels].mean()
    assert report["test_accuracy"] == accuracy and report["n"] == 100
    assert report["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert report["device"].startswith("cpu")


def test_evaluate_json_writes_a_model_name_that_is_not_utf8_with_escapes(trained_model,
                                                                        tiny_data_dir, tmp_path):
    model = tmp_path / os.fsdecode(b"model-\xff.npz")      # the byte 0xff: U+DCFF in Python
    shutil.copyfile(trained_model, model)
    result = cli("evaluate", model, "--device", "cpu", "--data-dir", tiny_data_dir, "--json")
    assert result.exit_code == 0 and "\\ud" not in result.stdout
    assert json.loads(result.stdout)["model"] == f"{tmp_path}/model-\\xff.npz"


def test_json_text_escapes_every_lone_surrogate():
    from gpumlp.errors import json_text
    assert json_text(os.fsdecode(b"a\xffb")) == "a\\xffb"   # a byte that is not UTF-8
    assert json_text("a\ud800b") == "a\\ud800b"              # a surrogate no byte stands for
    assert json_text("caf\u00e9") == "caf\u00e9"              # UTF-8 text as it is


def test_evaluate_prints_one_line(trained_model, tiny_data_dir):
    result = cli("evaluate", trained_model, "--device", "cpu", "--data-dir", tiny_data_dir)
    assert result.exit_code == 0
    assert result.stdout.startswith("test_accuracy ")
    assert result.stdout.endswith("(100 images, on cpu (NumPy))\n")
    numbers = json.loads(cli("evaluate", trained_model, "--device", "cpu", "--data-dir",
                             tiny_data_dir, "--json").stdout)
    assert result.stdout.startswith(f"test_accuracy {numbers['test_accuracy']:.4f}  test_loss "
                                    f"{numbers['test_loss']:.4f}  (100 images")


# --- gradcheck, info, help --------------------------------------------------------------------

def test_gradcheck_passes_and_prints_every_parameter():
    result = cli("gradcheck", "--set", "model.hidden=[12, 8]", "--set", "model.activation=gelu",
                 "--samples", "30")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert lines[-1].startswith("PASS: largest relative error")
    assert "central differences" in lines[-1]
    assert float(lines[-1].split()[4]) < 1e-6


def test_gradcheck_with_a_config_file(tmp_path):
    """The net checked is the file's (smoke.yaml: 784-64-10 relu; then a 784-12-6-10 tanh net),
    not the default 784-256-10 one."""
    result = cli("gradcheck", "--config", SMOKE, "--samples", "5", "--batch", "4")
    assert result.exit_code == 0 and "PASS" in result.stdout
    table = gradcheck_table(result.stdout)
    assert {name: row[1] for name, row in table.items()} == {
        "W1": "(784,64)", "b1": "(64,)", "W2": "(64,10)", "b2": "(10,)"}
    checked = {name: row[2] for name, row in table.items()}           # --samples 5, but at
    assert checked == {"W1": "64", "b1": "64", "W2": "10", "b2": "10"}  # least one a column
    assert ", activation relu, float64" in result.stdout.splitlines()[-1]
    config = tmp_path / "deep.yaml"
    config.write_text("model: {hidden: [12, 6], activation: tanh}\n")
    result = cli("gradcheck", "--config", config, "--samples", "5", "--batch", "4")
    assert result.exit_code == 0, result.output
    assert [(name, row[1]) for name, row in gradcheck_table(result.stdout).items()] == [
        ("W1", "(784,12)"), ("b1", "(12,)"), ("W2", "(12,6)"), ("b2", "(6,)"),
        ("W3", "(6,10)"), ("b3", "(10,)")]
    assert result.stdout.splitlines()[-1].startswith("PASS: ")
    assert ", activation tanh, float64" in result.stdout.splitlines()[-1]


def test_gradcheck_says_what_it_does_not_check_and_when_its_tolerance_is_loose():
    """Weight decay and max-norm are the optimizer step's: a PASS with them set says so; a
    tolerance that lets wrong gradients through is named; the last line counts the entries
    compared and names what was checked."""
    result = cli("gradcheck", "--set", "model.hidden=8", "--set", "optim.weight_decay=0.1",
                 "--set", "model.max_norm=3", "--samples", "5", "--tolerance", "0.5")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "note: optim.weight_decay 0.1 and model.max_norm 3 act in the optimizer step, not in "
        "model.backward, so they are not checked here (the tests check weight decay's step: "
        "docs/derivation.md; max-norm rescales weights, no gradient)",
        "note: --tolerance 0.5 is loose: a wrong gradient can pass it (right ones agree to "
        "about 1e-6 in float64)"]
    last = result.stdout.splitlines()[-1]
    assert " over 36 of 6,370 entries, " in last and last.endswith("of model.backward")
    result = cli("gradcheck", "--set", "model.hidden=8", "--set", "model.max_norm=3",
                 "--samples", "5")
    assert result.stderr.splitlines() == [              # no pointer to weight decay's tests
        "note: model.max_norm 3 acts in the optimizer step, not in model.backward, so it is "
        "not checked here (max-norm rescales weights, no gradient)"]
    result = cli("gradcheck", "--set", "model.hidden=8", "--samples", "5")
    assert result.exit_code == 0 and result.stderr == ""


def test_gradcheck_exits_1_when_above_the_tolerance():
    result = cli("gradcheck", "--set", "model.hidden=8", "--samples", "5", "--tolerance", "1e-15")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("FAIL: largest relative error")


def test_gradcheck_fails_on_a_nan_gradient_even_when_it_is_not_the_first(monkeypatch):
    """A backward pass that gives a NaN db2 must FAIL (exit 1), not PASS because
    max() stepped over the NaN."""
    import gpumlp.gradcheck as gradcheck_module

    real = gradcheck_module.backward

    def nan_in_db2(*args, **kwargs):
        grads = real(*args, **kwargs)
        grads.b[-1][...] = np.nan                          # db2, the last parameter checked
        return grads

    monkeypatch.setattr(gradcheck_module, "backward", nan_in_db2)
    result = cli("gradcheck", "--set", "model.hidden=8", "--samples", "5")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("FAIL: largest relative error nan")


@pytest.mark.parametrize("option", ["model.dropout=0.3", "train.label_smoothing=0.1"])
def test_gradcheck_checks_the_configs_dropout_and_label_smoothing_by_central_differences(
        option, monkeypatch):
    """A backward pass that ignores the dropout masks (or a dA2 that ignores the smoothing)
    passes the check of a net without them: with the option set, gradcheck must FAIL it, so it
    checks the net the option describes."""
    import gpumlp.gradcheck as gradcheck_module
    from gpumlp.model import backward, loss_and_dA2

    if option.startswith("model.dropout"):
        monkeypatch.setattr(gradcheck_module, "backward", lambda params, cache, dA2, act:
                            backward(params, cache._replace(masks=()), dA2, act))
    else:
        monkeypatch.setattr(gradcheck_module, "loss_and_dA2", lambda A2, y, smoothing=0.0:
                            (loss_and_dA2(A2, y, smoothing)[0], loss_and_dA2(A2, y)[1]))
    net = ["--set", "model.hidden=8", "--set", "model.activation=tanh", "--samples", "20"]
    assert cli("gradcheck", *net).exit_code == 0           # right without the option
    result = cli("gradcheck", *net, "--set", option)
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[-1].startswith("FAIL: largest relative error")


@pytest.mark.parametrize("init", ["he", "xavier"])
def test_gradcheck_checks_the_net_at_the_configs_init(init, monkeypatch):
    """The --config help says the config's init is checked: the weights gradcheck draws must
    come from model.init (a hard-coded "he" would check another point of the same net)."""
    import gpumlp.gradcheck as gradcheck_module

    real, drawn = gradcheck_module.init_params, []

    def spy(widths, scheme, *args, **kwargs):
        drawn.append(scheme)
        return real(widths, scheme, *args, **kwargs)

    monkeypatch.setattr(gradcheck_module, "init_params", spy)
    result = cli("gradcheck", "--set", "model.hidden=8", "--set", f"model.init={init}",
                 "--samples", "5")
    assert result.exit_code == 0, result.output
    assert drawn == [init]


def test_out_of_memory_names_what_to_lower_for_the_command_that_ran():
    # 784 x 2^40 float64 first-layer weights: 6.9 PB, refused at once by any machine
    result = cli("gradcheck", "--set", f"model.hidden={2 ** 40}")
    assert_one_error_line(result, 1, "out of memory (",
                          "; lower --batch, or model.hidden with --set")
    assert "train.batch_size" not in result.stderr        # train's hint, not gradcheck's


def test_a_library_that_cannot_be_loaded_for_want_of_memory_is_the_out_of_memory_line(
        tiny_data_dir, tmp_path, monkeypatch):
    """Under `ulimit -v`, loading SciPy's BLAS for the fast CPU step failed with the loader's
    ImportError ("failed to map segment from shared object") and a traceback. Any other
    ImportError is a bug, and stays one."""
    import gpumlp.train as train_module

    def cannot_map(config, backend):
        raise ImportError("/venv/lib/numpy/fft/_pocketfft_umath.so: failed to map segment "
                          "from shared object")

    monkeypatch.setattr(train_module, "make_step", cannot_map)
    result = cli("train", "--config", SMOKE, *TINY, "--data-dir", tiny_data_dir, "--out",
                 tmp_path / "run", "--device", "cpu", "-q")
    assert_one_error_line(result, 1, "Error: out of memory (/venv/lib/numpy/fft/_pocketfft_",
                          "failed to map segment from shared object); lower "
                          "train.eval_batch_size")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(train_module, "make_step", lambda c, b: __import__("no_such_module"))
    result = CliRunner().invoke(main, ["train", "--config", SMOKE, *TINY, "--data-dir",
                                       str(tiny_data_dir), "--out", str(tmp_path / "run"), "-q"])
    assert isinstance(result.exception, ModuleNotFoundError)


@pytest.mark.parametrize("args", [["train", "--resume", "{loop}"], ["report", "{loop}"],
                                  ["evaluate", "{loop}/model.npz"], ["export", "{loop}"],
                                  ["data", "verify", "--data-dir", "{loop}"]])
def test_a_link_that_leads_back_to_itself_is_named_as_one(tmp_path, args):
    """Path.exists() is False for a link loop (ELOOP): each command said "no such folder" or
    "no such file", which sends the user looking for a folder that is there."""
    loop = tmp_path / "loopA"
    loop.symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(loop)
    result = cli(*(arg.format(loop=loop) for arg in args))
    assert_one_error_line(result, 1, "a link that leads back to itself (fix or remove it)")


def test_a_current_folder_deleted_under_the_command_is_said_to_be_the_cause(
        tiny_data_dir, tmp_path, monkeypatch):
    """runs/... 'cannot create the run folder (No such file or directory)' and 'cannot write
    in .' sent the user looking for a path, when the folder they stood in had been removed."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    said = ("the current folder no longer exists (deleted or moved), so names relative to it "
            "lead nowhere: cd into a folder that exists")
    result = cli("train", "--config", SMOKE, *TINY, "--data-dir", tiny_data_dir, "-q")
    assert_one_error_line(result, 1, "cannot create the run folder", said)
    result = cli("data", "image", "0", "x.png", "--data-dir", tiny_data_dir)
    assert_one_error_line(result, 1, "x.png: cannot write in .", said)


@pytest.mark.parametrize("code, said", [
    (errno.EMFILE, "the open-file limit (ulimit -n) is too low: raise it"),
    (errno.ENFILE, "the system's open-file table is full: close some programs")])
def test_too_many_open_files_says_which_limit(code, said):
    from gpumlp.cli_common import OneLineError, domain_errors

    @domain_errors
    def command():
        raise OSError(code, os.strerror(code), "/lib/some_plugin.py")

    with pytest.raises(OneLineError) as error:
        command()
    assert error.value.message == f"/lib/some_plugin.py: {os.strerror(code)}; {said}"


def test_a_loader_limit_that_is_no_shortage_of_memory_is_not_called_one():
    """glibc's "cannot allocate memory in static TLS block" (aarch64, fixed with LD_PRELOAD)
    is no out-of-memory: it stays the error it is."""
    from gpumlp.cli_common import LOAD_OUT_OF_MEMORY

    assert LOAD_OUT_OF_MEMORY.search("x.so: failed to map segment from shared object")
    assert LOAD_OUT_OF_MEMORY.search("libopenblas.so.0: cannot allocate memory")
    assert not LOAD_OUT_OF_MEMORY.search("libgomp.so.1: cannot allocate memory in static TLS "
                                         "block")


def test_a_signal_while_the_cli_loads_exits_by_it_when_stderr_is_gone():
    """After a terminal hang-up, writing 'hung up (SIGHUP)' fails (EIO): the exit code must
    still be 129, not 1."""
    script = ("import io, signal, sys\n"
              "class Gone(io.TextIOBase):\n"
              "    def write(self, s): raise OSError(5, 'Input/output error')\n"
              "sys.stderr = Gone()\n"
              + on_import("gpumlp.cli", "signal.raise_signal(signal.SIGHUP)") +
              "from gpumlp import entry\n"
              "sys.argv = ['gpumlp', 'info']\n"
              "entry.main()\n")
    done = python_c(script)
    assert done.returncode == 129, done.stderr


@pytest.mark.parametrize("how", ["finished", "stopped"])
def test_a_ctrl_c_while_the_console_script_shuts_down_is_ignored(how):
    """A Ctrl-C pressed again (or late) while Python shuts down, after the command has ended,
    reached Python's default handler: a KeyboardInterrupt traceback after 'interrupted', or a
    finished run killed with no word. Here the signal comes in an atexit callback, which runs
    during the interpreter's shutdown."""
    stop = ("" if how == "finished" else
            on_import("gpumlp.cli", "signal.raise_signal(signal.SIGINT)"))
    script = ("import atexit, os, signal, sys, time\n"
              + stop +
              "def late():\n"
              "    for _ in range(3):\n"
              "        os.kill(os.getpid(), signal.SIGINT); time.sleep(0.02)\n"
              "atexit.register(late)\n"
              "from gpumlp import entry\n"
              "sys.argv = ['gpumlp', '--version']\n"
              "entry.run()\n")
    done = python_c(script)
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    if how == "finished":
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        assert "version" in done.stdout
    else:
        assert (done.returncode, done.stderr) == (130, "interrupted\n")


def test_python_m_gpumlp_and_the_console_script_run_the_exiting_entry_point():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    assert 'gpumlp = "gpumlp.entry:run"\n' in (root / "pyproject.toml").read_text()
    assert "from .entry import run\n\nrun()" in (root / "gpumlp" / "__main__.py").read_text()


def gradcheck_table(stdout: str) -> dict[str, list[str]]:
    """param -> its row of gradcheck's table, split on white space (shape as one field)."""
    rows = [line.replace(", ", ",").split() for line in stdout.splitlines()[1:-1]]
    return {row[0]: row for row in rows}


def test_gradcheck_of_the_default_net_measures_the_entry_that_straddles_relus_kink_again(
        monkeypatch):
    """784-256-10 relu, seed 0: one hidden pre-activation lies 9e-6 from 0, so b1's entry for
    that unit (checked with every entry of b1) has a central difference across the kink at the
    step 1e-5. It is measured again with 1e-6, and the check passes; with kink detection off,
    it fails."""
    from gpumlp.activations import ACTIVATIONS

    result = cli("gradcheck", "--samples", "256")
    assert result.exit_code == 0, result.output
    table = gradcheck_table(result.stdout)
    assert result.stdout.splitlines()[0].split()[4] == "straddle"
    assert [table[name][2:5:2] for name in ("W1", "b1", "W2", "b2")] == [["256", "0"]] * 3 + [
        ["10", "0"]]                                                      # all compared
    assert result.stdout.splitlines()[-1].startswith("PASS: ")
    assert result.stderr.strip() == ("note: 1 entry straddles relu's kink at 0 with the step "
                                     "1e-05 (the step moves a pre-activation across it: a "
                                     "central difference there is not a derivative): 1 measured "
                                     "again with a smaller step")
    monkeypatch.setitem(ACTIVATIONS, "relu", ACTIVATIONS["relu"]._replace(kink=False))
    result = cli("gradcheck", "--samples", "256")         # no kink handling: a false FAIL
    assert result.exit_code == 1 and result.stdout.splitlines()[-1].startswith("FAIL: ")
    assert gradcheck_table(result.stdout)["b1"][2] == "256" and result.stderr == ""


def test_gradcheck_still_fails_a_wrong_gradient_where_entries_straddle_the_kink(monkeypatch):
    import gpumlp.gradcheck as gradcheck_module
    from gpumlp.model import Grads

    real = gradcheck_module.backward

    def db1_too_large(*args, **kwargs):
        grads = real(*args, **kwargs)
        return Grads(grads.W, (1.5 * grads.b[0], *grads.b[1:]))

    monkeypatch.setattr(gradcheck_module, "backward", db1_too_large)
    result = cli("gradcheck", "--samples", "256")                         # every entry of b1
    assert result.exit_code == 1
    assert "1 entry straddles relu's kink" in result.stderr
    assert float(gradcheck_table(result.stdout)["b1"][5]) > 0.3           # |1.5g - g| / 1.5g
    assert result.stdout.splitlines()[-1].startswith("FAIL: largest relative error")


def test_gradcheck_fails_and_says_so_when_a_parameter_had_no_entry_compared(monkeypatch):
    """b1 with all its drawn entries straddling at every step, reported as the hole did (max
    error 0.0): it fails, and one line says which parameter and what to do."""
    import gpumlp.gradcheck as gradcheck_module

    real = gradcheck_module.gradcheck_config

    def b1_left_out(*args, **kwargs):
        W1, b1, *rest = real(*args, **kwargs)
        return [W1, b1._replace(checked=0, nonzero=0, straddling=b1.checked, max_rel_error=0.0,
                                max_abs_error=0.0), *rest]

    monkeypatch.setattr(gradcheck_module, "gradcheck_config", b1_left_out)
    result = cli("gradcheck", "--set", "model.hidden=8", "--samples", "5")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("FAIL: largest relative error inf")
    assert gradcheck_table(result.stdout)["b1"][2:5] == ["0", "0", "8"]     # every entry
    notes = result.stderr.splitlines()
    assert notes[0].startswith("note: 8 entries straddle relu's kink") and "8 excluded" in notes[0]
    assert notes[1:] == [("note: no entry of b1 could be compared (each straddles relu's kink "
                          "at every step), so the check fails: draw others with more --samples, "
                          "another --batch or --set train.seed=N")]            # no 'zero gradient'


@pytest.mark.parametrize("tolerance", ["nan", "inf", "0", "-1e-6"])
def test_gradcheck_refuses_a_tolerance_that_is_not_a_positive_number(tolerance):
    assert_one_error_line(cli("gradcheck", "--tolerance", tolerance), 2, "--tolerance",
                          "finite number above 0")


def test_info_lists_versions_and_devices():
    result = cli("info")
    assert result.exit_code == 0
    fields = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines()}
    assert {"gpumlp", "python", "numpy", "blas", "cupy", "devices"} <= set(fields)
    assert fields["devices"].startswith("cpu") and fields["numpy"] == np.__version__
    assert fields["python"] == platform.python_version()
    details = json.loads(cli("info", "--json").stdout)
    assert details["numpy"] == np.__version__ and details["devices"][0] == "cpu"
    assert details["cpus"] == os.cpu_count() and set(details["unavailable"]) <= set(details)


def test_info_json_gives_what_is_missing_as_null_and_why_apart(monkeypatch):
    from gpumlp import backend, sysinfo
    monkeypatch.setattr(backend, "_import_cupy", lambda: None)
    monkeypatch.setattr(backend, "CUPY_IMPORT", [])           # no earlier test's failed import
    monkeypatch.setattr(sysinfo.os, "cpu_count", lambda: None)
    details = json.loads(cli("info", "--json").stdout)
    assert (details["cupy"], details["cuda"], details["cpus"]) == (None, None, None)
    assert details["devices"] == ["cpu"]
    assert details["unavailable"]["cupy"].startswith("not installed (pip install")
    assert details["unavailable"]["cuda"] == "no CuPy"
    assert details["unavailable"]["cpus"] == "unknown"   # a reason for each null
    assert set(details["unavailable"]) == {k for k, v in details.items() if v is None}
    text = cli("info").stdout
    assert "\ncuda       - (no CuPy)\n" in text and "\ncpus       unknown\n" in text
    assert "\ncupy       not installed (pip install" in text and "unavailable" not in text


def test_info_names_the_cuda_runtime_and_driver_with_cupy(monkeypatch):
    import types

    from gpumlp import backend
    runtime = types.SimpleNamespace(runtimeGetVersion=lambda: 12080, driverGetVersion=lambda: 13000,
                                    getDeviceCount=lambda: 0)
    cupy = types.SimpleNamespace(__version__="13.6.0", cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(backend, "_import_cupy", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert json.loads(cli("info", "--json").stdout)["cuda"] is None
    monkeypatch.setattr(backend, "_import_cupy", lambda: cupy)
    details = json.loads(cli("info", "--json").stdout)
    assert (details["cupy"], details["cuda"]) == ("13.6.0", {"runtime": "12.8", "driver": "13.0"})
    assert details["unavailable"] == {"gpu": "the driver (CUDA 13.0) reports no GPU; nvidia-smi "
                                             "says whether it sees one"}
    assert "\ncuda       CUDA runtime 12.8, driver 13.0\n" in cli("info").stdout
    runtime.driverGetVersion = lambda: (_ for _ in ()).throw(RuntimeError("no libcuda.so.1"))
    details = json.loads(cli("info", "--json").stdout)
    assert details["cuda"] is None
    assert details["unavailable"]["cuda"] == "unknown (RuntimeError: no libcuda.so.1)"


def test_info_names_every_device_and_the_blas_by_name_then_version(monkeypatch):
    from gpumlp import sysinfo
    monkeypatch.setattr(sysinfo, "available_devices", lambda: ["cpu", "gpu0", "gpu1"])
    monkeypatch.setattr(sysinfo.np, "show_config", lambda mode: {
        "Build Dependencies": {"blas": {"name": "scipy-openblas", "version": "0.3.27"}}})
    import scipy                              # the CPU step's products are SciPy's BLAS's
    monkeypatch.setattr(scipy, "show_config", lambda mode: {
        "Build Dependencies": {"blas": {"name": "scipy-openblas", "version": "0.3.28"}}})
    details = sysinfo.system_info()
    assert details["devices"] == ["cpu", "gpu0", "gpu1"]
    assert sysinfo.info_lines(details)[-1] == "devices    cpu, gpu0, gpu1"
    assert details["blas"] == "scipy-openblas 0.3.27"
    assert (details["scipy"], details["scipy_blas"]) == (scipy.__version__,
                                                         "scipy-openblas 0.3.28")
    assert "scipy_blas scipy-openblas 0.3.28" in sysinfo.info_lines(details)


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["gradcheck"], ["info"],
                                     ["bench"], ["predict"], ["report"], ["export"]])
def test_help_explains_with_an_example(command):
    result = cli(*command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout
    assert_help_has_an_example(command, result.stdout)


# --- errors -----------------------------------------------------------------------------------

@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Work in an empty folder holding model.npz: a valid, untrained 784-4-10 model."""
    from gpumlp.checkpoint import save_model
    from gpumlp.model import init_params

    monkeypatch.chdir(tmp_path)
    save_model("model.npz", init_params((784, 4, 10), "he", np.random.default_rng(0)),
               build_config(None, ["model.hidden=4"]))
    return tmp_path


@pytest.mark.parametrize("args, fragments", [
    (["train", "--config", "no-such-config.yaml", "--out", "run"], ["no-such-config.yaml",
                                                                    "does not exist"]),
    (["train", "--set", "optim.lrr=1", "--out", "run"], ["optim.lrr", "did you mean 'optim.lr'"]),
    (["train", "--set", "optim.lr", "--out", "run"], ["KEY=VALUE"]),
    (["train", "--set", "optim.lr=-1", "--out", "run"], ["optim.lr", "must be > 0"]),
    (["train", "--set", "model.hidden=[64, x]", "--out", "run"], ["model.hidden"]),
    (["train", "--device", "tpu", "--out", "run"], ["not a device", "cpu"]),
    (["train", "--resume", "run", "--seed", "1"], ["--resume takes the run's saved config"]),
    (["train", "--config", "", "--out", "run"], ["the config file path is empty"]),
    (["gradcheck", "--config", ""], ["the config file path is empty"]),
    (["train", "--config", ".", "--out", "run"], ["config file . is a folder, not a file"]),
    (["train", "--set", "optim..lr=3", "--out", "run"], ["'optim..lr' has an empty part"]),
    (["evaluate", "model.npz", "--device", "gpu0"], ["not a device"]),
    (["gradcheck", "--set", "model.activation=swish"], ["model.activation", "relu"]),
    (["gradcheck", "--samples", "0"], ["--samples"]),        # click's usage errors too
    (["gradcheck", "--batch", str(10 ** 19)], ["--batch", "1<=x<=60000"]),  # not a traceback
    (["bench", "--data", "synthetic", "--samples", str(10 ** 17)], ["--samples", "10000000"]),
    (["bench", "--hidden", str(10 ** 20)], ["--hidden", "1099511627776"]),  # not --set's name
    (["train", "--bogus"], ["No such option", "--bogus"]),
    (["evaluate"], ["Missing argument"]),
])
def test_config_and_device_errors_exit_2_with_one_line(args, fragments, in_tmp):
    assert_one_error_line(cli(*args), 2, *fragments)
    assert not (in_tmp / "run").exists()


@pytest.mark.parametrize("args, instead", [
    (["train", "--epochs", "3"], "--set train.epochs=3"),
    (["train", "--lr=0.05", "--out", "run"], "--set optim.lr=0.05"),
    (["train", "--batch-size", "64", "--device", "cpu"], "--set train.batch_size=64"),
    (["train", "--momentum", "-0.5"], "--set optim.momentum=-0.5"),    # a value, not an option
    (["train", "--hidden", "[64, 32]"], "--set model.hidden='[64, 32]'"),
    (["train", "--dropout", "--out", "run"], "--set model.dropout=VALUE"),
    (["train", "--nesterov", "--out", "run"], "--set optim.nesterov=true"),   # a flag: true
    (["train", "--epoch", "3"], "--set train.epochs=3"),        # the start of one key's name
    (["gradcheck", "--activation", "gelu"], "--set model.activation=gelu")])
def test_a_config_key_given_as_an_option_is_answered_with_its_set(args, instead, in_tmp):
    """`train --epochs 3`, a newcomer's first guess, got click's 'No such option' and --help."""
    assert_one_error_line(cli(*args), 2, f" {args[0]} has no option "   # (gpumlp: the runner's
                          f"{args[1].partition('=')[0]}; config keys are given with --set: "
                          f"{instead}")                                   # own name here)
    assert not (in_tmp / "run").exists()


@pytest.mark.parametrize("args, fragments", [
    (["train", "configs/h256.yaml"], [" train takes its config file with --config: ",
                                      " train --config configs/h256.yaml"]),
    (["train", "c.yaml", "--out", "run", "--set", "train.epochs=2"],     # the whole line again
     [" train --config c.yaml --out run --set train.epochs=2"]),
    (["train", "--resume", "run", "c.yaml"], ["--resume takes the run's saved config; drop "
                                              "c.yaml"]),
    (["train", "--out", "3", "--set", "train.epochs", "3"], ["--set train.epochs=3, not"]),
    (["gradcheck", "--set", "model.hidden=8", "my.yml"], [" gradcheck takes its config file "
                                                          "with --config"]),
    (["train", "--set", "train.epochs", "3", "--out", "run"],
     ["--set takes KEY=VALUE, one word: --set train.epochs=3, not --set train.epochs 3"]),
    (["train", "--set", "model.hidden", "[64, 32]"],
     ["--set model.hidden='[64, 32]', not --set model.hidden '[64, 32]'"]),
    (["data", "download"], [" data has no command 'download'; to get the MNIST files: ",
                            " data fetch"]),
    # others keep click's line: a second config file, an extra argument of evaluate
    (["train", "--config", "a.yaml", "b.yaml"], ["Got unexpected extra argument (b.yaml)"]),
    (["evaluate", "m.npz", "b", "c"], ["Got unexpected extra arguments (b c)"]),
    (["train", "--set", "--set", "3"], ["Got unexpected extra argument (3)"])])
def test_a_newcomers_usage_slip_is_answered_with_what_to_write(args, fragments, in_tmp):
    """`train configs/h256.yaml`, `--set KEY VALUE` and `data download` got click's 'Got
    unexpected extra argument' or 'No such command' and no hint of what to write."""
    assert_one_error_line(cli(*args), 2, *fragments)
    assert not (in_tmp / "run").exists()


@pytest.mark.parametrize("args", [
    ["train", "--bogus"], ["info", "--epochs", "3"],
    # a guess would be pasted as it is: a name that only holds a key's (train.epochs), or is
    # close to one, or starts several, is no key; nor one gradcheck does not read
    ["train", "--lr-warmup-epochs", "5"], ["train", "--test-batch-size", "9"],
    ["train", "--ini", "m.npz"], ["train", "--beta", "0.9"], ["train", "--no-shuffle"],
    ["gradcheck", "--lr", "0.1"], ["gradcheck", "--batch-size", "64"]])
def test_an_option_that_names_no_config_key_keeps_clicks_own_error(args):
    assert_one_error_line(cli(*args), 2, args[1], f" {args[0]} --help')")


def test_an_init_scheme_given_to_init_is_answered_with_its_set(in_tmp):
    """--init takes weights; `--init xavier` (the scheme's name) said only 'xavier: no such
    file'. A file of that name is still read as weights."""
    assert_one_error_line(cli("train", "--init", "xavier", "--out", "run"), 2,
                          "--init", "takes a model.npz to start from; the init scheme is --set "
                          "model.init=xavier")
    assert not (in_tmp / "run").exists()
    Path("he").write_text("not weights")
    assert "the init scheme" not in cli("train", "--init", "he", "--out", "run").output


def test_the_set_advice_stays_on_one_line():
    assert_one_error_line(cli("train", "--lr", "0.1\nx"), 2, "--set optim.lr='0.1\\nx'")


CUDA_COMMANDS = [["train", "--out", "run"], ["evaluate", "model.npz"],
                 ["predict", "model.npz", "digit.png"], ["bench", "--data", "synthetic"]]


@pytest.mark.parametrize("command", CUDA_COMMANDS)
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "CUDA"])
def test_cuda_without_cupy_says_how_to_fix_it(command, device, no_cupy, in_tmp):
    assert_one_error_line(cli(*command, "--device", device), 2, f"Error: --device {device}: "
                          "CuPy is not installed", "pip install -e '.[cuda12]'", "--device cpu")
    assert not (in_tmp / "run").exists()


def broken_module(monkeypatch, tmp_path, name: str, error: str) -> None:
    """A module `name` on the path that raises `error` when imported, as a broken install
    does (a CUDA driver too old, a shared library missing)."""
    folder = tmp_path / f"broken-{name}"
    folder.mkdir()
    (folder / f"{name}.py").write_text(f"raise {error}\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_cupy_that_cannot_be_loaded_is_not_said_to_be_missing(monkeypatch, tmp_path, in_tmp):
    """A CuPy whose import fails (an old driver) was 'not installed', in `info` and in the
    error of --device cuda: the user installs it again, and nothing changes."""
    broken_module(monkeypatch, tmp_path, "cupy",
                  "RuntimeError('CUDA driver version is insufficient for CUDA runtime version')")
    result = cli("bench", "--data", "synthetic", "--device", "cuda")
    assert_one_error_line(result, 2, "--device cuda: CuPy is installed but cannot be loaded "
                          "(RuntimeError: CUDA driver version is insufficient")
    assert "check that the NVIDIA driver supports CuPy's CUDA version" in result.stderr
    info = json.loads(cli("info", "--json").stdout)
    assert info["cupy"] is None
    assert info["unavailable"]["cupy"].startswith(
        "installed but cannot be loaded (RuntimeError: CUDA driver")


def test_a_cupy_that_cannot_make_its_kernel_cache_is_told_so_not_to_check_the_driver(
        monkeypatch, tmp_path, in_tmp):
    """CuPy 14 makes CUPY_CACHE_DIR at import: under `docker run --user` with a home it could
    not enter, the error blamed the driver."""
    broken_module(monkeypatch, tmp_path, "cupy",
                  "PermissionError(13, 'Permission denied', '/home/gpumlp/.cache')")
    result = cli("train", "--device", "cuda", "--out", "run")
    assert_one_error_line(result, 2, "--device cuda: CuPy is installed but cannot be loaded "
                          "(PermissionError: [Errno 13] Permission denied: '/home/gpumlp/.cache')"
                          "; CuPy could not make or reach that folder at import (its kernel "
                          "cache, CUPY_CACHE_DIR", "set CUPY_CACHE_DIR to a folder you can "
                          "write to, or use --device cpu")
    assert "driver" not in result.stderr
    info = cli("info")                             # the command the errors point to says so too
    assert ("\ncupy       installed but cannot be loaded (PermissionError: [Errno 13] Permission "
            "denied: '/home/gpumlp/.cache'); CuPy could not make or reach that folder at import"
            in info.stdout)
    assert "\ncuda       - (CuPy cannot be loaded)\n" in info.stdout   # not "no CuPy"
    details = json.loads(cli("info", "--json").stdout)["unavailable"]
    assert "set CUPY_CACHE_DIR" in details["cupy"] and details["cuda"] == "CuPy cannot be loaded"


def test_a_cupy_that_lacks_a_module_it_imports_is_told_to_get_it_not_to_check_the_driver(
        monkeypatch, tmp_path, in_tmp):
    broken_module(monkeypatch, tmp_path, "cupy",
                  "ModuleNotFoundError(\"No module named 'fastrlock'\", name='fastrlock')")
    result = cli("train", "--device", "cuda", "--out", "run")
    assert_one_error_line(result, 2, "--device cuda: CuPy is installed but cannot be loaded "
                          "(ModuleNotFoundError: No module named 'fastrlock'); install the module "
                          "it lacks (fastrlock), or reinstall CuPy with its dependencies, or use "
                          "--device cpu")
    assert "driver" not in result.stderr
    assert "install the module it lacks (fastrlock)" in cli("info").stdout


@pytest.mark.parametrize("lacking, advice", [
    ("fastrlock", "install the module it lacks (fastrlock), or reinstall CuPy with its "
                  "dependencies"),
    ("cupy_backends.cuda.api", "its install is incomplete: reinstall it")])
def test_cupy_13s_banner_over_a_missing_module_gives_that_modules_advice(
        monkeypatch, tmp_path, in_tmp, lacking, advice):
    """CuPy 13 re-raises what its import lacked as a plain ImportError under a banner of '='
    (raise ... from): the banner was the error shown, with the driver advice."""
    banner = "=" * 64
    broken_module(monkeypatch, tmp_path, "cupy", (
        f"ImportError('\\n{banner}\\nFailed to import CuPy.\\n{banner}\\n') from "
        f"ModuleNotFoundError(\"No module named '{lacking}'\", name='{lacking}')"))
    result = cli("train", "--device", "cuda", "--out", "run")
    assert_one_error_line(result, 2, "--device cuda: CuPy is installed but cannot be loaded "
                          f"(ModuleNotFoundError: No module named '{lacking}'); {advice}")
    assert "driver" not in result.stderr and "===" not in result.stderr


BANNER_FROM_FASTRLOCK = ("ImportError('\\n' + '=' * 64 + '\\nFailed to import CuPy.\\n' + "
                         "'=' * 64) from ModuleNotFoundError(\"No module named 'fastrlock'\", "
                         "name='fastrlock')")


def test_a_banner_raised_at_cupys_first_use_shows_what_it_was_raised_from(
        monkeypatch, tmp_path, in_tmp):
    """A CuPy that imports and raises its banner at first use: the '=' rule was the error
    shown, in --device cuda's line and twice in info."""
    folder = tmp_path / "late-cupy"
    folder.mkdir()
    (folder / "cupy.py").write_text(f'__version__ = "14.0.0"\n\ndef __getattr__(name):\n'
                                    f'    raise {BANNER_FROM_FASTRLOCK}\n')
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    result = cli("bench", "--data", "synthetic", "--device", "cuda")
    assert_one_error_line(result, 2, "--device cuda: CuPy is installed but cannot be loaded "
                          "(ModuleNotFoundError: No module named 'fastrlock'); install the "
                          "module it lacks (fastrlock), or reinstall CuPy with its "
                          "dependencies, or use --device cpu")
    info = cli("info").stdout
    assert "===" not in result.stderr + info and "No module named 'fastrlock'" in info
    assert "driver" not in result.stderr + info     # the module's advice, not nvidia-smi's


def test_a_cupy_error_chain_that_loops_ends_in_one_line_not_a_hang(monkeypatch, tmp_path,
                                                                     in_tmp):
    broken_module(monkeypatch, tmp_path, "cupy", "(lambda a, b: (setattr(a, '__cause__', b), "
                  "setattr(b, '__cause__', a), a)[2])(ImportError('banner'), "
                  "RuntimeError('driver'))")
    a, b, c = ImportError("banner"), RuntimeError("driver"), RuntimeError("c")
    for chain, last in (((a, b, a), b), ((a, b, c, b), c)):   # back to the first, or not
        for error, cause in zip(chain, chain[1:]):
            error.__cause__ = cause
        found = []  # original_error in a thread: a loop it does not end fails here, not hangs
        worker = threading.Thread(target=lambda: found.append(backend.original_error(a)),
                                  daemon=True)
        worker.start()
        worker.join(timeout=10)
        assert found == [last], "original_error went round the loop"
    result = cli("bench", "--data", "synthetic", "--device", "cuda")
    assert_one_error_line(result, 2, "--device cuda: CuPy is installed but cannot be loaded")


def test_the_real_import_of_a_missing_cupy_says_not_installed(monkeypatch, in_tmp):
    """The no_cupy fixture replaces _import_cupy; here `import cupy` itself fails as on a
    machine without CuPy (ModuleNotFoundError, name 'cupy'): 'not installed', never
    'installed but cannot be loaded ... reinstall it'."""
    monkeypatch.setitem(sys.modules, "cupy", None)   # import cupy: ModuleNotFoundError('cupy')
    monkeypatch.setattr(backend, "CUPY_IMPORT", [])
    assert backend._import_cupy() is None and backend.CUPY_IMPORT == []
    assert_one_error_line(cli("bench", "--data", "synthetic", "--device", "cuda"), 2,
                          "--device cuda: CuPy is not installed")
    info = json.loads(cli("info", "--json").stdout)
    assert info["unavailable"]["cupy"].startswith("not installed (pip install")


def test_error_summary_skips_a_banners_rules():
    from gpumlp.errors import error_summary
    banner = ImportError("\n" + "=" * 64 + "\n  Failed to import CuPy.\n" + "-" * 20)
    assert error_summary(banner) == "ImportError: Failed to import CuPy."
    assert error_summary(ImportError("=" * 8)) == "ImportError"
    assert error_summary(ValueError("a\nb")) == "ValueError: a"


def test_a_pytorch_that_cannot_be_loaded_is_not_said_to_be_missing(monkeypatch, tmp_path):
    broken_module(monkeypatch, tmp_path, "torch",
                  "OSError('libtorch_cpu.so: cannot open shared object file')")
    result = cli("bench", "--device", "cpu", "--data", "synthetic", "--samples", "64",
                 "--batch", "32", "--hidden", "8", "--torch")
    assert_one_error_line(result, 2, "--torch: PyTorch is installed but cannot be loaded "
                          "(OSError: libtorch_cpu.so: cannot open shared object file)")


@pytest.mark.parametrize("command", CUDA_COMMANDS)
def test_a_missing_gpu_is_named_as_the_user_wrote_the_device(command, monkeypatch, in_tmp):
    monkeypatch.setattr(backend, "_import_cupy", lambda: object())   # CuPy, but no GPU
    monkeypatch.setattr(backend, "_cuda_count", lambda cupy: 0)
    assert_one_error_line(cli(*command, "--device", "cuda"), 2,
                          "Error: --device cuda: no CUDA GPU is visible")


def insufficient_driver(*args):
    raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for "
                       "CUDA runtime version")


@pytest.mark.parametrize("driver, visible, said", [
    (12020, None, "the NVIDIA driver supports CUDA 12.2, older than the CUDA 13.0 this CuPy is "
            "built for: update the driver, or swap CuPy for the one for CUDA 12 (pip uninstall "
            "cupy-cuda13x; pip install -e '.[cuda12]' in the gpumlp folder)"),
    (0, None, "no NVIDIA driver is loaded; nvidia-smi says why"),
    (13000, None, "RuntimeError: cudaErrorInsufficientDriver: CUDA driver version is "
                  "insufficient for CUDA runtime version; nvidia-smi says whether the driver "
                  "sees a GPU"),
    (13000, "-1", "CUDA_VISIBLE_DEVICES is '-1', which names no GPU CUDA has; unset it, or name "
                  "a GPU nvidia-smi lists"),
    (13000, "0", "RuntimeError: cudaErrorInsufficientDriver: CUDA driver version is "   # SLURM's
                 "insufficient for CUDA runtime version (CUDA_VISIBLE_DEVICES is '0'); "
                 "nvidia-smi says whether the driver sees a GPU")])
def test_why_cuda_shows_no_gpu_is_said_by_device_cuda_and_info(monkeypatch, in_tmp, driver,
                                                               visible, said):
    """cupy-cuda13x on a CUDA 12 driver: CUDA raises at the device count, which said "driver
    missing or CUDA_VISIBLE_DEVICES empty", and info listed the CPU alone without a word."""
    import types
    runtime = types.SimpleNamespace(runtimeGetVersion=lambda: 13000,
                                    driverGetVersion=lambda: driver,
                                    getDeviceCount=insufficient_driver)
    cupy = types.SimpleNamespace(__version__="14.2.0", cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(backend, "_import_cupy", lambda: cupy)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)   # (which nvidia-smi ignores)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert_one_error_line(cli("train", "--device", "cuda", "--out", "run"), 2,
                          f"Error: --device cuda: no CUDA GPU is visible ({said}); use "
                          "--device cpu")
    assert not (in_tmp / "run").exists()
    assert json.loads(cli("info", "--json").stdout)["unavailable"] == {"gpu": said}
    assert f"\ndevices    cpu (no CUDA GPU: {said})\n" in cli("info").stdout


def test_a_cuda_visible_devices_past_the_last_gpu_is_named(monkeypatch):
    """CUDA_VISIBLE_DEVICES=1 on a machine of one GPU hides it (cudaErrorNoDevice), as '-1'
    does; nvidia-smi, which ignores the variable, would list the GPU. A GPU gone from the bus
    gives the same error: the line says both."""
    import types

    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    runtime = types.SimpleNamespace(runtimeGetVersion=lambda: 12080,
                                    driverGetVersion=lambda: 12080, getDeviceCount=no_device)
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")          # or a GPU fell off the bus:
    assert backend.no_gpu_reason(cupy) == ("CUDA finds no GPU, CUDA_VISIBLE_DEVICES being '1': "
                                           "if nvidia-smi lists GPUs, name one of them (from 0) "
                                           "or unset it; if it lists none, the driver sees no "
                                           "GPU")                      # both are said
    runtime.getDeviceCount = lambda: 0                      # no error, no GPU: the same
    assert backend.no_gpu_reason(cupy).startswith("CUDA finds no GPU, CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert backend.no_gpu_reason(cupy) == ("the driver (CUDA 12.8) reports no GPU; nvidia-smi "
                                           "says whether it sees one")
    runtime.driverGetVersion = lambda: (_ for _ in ()).throw(RuntimeError("no libcuda"))
    assert backend.no_gpu_reason(cupy) == ("CUDA reports no GPU (its driver's version could "
                                           "not be read); nvidia-smi says why")


class CudaWithoutCublas:
    """What CuPy 14 on a CUDA install without libcublas shows gpumlp: a GPU, and an ImportError
    at the first touch of cupy.cuda.cublas."""

    class cuda:
        class Device:
            def __init__(self, index):
                pass

            def use(self):
                pass

        def __getattr__(self, name):
            raise ImportError('Failure finding "libcublasLt.so.13 or libcublasLt.so.12"')

    cuda = cuda()


class CudaWithoutNvrtc:
    """CuPy 14 with cuBLAS but no NVRTC (found only at the first kernel's compile, which every
    CuPy operation needs: a traceback mid-run)."""

    class cuda:
        Device, cublas = CudaWithoutCublas.cuda.Device, object()

        class nvrtc:
            @staticmethod
            def getVersion():
                raise ImportError('Failure finding "libnvrtc.so.13 or libnvrtc.so.12"')


@pytest.mark.parametrize("command", CUDA_COMMANDS)
@pytest.mark.parametrize("fake, library, lost", [
    (CudaWithoutCublas, "cuBLAS", "libcublasLt.so.13 or libcublasLt.so.12"),
    (CudaWithoutNvrtc, "NVRTC", "libnvrtc.so.13 or libnvrtc.so.12")])
def test_a_library_cupy_cannot_load_is_named_before_any_work(command, monkeypatch, in_tmp, fake,
                                                             library, lost):
    """Not a traceback from the first product, or the first kernel compile, of a run."""
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)
    monkeypatch.setattr(backend, "_cuda_count", lambda cupy: 1)
    assert_one_error_line(cli(*command, "--device", "cuda"), 2,
                          f"Error: --device cuda: CuPy cannot load {library} (ImportError: "
                          f'Failure finding "{lost}"); CuPy 14 takes CUDA\'s libraries from a '
                          "CUDA Toolkit or from pip: pip install 'cupy-cuda12x[ctk]' or "
                          "'cupy-cuda13x[ctk]', the one you have, or use --device cpu")
    assert not (in_tmp / "run").exists()
    # named as the user wrote it, not cuda:0, which they never typed
    assert_one_error_line(cli(*command, "--device", "auto"), 2,
                          f"Error: --device auto (cuda:0): CuPy cannot load {library}")


@pytest.mark.parametrize("records, runtime, fix", [
    ({"cupy": ["cupy-cuda13x"]}, None, "pip install 'cupy-cuda13x[ctk]'"),
    ({}, 12090, "pip install 'cupy-cuda12x[ctk]'"),
    ({}, None, "'cupy-cuda12x[ctk]' or 'cupy-cuda13x[ctk]', the one you have"),
    ({"cupy": ["cupy"]}, 12080, "a CUDA Toolkit: install one that has it (with conda: conda "
                                "install cuda-toolkit)")])   # not a second CuPy from pip
def test_a_library_cupy_did_not_find_is_installed_with_the_ctk_extra_of_that_cupy(
        monkeypatch, records, runtime, fix):
    """CuPy 14's wheel has none of CUDA's libraries: a driver-only machine gets them with CuPy's
    ctk extra, for the CuPy installed (its package record, else the CUDA it was built for)."""
    import importlib.metadata
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: records)

    class runtime_of:
        @staticmethod
        def runtimeGetVersion():
            if runtime is None:
                raise RuntimeError("no libcudart")
            return runtime
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime_of))
    lost = RuntimeError('Failure finding "libnvrtc.so.13": No such file: libnvrtc.so.13')
    assert backend.library_fix(cupy, lost).endswith(fix)
    assert backend.library_fix(cupy, OSError("libcublas.so.13: undefined symbol: x")) == (
        "check the CUDA installation (nvidia-smi, gpumlp info)")


def test_file_errors_exit_1_with_one_line(in_tmp):
    assert_one_error_line(cli("evaluate", "missing.npz", "--device", "cpu"), 1, "missing.npz",
                          "no such file")
    Path("text.npz").write_text("not a zip")
    assert_one_error_line(cli("evaluate", "text.npz", "--device", "cpu"), 1, "not a readable .npz")
    np.save("array.npy", np.zeros(3))
    assert_one_error_line(cli("evaluate", "array.npy", "--device", "cpu"), 1, "not a readable .npz")
    np.savez("wrong.npz", W1=np.zeros((784, 3), np.float32), b1=np.zeros(3, np.float32),
             W2=np.zeros((3, 10), np.float32), b2=np.zeros(10, np.float32))
    assert_one_error_line(cli("train", "--init", "wrong.npz", "--device", "cpu", "--out", "run"),
                          1, "wrong.npz", "W1 has shape (784, 3)")
    assert_one_error_line(cli("evaluate", "wrong.npz", "--device", "cpu"), 1, "no config string")
    assert not Path("run").exists()


def test_ctrl_c_while_the_data_loads_stops_at_once_and_leaves_no_run(tmp_path, monkeypatch):
    """A download may take minutes: Ctrl-C then stops the command at once (exit 130) instead of
    waiting for the data and saving a checkpoint after the first step."""
    import signal

    import gpumlp.cli as cli_module

    def interrupted_download(data_dir, quiet):
        signal.raise_signal(signal.SIGINT)    # Ctrl-C now, handled before this returns
        raise AssertionError("Ctrl-C did not stop the command")

    monkeypatch.setattr(cli_module, "load_mnist_for", interrupted_download)
    out = tmp_path / "run"
    result = cli("train", "--config", SMOKE, "--device", "cpu", "--out", out)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert not out.exists()                              # nothing half-made is left behind


def sigterm_while_the_data_loads(out: Path, patch: str = "") -> None:
    """Run `gpumlp train --out out` in a child process whose data loading raises SIGTERM
    (after the Python `patch`); assert it ends as SIGTERM should (exit 143, no traceback)."""
    import subprocess
    import sys

    code = ("import signal, gpumlp.cli as c, gpumlp.runfiles as r\n"
            "def load(*args, **kwargs):\n"
            "    signal.raise_signal(signal.SIGTERM)\n"
            "    raise AssertionError('SIGTERM did not stop the command')\n"
            f"c.load_mnist_for = load\n{patch}"
            f"c.main(['train', '--config', {str(SMOKE)!r}, '--device', 'cpu',"
            f" '--out', {str(out)!r}])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "terminated (SIGTERM)"
    assert "Traceback" not in done.stderr


def python_c(script: str):
    """`python -c script` in a child process, where a signal cannot stop the tests."""
    import subprocess

    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)


def on_import(module: str, action: str) -> str:
    """Script lines that run `action` (one line of Python) when `module` is first imported,
    before it loads: a signal that lands while the command is loading."""
    return ("import importlib.abc\n"
            "class Loading(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            f"        if name == {module!r}:\n"
            f"            {action}\n"
            "        return None\n"
            "sys.meta_path.insert(0, Loading())\n")


@pytest.mark.parametrize("signame, code, said", [("SIGTERM", 143, "terminated (SIGTERM)"),
                                                  ("SIGHUP", 129, "hung up (SIGHUP)"),
                                                  ("SIGINT", 130, "interrupted")])
def test_a_signal_python_swallows_in_a_weakref_callback_still_ends_the_command(signame, code,
                                                                                said):
    """A signal that lands while a weakref or GC callback runs (matplotlib's, in `report`)
    raises there, where Python prints 'Exception ignored' and goes on: the command then ended
    with exit 0, as if never stopped."""
    script = ("import signal, weakref, gpumlp.cli as c, gpumlp.sysinfo as s\n"
              "class Thing: pass\n"
              "def details():\n"
              "    thing = Thing()\n"
              f"    ref = weakref.ref(thing, lambda r: signal.raise_signal(signal.{signame}))\n"
              "    del thing\n"
              "    return {'gpumlp': 'test'}\n"
              "s.system_info = details\n"
              "c.main(['info'])")
    done = python_c(script)
    assert done.returncode == code, done.stderr
    assert done.stderr == f"{said}\n"                     # no "Exception ignored" report


def swallowed(signame: str) -> str:
    """Python source: a function that raises `signame` inside a weakref callback, where Python
    swallows the exception the handler raises."""
    return ("import signal, weakref\n"
            "class Thing: pass\n"
            "def swallowed():\n"
            "    thing = Thing()\n"
            f"    ref = weakref.ref(thing, lambda r: signal.raise_signal(signal.{signame}))\n"
            "    del thing\n")


def test_ctrl_c_pressed_again_and_again_after_a_swallowed_one_stops_the_command():
    """Each press within a second of the last was ignored, so presses every half second
    never stopped it: only those within a second of the last one that stopped it are."""
    script = (swallowed("SIGINT") + "import time, gpumlp.cli as c, gpumlp.sysinfo as s\n"
              "def details():\n"
              "    swallowed()\n"
              "    for _ in range(4):\n"
              "        time.sleep(0.4)\n"
              "        signal.raise_signal(signal.SIGINT)\n"
              "    raise AssertionError('presses every 0.4 s for 1.6 s did not stop it')\n"
              "s.system_info = details\n"
              "c.main(['info'])")
    done = python_c(script)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "interrupted"


def train_swallowing_in_load(out, tiny_data_dir) -> str:
    """Python that runs `gpumlp train` into `out` on the tiny files, calling the script's
    swallowed() while the MNIST files load (before training)."""
    from gpumlp import fetch

    return ("import gpumlp.cli as c, gpumlp.fetch as f\n"
            f"f.CHECKSUMS = {dict(fetch.CHECKSUMS)!r}\n"            # the tiny files' own
            "load = c.load_mnist_for\n"
            "def loaded(*args, **kwargs):\n"
            "    swallowed()\n"
            "    return load(*args, **kwargs)\n"
            "c.load_mnist_for = loaded\n"
            f"c.main(['train', '--config', {str(SMOKE)!r}, *{TINY!r}, '--device', 'cpu',"
            f" '--out', {str(out)!r}, '--data-dir', {str(tiny_data_dir)!r}])")


def test_a_swallowed_ctrl_c_before_training_stops_the_run_before_it_trains(tmp_path,
                                                                           tiny_data_dir):
    """It used to train every epoch, write the model, then say 'interrupted' with exit 130."""
    out = tmp_path / "run"
    done = python_c(swallowed("SIGINT") + train_swallowing_in_load(out, tiny_data_dir))
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted"
    assert not (out / "model.npz").exists()


def test_a_ctrl_c_just_after_a_command_stopped_by_one_stops_the_next_command_too():
    """In one process (a program that runs several commands), a signal that stopped the last
    command is not the same stop sent twice for the next one."""
    script = ("import signal, gpumlp.cli as c, gpumlp.sysinfo as s\n"
              "def details():\n"
              "    signal.raise_signal(signal.SIGINT)\n"
              "    raise AssertionError('Ctrl-C did not stop the command')\n"
              "s.system_info = details\n"
              "for _ in range(2):\n"
              "    try:\n"
              "        c.main(['info'])\n"
              "    except SystemExit as e:\n"
              "        print('exit', e.code)\n")
    done = python_c(script)
    assert done.stdout.splitlines() == ["exit 130", "exit 130"], done.stderr


def two_swallowed(first: str, second: str) -> str:
    """Python source: `swallowed()`, which raises the signal `first` inside a weakref callback,
    where Python swallows the exception, then `second` (only noted when it comes at once)."""
    return ("import signal, weakref\n"
            "class Thing: pass\n"
            "def swallowed():\n"
            "    thing = Thing()\n"
            f"    ref = weakref.ref(thing, lambda r: signal.raise_signal(signal.{first}))\n"
            "    del thing\n"
            f"    signal.raise_signal(signal.{second})\n")


@pytest.mark.parametrize("first, second, code, said", [
    ("SIGINT", "SIGTERM", 130, "interrupted"), ("SIGTERM", "SIGINT", 143, "terminated (SIGTERM)")])
def test_of_two_signals_swallowed_in_a_command_the_first_says_how_it_ends(first, second, code,
                                                                          said):
    script = (two_swallowed(first, second) + "import gpumlp.cli as c, gpumlp.sysinfo as s\n"
              "c.monotonic = lambda: 0.0\n"                 # the second comes at once
              "def details():\n"
              "    swallowed()\n"
              "    return {'gpumlp': 'test'}\n"
              "s.system_info = details\n"
              "c.main(['info'])")
    done = python_c(script)
    assert (done.returncode, done.stderr) == (code, f"{said}\n")


@pytest.mark.parametrize("first, second, code, said", [
    ("SIGINT", "SIGTERM", 130, "interrupted"), ("SIGTERM", "SIGINT", 143, "terminated (SIGTERM)")])
def test_of_two_signals_swallowed_before_training_the_first_says_how_it_ends(
        first, second, code, said, tmp_path, tiny_data_dir):
    out = tmp_path / "run"
    done = python_c(two_swallowed(first, second) + "import gpumlp.cli as c\n"
                    "c.monotonic = lambda: 0.0\n"           # the second comes at once
                    + train_swallowing_in_load(out, tiny_data_dir))
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines()[-1] == said
    assert not (out / "model.npz").exists()


@pytest.mark.parametrize("ignored, caught", [("SIGINT", "SIGTERM"), ("SIGHUP", "SIGINT")],
                         ids=["sigint", "nohup"])
def test_a_signal_ignored_by_whoever_started_gpumlp_stays_ignored_in_training(ignored, caught):
    """`nohup gpumlp train` ignores SIGHUP: the run goes on when the terminal closes."""
    from gpumlp.cli import StopFlag, restore_handlers
    ignored, caught = getattr(signal, ignored), getattr(signal, caught)
    before = signal.signal(ignored, signal.SIG_IGN)
    try:
        previous = StopFlag().install()
        assert signal.getsignal(ignored) is signal.SIG_IGN
        assert ignored not in previous and caught in previous
        restore_handlers(previous)
    finally:
        signal.signal(ignored, before)


def test_stop_flag_ignored_puts_back_the_handlers_it_found(keep_stop_handlers):
    """Clean-up runs with SIGINT and SIGTERM ignored; after it, each has its handler again."""
    from gpumlp.cli import StopFlag

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGINT, mine)
    signal.signal(signal.SIGTERM, mine)
    with StopFlag.ignored():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is mine
    assert signal.getsignal(signal.SIGTERM) is mine


def test_a_commands_swallowed_signal_is_not_left_for_a_later_stop_flag():
    """A signal noted during one command (exit 130) must not make the StopFlag of a training
    run started later in the same process stop it before its first step."""
    script = (swallowed("SIGINT") + "import gpumlp.cli as c, gpumlp.sysinfo as s\n"
              "def details():\n"
              "    swallowed()\n"
              "    return {'gpumlp': 'test'}\n"
              "s.system_info = details\n"
              "try:\n"
              "    c.main(['info'])\n"
              "except SystemExit as e:\n"
              "    print('exit', e.code)\n"
              "flag = c.StopFlag()\n"
              "c.restore_handlers(flag.install())\n"
              "print('stopped', flag())\n")
    done = python_c(script)
    assert done.stdout.splitlines()[-2:] == ["exit 130", "stopped False"], done.stderr


@pytest.mark.parametrize("detail", ["", "No data left in file"])
def test_an_eof_error_that_leaves_a_command_is_one_line_exit_1_not_interrupted(monkeypatch,
                                                                                 detail):
    """click turns an EOFError that leaves a command into Abort, as it does Ctrl-C: that said
    "interrupted" (after a blank line), though nothing was; only signals exit 128 + N."""
    from gpumlp import sysinfo

    def end_of_input():
        raise EOFError(detail)
    monkeypatch.setattr(sysinfo, "system_info", end_of_input)
    result = cli("info")
    assert result.exit_code == 1
    assert result.stderr == (f"Error: an input ended before its end (EOFError"
                             f"{': ' + detail if detail else ''}); a file it read may be cut "
                             "short\n")


@pytest.mark.parametrize("args, code", [(["train", "--no-such-option"], 2), (["nosuch"], 2),
                                        (["info", "--json"], 0)])
def test_an_exit_code_stands_when_stderrs_reader_has_gone(args, code):
    """A usage error whose stderr pipe has no reader left exited 1, not 2: the write of its
    one line failed inside the handler, and that OSError became the exit code."""
    import subprocess

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "gpumlp", *args], stderr=write,
                              stdout=subprocess.DEVNULL, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == code


def test_an_interrupt_whose_stderr_reader_has_gone_still_exits_130():
    """domain_errors says "interrupted" through `tell`: a stderr that cannot be written
    leaves the exit code at 130."""
    script = ("import os, signal, gpumlp.cli as c, gpumlp.sysinfo as s\n"
              "r, w = os.pipe(); os.close(r); os.dup2(w, 2)\n"
              "def details():\n"
              "    signal.raise_signal(signal.SIGINT)\n"
              "s.system_info = details\n"
              "c.main(['info'])")
    assert python_c(script).returncode == 130


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stopped_trainings_exit_code_stands_when_stderrs_reader_has_gone(tmp_path, signame,
                                                                          code):
    """train's own stop line ('...; checkpoint saved. Resume with: ...') went through
    click.echo: with stderr's reader gone, a SIGTERM'd `train --quiet` exited 1, not 143."""
    script = ("import os, signal, gpumlp.cli as c, gpumlp.train as t\n"
              "r, w = os.pipe(); os.close(r); os.dup2(w, 2)\n"
              "c.load_mnist_for = lambda *args, **kwargs: None\n"
              "def stopped(*args, should_stop, **kwargs):\n"
              f"    signal.raise_signal(signal.{signame})\n"
              "    assert should_stop()\n"
              "    raise t.Interrupted('interrupted')\n"
              "t.train = stopped\n"
              f"c.main(['train', '--out', {str(tmp_path / 'run')!r}, '--quiet'])")
    assert python_c(script).returncode == code


def test_a_second_sigterm_in_the_first_ones_clean_up_is_no_traceback():
    """`timeout` signals the process and its group: two SIGTERMs at once; the second landed
    while the first's message was printed, and ended in a KeyboardInterrupt traceback."""
    script = ("import signal, gpumlp.cli as c, gpumlp.cli_common as cc, gpumlp.sysinfo as s\n"
              "def details():\n"
              "    signal.raise_signal(signal.SIGTERM)\n"
              "told = cc.interrupted_how\n"
              "def twice(e):\n"
              "    signal.raise_signal(signal.SIGTERM)\n"
              "    return told(e)\n"
              "s.system_info, c.interrupted_how, cc.interrupted_how = details, twice, twice\n"
              "c.main(['info'])")
    done = python_c(script)
    assert done.returncode == 143, done.stderr
    assert done.stderr == "terminated (SIGTERM)\n"          # no traceback, no blank line


def test_sigterm_while_the_data_loads_exits_143_and_leaves_no_run(tmp_path):
    """Outside training SIGTERM stops the command as Ctrl-C does, exit 143: in a container
    gpumlp is the first process, which the kernel spares a SIGTERM it does not handle (in a
    child process here, which the default action would kill: exit -15)."""
    sigterm_while_the_data_loads(tmp_path / "run")
    assert not (tmp_path / "run").exists()               # nothing half-made is left behind


# a script's lines: a second SIGTERM as the half-made run's files are being removed
SIGTERM_IN_THE_CLEAN_UP = (
        "discard = r.RunFiles.discard_unstarted\n"
        "def twice(self, *args, **kwargs):\n"
        "    assert (self.folder / 'config.yaml').exists()\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    discard(self, *args, **kwargs)\n"
        "r.RunFiles.discard_unstarted = twice\n")


def test_a_second_sigterm_during_the_clean_up_does_not_cut_it_short(tmp_path):
    """`timeout` signals gpumlp and its process group: two SIGTERMs, the second one while the
    half-made run is being removed."""
    sigterm_while_the_data_loads(tmp_path / "run", SIGTERM_IN_THE_CLEAN_UP)
    assert not (tmp_path / "run").exists()               # the clean-up ran to its end


@pytest.mark.parametrize("number, hint", [(errno.EACCES, "; check its permissions"),
                                          (errno.EPERM, "; check its permissions"),
                                          (errno.ENOSPC, "; free some space and try again"),
                                          (errno.ENAMETOOLONG, "; give a shorter path")])
def test_a_file_the_system_refused_is_named_with_what_to_do_about_it(number, hint, monkeypatch):
    from gpumlp import sysinfo

    def refused():
        raise OSError(number, os.strerror(number), "/some/file")
    monkeypatch.setattr(sysinfo, "system_info", refused)
    assert_one_error_line(cli("info"), 1, f"Error: /some/file: {os.strerror(number)}{hint}")


def test_out_of_memory_shows_the_first_line_of_what_the_allocator_said(monkeypatch):
    import gpumlp.gradcheck as gradcheck_module

    said = "Unable to allocate 6.9 PiB for an array"

    def too_large(*args, **kwargs):
        raise MemoryError(f"{said}\nwith shape (784, 1099511627776) and data type float64")
    monkeypatch.setattr(gradcheck_module, "gradcheck_config", too_large)
    assert_one_error_line(cli("gradcheck"), 1, f"Error: out of memory ({said}); lower --batch")


def test_a_sigterm_seconds_after_the_first_during_the_clean_up_does_not_cut_it_short(tmp_path):
    """A second `docker stop` (or Ctrl-C) well after the first, not one sent twice at once:
    the clean-up ignores it all the same (the clock moves 10 s each time it is read)."""
    sigterm_while_the_data_loads(tmp_path / "run", (
        "import itertools\n"
        "c.monotonic = itertools.count(0, 10).__next__\n" + SIGTERM_IN_THE_CLEAN_UP))
    assert not (tmp_path / "run").exists()               # the clean-up ran to its end


@pytest.mark.parametrize("args", [
    ["evaluate", "{long}.npz"], ["report", "{long}"], ["train", "--init", "{long}.npz"],
    ["train", "--resume", "{long}"], ["predict", "{long}.npz", "digit.png"]])
def test_a_path_too_long_for_the_system_is_one_line_that_says_so(args, tmp_path):
    long = str(tmp_path / ("a" * 300))
    result = cli(*(arg.format(long=long) for arg in args), "--device", "cpu")
    assert_one_error_line(result, 1, "File name too long; give a shorter path")
    assert list(tmp_path.iterdir()) == []


def test_gradcheck_says_when_a_parameter_was_checked_only_where_its_gradient_is_zero(monkeypatch):
    import gpumlp.gradcheck as gradcheck_module

    real = gradcheck_module.gradcheck_config

    def with_a_blank_sample(*args, **kwargs):
        results = real(*args, **kwargs)
        return [results[0]._replace(nonzero=0), *results[1:]]

    monkeypatch.setattr(gradcheck_module, "gradcheck_config", with_a_blank_sample)
    result = cli("gradcheck", "--set", "model.hidden=8", "--samples", "5")
    assert result.exit_code == 0
    assert "zero gradient" in result.stderr and "--samples" in result.stderr
    assert result.stdout.splitlines()[1].split()[:5] == ["W1", "(784,", "8)", "8", "0"]


def test_gradcheck_fails_when_every_entry_of_a_parameter_has_a_zero_gradient():
    """A deep net of width 2 whose units are dead on the batch: every entry of b1 ... W7 is
    compared and all are zero, where a backward off by 1/m would agree too. That is no check:
    FAIL, naming them, with advice that can help (not more --samples: all were drawn)."""
    result = cli("gradcheck", "--set", "model.hidden=[2, 2, 2, 2, 2, 2, 2, 2]")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("FAIL: ")
    assert result.stdout.splitlines()[-1].endswith("; only zero gradients in 12 parameters")
    assert ("note: every entry of b1, W2, b2, W3, b3, W4, b4, W5, b5, W6, b6, W7 has a zero "
            "gradient on this batch") in result.stderr
    assert "try another --batch or --set train.seed=N" in result.stderr


# --- fetching on the way ----------------------------------------------------------------------

@pytest.fixture
def tiny_mirror(tiny_mnist, monkeypatch, tmp_path):
    """An empty cache, the tiny MNIST's checksums as canonical, and one local mirror serving its
    files as the only source; the cache's MNIST folder."""
    from fetch_helpers import go_offline, start_server

    from gpumlp import fetch

    cache = go_offline(monkeypatch, tmp_path)
    monkeypatch.setattr(fetch, "CHECKSUMS", dict(tiny_mnist.checksums))
    server = start_server()
    files = {stem: (tiny_mnist.folder / f"{stem}.gz").read_bytes() for stem in tiny_mnist.checksums}
    monkeypatch.setattr(fetch, "MIRRORS", (server.mirror("good", "good", files),))
    yield cache
    server.stop()


def test_evaluate_says_on_stderr_when_it_repairs_the_cache(trained_model, tiny_mnist, tiny_mirror):
    """evaluate has no -q: a fetch it does is shown on stderr; its --json stdout stays clean."""
    empty = cli("evaluate", trained_model, "--device", "cpu", "--json")
    assert empty.exit_code == 0, empty.output
    assert "fetching MNIST from mirror http://127.0.0.1" in empty.stderr
    assert json.loads(empty.stdout)["n"] == len(tiny_mnist.mnist.test.labels)
    (tiny_mirror / "t10k-labels-idx1-ubyte").write_bytes(b"<html>for sale</html>")
    damaged = cli("evaluate", trained_model, "--device", "cpu", "--json")
    assert damaged.exit_code == 0, damaged.output
    assert f"passed over cache {tiny_mirror}: t10k-labels-idx1-ubyte: an HTML" in damaged.stderr
    assert "fetching MNIST from mirror http://127.0.0.1" in damaged.stderr
    assert json.loads(damaged.stdout) == json.loads(empty.stdout)
    again = cli("evaluate", trained_model, "--device", "cpu", "--json")   # repaired: no fetch
    assert again.stderr == "" and json.loads(again.stdout) == json.loads(empty.stdout)


def test_a_fetch_is_quiet_only_when_a_commands_own_quiet_asks(trained_model, tiny_mirror,
                                                              tmp_path):
    """report (no -q) shows a fetch on stderr, as evaluate does; train -q hides it."""
    run = tmp_path / "trained"
    shutil.copytree(trained_model.parent, run)
    shown = cli("report", run, "--device", "cpu")
    assert shown.exit_code == 0 and "fetching MNIST from mirror" in shown.stderr
    for name in list(tiny_mirror.iterdir()):
        name.unlink()
    quiet = cli("train", "--set", "model.hidden=8", "--set", "train.epochs=1", "--device", "cpu",
                "--out", tmp_path / "run", "-q")
    assert (quiet.exit_code, quiet.stderr) == (0, "") and len(list(tiny_mirror.iterdir())) == 4

@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [["info"], ["data", "path"], ["--help"], ["info", "--json"],
                                  [], ["data"]])
def test_output_that_cannot_be_written_is_one_error_line(args):
    import subprocess
    import sys

    with open("/dev/full", "w") as full:             # every write: No space left on device
        done = subprocess.run([sys.executable, "-m", "gpumlp", *args], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr == ("Error: cannot write the output (No space left on device); check "
                           "where it goes\n")


@pytest.mark.parametrize("args", [["info"], [], ["data"]])
def test_output_to_a_reader_that_has_gone_ends_in_silence_with_exit_1(args):
    """`gpumlp | head -0`: the reader stopped reading, nothing to say about it; a group's help
    (written outside click's own handling of a closed pipe) ended in a traceback."""
    import subprocess

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "gpumlp", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (1, "")


def test_output_a_latin_1_terminal_cannot_show_is_escaped_not_a_traceback(tmp_path):
    """Under a Latin-1 locale, a folder named with a euro sign used to end a finished command
    in UnicodeEncodeError; stdout and stderr now escape what their encoding lacks."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    folder = tmp_path / "run-\u20ac"
    done = subprocess.run([sys.executable, "-m", "gpumlp", "data", "path", "--data-dir",
                           str(folder)], capture_output=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    escaped = str(folder).replace("\u20ac", "\\u20ac").encode()
    assert done.stdout == escaped + b"\n"
    assert done.stderr.startswith(b"Warning: --data-dir " + escaped + b": no such folder")


def test_a_file_name_an_ascii_locale_cannot_decode_is_escaped_not_a_question_mark(tmp_path):
    """Under LC_ALL=C with PYTHONUTF8=0 (else Python makes the C locale UTF-8 itself), Python
    holds a name's non-ASCII bytes as surrogates, and click rewrapped the ASCII stream with
    errors="replace": every such byte printed as '?'."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LANG")}
    env.update(LC_ALL="C", PYTHONUTF8="0")
    done = subprocess.run([sys.executable, "-m", "gpumlp", "data", "path", "--data-dir",
                           os.fsencode(tmp_path) + b"/caf\xc3\xa9"], capture_output=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    escaped = os.fsencode(tmp_path) + b"/caf\\udcc3\\udca9"
    assert done.stdout == escaped + b"\n"
    assert done.stderr.startswith(b"Warning: --data-dir " + escaped + b": no such folder")


def test_ctrl_c_while_the_command_loads_is_one_line_and_exit_130(monkeypatch, capsys):
    """The console script imports the CLI (NumPy, click, ...) inside a guard: Ctrl-C then is
    `interrupted` and 130, as during a command, not an import's traceback."""
    import importlib.abc
    import sys

    from gpumlp import entry

    class InterruptedImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "gpumlp.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "gpumlp.cli")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    with pytest.raises(SystemExit) as stopped:
        try:
            entry.main()
        except KeyboardInterrupt:                  # would stop pytest itself: fail instead
            pytest.fail("Ctrl-C escaped while the CLI was imported")
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("how", ["raised", "swallowed"])
@pytest.mark.parametrize("signame, code, said", [("SIGTERM", 143, "terminated (SIGTERM)"),
                                                  ("SIGHUP", 129, "hung up (SIGHUP)"),
                                                  ("SIGINT", 130, "interrupted")])
def test_a_signal_while_the_cli_loads_stops_it_in_one_line(how, signame, code, said):
    """SIGTERM had no handler until the CLI was loaded: the process died without a word, and as
    a container's first process it was ignored (the run went on). A signal whose exception an
    import's callback swallowed let the command run to its end with exit 0."""
    signal_it = f"signal.raise_signal(signal.{signame})"
    if how == "swallowed":
        signal_it = (f"ref = weakref.ref(Thing(), lambda r: {signal_it})")
    script = ("import signal, sys, weakref\n"
              "class Thing: pass\n"
              + on_import("gpumlp.cli", signal_it) +
              "from gpumlp import entry\n"
              "sys.argv = ['gpumlp', 'info']\n"
              "entry.main()\n")
    done = python_c(script)
    assert (done.returncode, done.stdout, done.stderr) == (code, "", f"{said}\n")


@pytest.mark.parametrize("module", ["gpumlp.errors", "gpumlp.signals"])
def test_ctrl_c_while_the_console_script_loads_its_own_modules_is_one_line(module):
    """entry imports errors (tempfile, shlex, pathlib: tens of ms) and signals before main()
    takes SIGINT over: Ctrl-C then was Python's KeyboardInterrupt traceback, not `interrupted`
    and 130."""
    script = ("import signal, sys, runpy\n"
              + on_import(module, "signal.raise_signal(signal.SIGINT)") +
              "sys.argv = ['gpumlp', 'info']\n"
              "runpy.run_module('gpumlp', run_name='__main__')\n")
    done = python_c(script)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


@pytest.mark.parametrize("signame, code, said", [("SIGTERM", 143, "terminated (SIGTERM)"),
                                                   ("SIGINT", 130, "interrupted")])
def test_a_second_signal_while_the_console_script_says_the_first_is_no_traceback(signame, code,
                                                                                said):
    """`timeout` sends two SIGTERMs at once, a user may press Ctrl-C twice: the CLI is still
    loading when the first lands, and the second lands while the first is told."""
    script = ("import signal, sys\n"
              "from gpumlp import entry\n"
              "told = entry.interrupted_how\n"
              "def twice(e):\n"
              f"    signal.raise_signal(signal.{signame})\n"
              "    return told(e)\n"
              "entry.interrupted_how = twice\n"
              + on_import("gpumlp.cli", f"signal.raise_signal(signal.{signame})") +
              "sys.argv = ['gpumlp', 'info']\n"
              "entry.main()\n")
    done = python_c(script)
    assert (done.returncode, done.stdout, done.stderr) == (code, "", f"{said}\n")


def test_the_console_script_puts_back_the_signal_handlers_it_found(monkeypatch,
                                                                   keep_stop_handlers):
    """For a caller in the same process: SIGINT and SIGTERM are left on that caller's
    handlers, not on the guard the console script set while the CLI loaded."""
    from gpumlp import entry

    def mine(signum, frame):
        pass

    monkeypatch.setattr(sys, "argv", ["gpumlp", "--version"])
    signal.signal(signal.SIGINT, mine)
    signal.signal(signal.SIGTERM, mine)
    with pytest.raises(SystemExit) as ended:
        entry.main()
    assert ended.value.code == 0
    assert signal.getsignal(signal.SIGINT) is mine
    assert signal.getsignal(signal.SIGTERM) is mine


def test_the_console_script_leaves_the_unraisable_hook_as_it_found_it(monkeypatch):
    """For a caller in the same process: the hook that hides a swallowed signal's report is
    the command's, not left behind to hide later reports."""
    from gpumlp import entry

    hook = sys.unraisablehook
    monkeypatch.setattr(sys, "unraisablehook", hook)      # put back whatever happens
    monkeypatch.setattr(sys, "argv", ["gpumlp", "--version"])
    with pytest.raises(SystemExit) as ended:
        entry.main()
    assert ended.value.code == 0
    assert sys.unraisablehook is hook


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_ignored_by_whoever_started_gpumlp_stays_ignored_while_the_cli_loads(signame):
    """`nohup gpumlp ...` ignores SIGINT (and a parent may ignore SIGTERM): the guard around the
    import must not make such a signal stop the command."""
    script = ("import signal, sys\n"
              f"signal.signal(signal.{signame}, signal.SIG_IGN)\n"
              + on_import("gpumlp.cli", f"signal.raise_signal(signal.{signame})") +
              "from gpumlp import entry\n"
              "sys.argv = ['gpumlp', '--version']\n"
              "entry.main()\n")
    done = python_c(script)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split()[:2] == ["gpumlp,", "version"]


@pytest.mark.parametrize("signame, code, said", [("SIGTERM", 143, "terminated (SIGTERM)"),
                                                  ("SIGHUP", 129, "hung up (SIGHUP)"),
                                                  ("SIGINT", 130, "interrupted")])
def test_a_signal_after_the_cli_loads_but_before_it_takes_the_signals_is_one_line(signame, code,
                                                                                   said):
    """The CLI is loaded but has not yet set its own handlers: the guard's KeyboardInterrupt
    leaves the command itself, and the console script must still end it in one line."""
    script = ("import signal, sys, gpumlp.cli as c\n"
              "from gpumlp import entry\n"
              "def streams():\n"
              f"    signal.raise_signal(signal.{signame})\n"
              "c.closed_streams = streams\n"
              "sys.argv = ['gpumlp', '--version']\n"
              "entry.main()\n")
    done = python_c(script)
    assert (done.returncode, done.stdout, done.stderr) == (code, "", f"{said}\n")


@pytest.mark.parametrize("group", [[], ["data"]])
def test_the_command_lists_show_each_summary_whole(group):
    """click cuts a long first sentence to '...' in a group's list of commands."""
    result = cli(*group, "--help")
    listed = result.stdout.split("Commands:\n")[1].splitlines()
    assert len(listed) >= 4 and not any(line.endswith("...") for line in listed), listed


def test_python_dash_m_gpumlp_runs_the_command_through_the_entry_point():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gpumlp", "--version"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.split()[:2]) == (0, ["gpumlp,", "version"])


# --- the data-dir option, the progress lines, file names in errors -------------------------

@pytest.mark.parametrize("command", [["train", "--config", SMOKE], ["evaluate", "model.npz"],
                                     ["data", "path"], ["data", "verify"], ["report", "run"]])
def test_an_empty_data_dir_is_a_usage_error_and_an_empty_variable_is_unset(command, tmp_path,
                                                                           monkeypatch):
    """`--data-dir "$DIR"` with DIR unset would be the current folder, or no folder."""
    monkeypatch.chdir(tmp_path)
    assert_one_error_line(cli(*command, "--data-dir", ""), 2, "Invalid value for '--data-dir': "
                          "is empty; give the folder of the MNIST files, or leave it out")
    monkeypatch.setenv("GPUMLP_DATA_DIR", "")
    monkeypatch.setenv("GPUMLP_CACHE_DIR", str(tmp_path / "cache"))
    assert cli("data", "path").stdout == f"{tmp_path / 'cache' / 'mnist'}\n"


def test_the_start_line_counts_epochs_in_words_and_examples_with_separators(capsys):
    from gpumlp.progress import Reporter

    info = {"device": "cpu (NumPy)", "n_train": 300, "batches": 3, "epoch": 0}
    Reporter()("start", {**info, "epochs": 1})
    Reporter()("start", {**info, "epochs": 2, "epoch": 1, "restored": True})
    Reporter()("start", {**info, "n_train": 60000, "batches": 1875, "epochs": 1})
    Reporter()("start", {**info, "n_train": 100, "batches": 1, "epochs": 1})
    assert capsys.readouterr().err == (
        "training on cpu (NumPy): 300 examples, 3 batches per epoch, 1 epoch\n"
        "training on cpu (NumPy): 300 examples, 3 batches per epoch, 2 epochs (resuming after "
        "epoch 1)\n"
        "training on cpu (NumPy): 60,000 examples, 1,875 batches per epoch, 1 epoch\n"
        "training on cpu (NumPy): 100 examples, 1 batch per epoch, 1 epoch\n")


@pytest.mark.parametrize("warning", [{"unchecked": True}, {"stale": "report.md is older"}])
def test_a_warning_before_training_is_said_even_when_quiet_but_not_when_nothing_is_left(warning,
                                                                                      capsys):
    from gpumlp.progress import Reporter

    info = {"device": "cpu (NumPy)", "n_train": 300, "batches": 3, "epochs": 2, **warning}
    Reporter(quiet=True)("start", {**info, "epoch": 1})
    assert capsys.readouterr().err.startswith("Warning: ")
    Reporter(quiet=True)("start", {**info, "epoch": 2})          # the run is done: no training
    assert capsys.readouterr().err == ""


def test_the_epoch_line_shows_the_validation_numbers_of_a_run_that_has_them():
    from gpumlp.progress import format_epoch
    row = {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.25,
           "val_accuracy": 0.875, "test_loss": 0.3, "test_accuracy": 0.9, "lr": 0.1,
           "seconds": 1.5, "samples_per_second": 1000.0}
    line = format_epoch(row)
    assert "val_loss 0.2500" in line and "val_acc 0.8750" in line
    assert "val_" not in format_epoch({k: v for k, v in row.items() if not k.startswith("val")})


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


EPOCH_ROW = {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "test_loss": 0.3,
             "test_accuracy": 0.9, "lr": 0.1, "seconds": 1.5, "samples_per_second": 1000.0}


@pytest.mark.parametrize("terminal", [True, False])
def test_a_progress_bar_is_drawn_only_when_stderr_is_a_terminal(terminal, monkeypatch, capsys):
    from gpumlp.progress import Reporter

    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    reporter = Reporter()
    for batch in (1, 2, 3):
        reporter("step", {"epoch": 1, "batch": batch, "batches": 3})
    reporter.close()
    assert ("epoch 1:" in stderr.getvalue()) == terminal
    assert capsys.readouterr().out == ""                 # stdout is the command's own


def test_each_epochs_bar_is_a_new_one_that_starts_from_the_batches_already_done(monkeypatch):
    """A resumed epoch's bar starts where the checkpoint left it (batch 3 of 5 next: 2/5), and
    the epoch's line replaces its bar, then the next epoch has a bar of its own."""
    from gpumlp.progress import Reporter

    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    reporter = Reporter()
    for batch in (3, 4, 5):
        reporter("step", {"epoch": 1, "batch": batch, "batches": 5})
    reporter("epoch", EPOCH_ROW)
    reporter("step", {"epoch": 2, "batch": 1, "batches": 5})
    reporter.close()
    shown = stderr.getvalue()
    assert "epoch 1:  40%" in shown and "| 2/5 " in shown
    before, line, after = shown.partition("epoch   1  train_loss")
    assert "epoch 1:" in before and before.endswith("\r") and "epoch 1:" not in after
    assert "epoch 2:   0%" in after and "| 0/5 " in after


def test_a_line_break_in_a_file_name_keeps_the_error_on_one_line(tmp_path):
    """A run folder named with a newline: the error is one line, the break shown as \\n; the
    report of every download source failing keeps its line per source (test_cli_data)."""
    folder = tmp_path / "new\nline"
    result = cli("train", "--resume", folder)
    assert_one_error_line(result, 1, f"--resume {tmp_path}/new\\nline: no such folder")


@pytest.mark.parametrize("args, code, fragment", [
    (["data", "image", "0", "taken\n.png"], 1, "Error: taken\\n.png: already exists; pass"),
    (["data", "image", "0", "d\n.jpg"], 2, "Error: d\\n.jpg: the name must end in .png"),
    (["data", "image", "0", "no\ndir/x.png"], 1, "cannot write in no\\ndir (no such folder)"),
    (["data", "verify", "--data-dir", "no\ndir"], 1, "Error: --data-dir no\\ndir: no such"),
    (["export", "model.npz", "--out", "x\n.txt"], 2, "Error: --out x\\n.txt: the output's"),
    (["export", "model.npz", "--out", "no\ndir/x.onnx"], 1, "Error: --out no\\ndir/x.onnx: "),
], ids=["image taken", "image suffix", "image folder", "verify", "export suffix",
        "export folder"])
def test_a_line_break_in_a_name_given_to_data_or_export_keeps_the_error_on_one_line(
        tmp_path, monkeypatch, args, code, fragment):
    """Errors those commands raise themselves (not a library's) were printed as they were
    made: a name's line break split them over two or three lines."""
    from gpumlp.checkpoint import save_model
    from gpumlp.model import init_params

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken\n.png").write_bytes(b"mine")
    config = build_config(None, ["model.hidden=8"])
    save_model(tmp_path / "model.npz", init_params((784, 8, 10), "he",
                                                   np.random.default_rng(0), "float32"), config)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(*args)
    assert_one_error_line(result, code, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "taken\n.png").read_bytes() == b"mine"


def test_a_line_break_in_a_data_folders_name_keeps_its_warning_on_one_line(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("GPUMLP_DATA_DIR", str(tmp_path))  # CI sets it only beside ../shared
    result = cli("data", "path", "--data-dir", tmp_path / "no\ndir")
    assert result.exit_code == 0
    assert result.stderr == (f"Warning: --data-dir {tmp_path}/no\\ndir: no such folder; reading "
                             "the MNIST files from it will fail until it holds them (or drop "
                             "--data-dir and unset GPUMLP_DATA_DIR to use the cache)\n")


def test_a_carriage_return_in_a_file_name_keeps_the_error_on_one_line(tmp_path):
    """A \\r would send the terminal back to the start of the line, over the message."""
    result = cli("train", "--resume", tmp_path / "new\rline")
    assert_one_error_line(result, 1, f"--resume {tmp_path}/new\\rline: no such folder")


# --- standard streams closed at start or while running ---------------------------------------

def test_a_stdout_closed_at_start_is_one_error_line_not_silence(monkeypatch, capsys):
    """`gpumlp info >&-`: Python starts with sys.stdout None, where click.echo writes nothing
    and the command would end 0 with its output lost."""
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(SystemExit) as ended:
        main.main(["info"], prog_name="gpumlp")
    assert ended.value.code == 1
    assert capsys.readouterr().err == ("Error: cannot write the output (standard output is "
                                       "closed); check where it goes\n")


def test_a_stderr_closed_at_start_still_trains(tiny_data_dir, tmp_path, monkeypatch):
    """`gpumlp train ... 2>&-`: the progress has nowhere to go, the run is made all the same
    (it ended in an AttributeError, leaving a half-made run folder)."""
    monkeypatch.setattr(sys, "stderr", None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as ended:
        main.main(["train", "--config", SMOKE, *TINY, "--set", "train.epochs=1", "--device",
                   "cpu", "--out", str(out), "--data-dir", str(tiny_data_dir)], prog_name="gpumlp")
    sys.stderr.close()                                   # the null device it was given
    assert ended.value.code == 0
    assert (out / "model.npz").is_file()


def test_progress_that_cannot_be_written_does_not_stop_training(monkeypatch):
    """`gpumlp train ... 2>&1 | head -1`: once the reader is gone, the progress lines fail with
    BrokenPipeError; the reporter stops showing them and training goes on."""
    from gpumlp.progress import Reporter

    class GonePipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", GonePipe())
    reporter = Reporter()
    info = {"device": "cpu (NumPy)", "n_train": 300, "batches": 3, "epoch": 0, "epochs": 2,
            "stale": "the report is old"}
    reporter("start", info)                              # no exception: it goes quiet
    assert reporter.quiet
    reporter("step", {"epoch": 1, "batch": 1, "batches": 3})
    reporter("epoch", {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "test_loss": 0.3,
                       "test_accuracy": 0.9, "lr": 0.1, "seconds": 1.5,
                       "samples_per_second": 1000.0})
    reporter.close()


@pytest.mark.parametrize("args, name", [(["report", ""], "RUN_DIR"), (["evaluate", ""], "MODEL"),
                                        (["predict", "", "x.png"], "MODEL"),
                                        (["export", ""], "MODEL")])
def test_an_empty_model_or_run_folder_argument_is_a_usage_error_not_the_current_folder(
        args, name, tmp_path, monkeypatch):
    """`gpumlp report "$RUN"` with RUN unset: "" would be the current folder (report wrote
    report.md there, titled with an empty name)."""
    monkeypatch.chdir(tmp_path)
    result = cli(*args)
    assert_one_error_line(result, 2, f"Invalid value for '{name}': is empty; give a ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, files", [
    (["evaluate"], "the MNIST test files, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"),
    (["report"], "the MNIST test files, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"),
    (["bench"], "the MNIST training files, train-images-idx3-ubyte and train-labels-idx1-ubyte"),
    (["train"], "the four MNIST files")])
def test_data_dir_help_names_the_files_the_command_reads(command, files):
    """evaluate and report read the test files alone, bench the training files: their help
    asked for the four."""
    text = " ".join(cli(*command, "--help").stdout.split())
    assert f"--data-dir PATH Folder with {files}" in text.replace("- ", "-")


def test_error_summary_is_the_type_and_the_first_line_of_the_message():
    from gpumlp.errors import error_summary

    assert error_summary(ImportError("libcublas.so.13: cannot open\nmore")) == (
        "ImportError: libcublas.so.13: cannot open")
    assert error_summary(RuntimeError("  \n")) == "RuntimeError"  # no message: the type alone
