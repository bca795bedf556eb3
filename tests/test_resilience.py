"""Runs that survive: SIGKILL, Ctrl-C and SIGTERM followed by --resume end byte-identical to an
uninterrupted run; a NaN (or weights too large to use) stops training with the last good
checkpoint intact; a failed write keeps the previous checkpoint; every bad input is one line,
no traceback, no damage."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from step_helpers import SignalsAt, WrappedStep, wrap_steps
from test_cli import cli

import gpumlp.train as train_module
from gpumlp import npzio
from gpumlp.checkpoint import load_init, load_model, save_model
from gpumlp.config import build_config
from gpumlp.errors import CheckpointError, GpumlpError, shell_path
from gpumlp.mnist import Mnist, Split
from gpumlp.model import init_params
from gpumlp.npzio import load_npz
from gpumlp.runfiles import RunFiles
from gpumlp.train import NumericalError, train

ROOT = Path(__file__).resolve().parents[1]
# 16 epochs: a run of a few seconds even with the fast CPU step, so random kills land inside it
EPOCHS = 16
RUN_SET = ["--set", "model.hidden=32", "--set", "data.limit=6000",
           "--set", f"train.epochs={EPOCHS}", "--set", "train.batch_size=50",
           "--set", "train.checkpoint_every=7", "--set", "model.dropout=0.1",
           "--device", "cpu", "-q"]


def gpumlp_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpumlp", *args]


def env_for(data_dir: Path) -> dict:
    env = dict(os.environ, GPUMLP_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT))
    env.pop("GPUMLP_CACHE_DIR", None)
    return env


def run_to_end(out: Path, env: dict) -> None:
    result = subprocess.run(gpumlp_cmd("train", "--config", str(ROOT / "configs/smoke.yaml"),
                                       "--out", str(out), *RUN_SET),
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir) -> tuple[Path, dict, float]:
    """An uninterrupted run, the environment that ran it and its wall time (s)."""
    env = env_for(mnist_dir)
    out = tmp_path_factory.mktemp("reference") / "run"
    start = time.perf_counter()
    run_to_end(out, env)
    return out, env, time.perf_counter() - start


def test_sigkill_at_random_moments_then_resume_is_byte_identical(reference, tmp_path):
    """Up to four SIGKILLs at random moments of a run, each followed by --resume. The moments
    scale with the reference run's time; when the run ends before the first of them (the
    reference, the first run of a fresh venv, was slowed by compiling and caching), the run is
    started over with moments half as late."""
    ref, env, seconds = reference
    out = tmp_path / "run"
    rnd = random.Random(1234)
    fresh = gpumlp_cmd("train", "--config", str(ROOT / "configs/smoke.yaml"), "--out", str(out),
                       "--overwrite", *RUN_SET)
    resume = gpumlp_cmd("train", "--resume", str(out), "--device", "cpu", "-q")
    kills, scale = 0, seconds
    while kills == 0 and scale > seconds / 20:
        proc = subprocess.Popen(fresh, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(4):
            time.sleep(rnd.uniform(0.2, 0.6) * scale)  # within a run, however fast this machine
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            started = (out / "config.yaml").exists()  # else killed before it wrote anything
            proc = subprocess.Popen(resume if started else fresh, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        scale /= 2
    assert kills >= 1
    assert (out / "model.npz").read_bytes() == (ref / "model.npz").read_bytes()


@pytest.mark.parametrize("signum, code, said", [
    (signal.SIGINT, 130, "interrupted; checkpoint saved"),                  # Ctrl-C
    (signal.SIGTERM, 143, "terminated (SIGTERM); checkpoint saved"),      # docker stop
    *([(signal.SIGHUP, 129, "hung up (SIGHUP); checkpoint saved")]        # the terminal closed
      if hasattr(signal, "SIGHUP") else []),                              # (not on Windows)
], ids=["ctrl_c", "sigterm", "sighup"][:3 if hasattr(signal, "SIGHUP") else 2])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_exits_128_plus_n_and_resumes_identically(
        reference, tmp_path, signum, code, said):
    ref, env, _ = reference
    out = tmp_path / "run"
    proc = subprocess.Popen(gpumlp_cmd("train", "--config", str(ROOT / "configs/smoke.yaml"),
                                       "--out", str(out), *RUN_SET), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.02)
    metrics = out / "metrics.jsonl"
    epochs_done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        # only a signal after the last step may let the run finish: one sent with two or more
        # epochs still to train (one row may be appended between the read and the signal) that
        # did not stop it was not handled, which a skip would hide
        ignored = " (ignored here too: gpumlp keeps it so)" * (
            signal.getsignal(signum) is signal.SIG_IGN)
        assert epochs_done >= EPOCHS - 2, (f"the run went on after {signal.Signals(signum).name}"
                                           f"{ignored}, sent after {epochs_done} of {EPOCHS} "
                                           f"epochs: {err}")
        pytest.skip(f"the run finished before {signal.Signals(signum).name} arrived")
    assert proc.returncode == code, err
    command = f"gpumlp train --resume {shell_path(out)} --device cpu"  # the device it had
    assert err.strip().splitlines()[-1] == f"{said}. Resume with: {command}"
    assert "Traceback" not in err
    resumed = subprocess.run(gpumlp_cmd(*shlex.split(command)[1:], "-q"),   # as printed
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "model.npz").read_bytes() == (ref / "model.npz").read_bytes()


def tiny_mnist(n_train: int = 300, n_test: int = 100) -> Mnist:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n_train + n_test).astype(np.uint8)
    images = rng.integers(0, 256, (n_train + n_test, 784)).astype(np.uint8)
    return Mnist(Split(images[:n_train], labels[:n_train]),
                 Split(images[n_train:], labels[n_train:]))


def tiny_config(*overrides: str):
    return build_config(None, ["model.hidden=16", "train.epochs=2", "train.batch_size=30",
                               "train.checkpoint_every=5", *overrides])


def test_nan_stops_at_once_naming_epoch_and_step_and_keeps_last_good_checkpoint(tmp_path,
                                                                                monkeypatch):
    make_step = train_module.make_step

    def poisoned(config, backend):
        step = make_step(config, backend)

        def wrapped(params, state, X, y, lr, t, masks):
            out = step(params, state, X, y, lr, t, masks)
            if t == 8:  # the weights go bad after step 8; the loss of step 9 shows it
                params.W[0][...] = np.nan
            return out
        return wrapped

    monkeypatch.setattr(train_module, "make_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NumericalError) as info:
        train(tiny_config(), __import__("gpumlp.backend").backend.CPU, tiny_mnist(), out_dir=out)
    message = str(info.value)
    assert "epoch 1, step 9" in message and "last good checkpoint" in message
    arrays = load_npz(out / "checkpoint.npz")
    assert all(np.isfinite(arrays[k]).all() for k in ("W1", "b1", "W2", "b2"))
    assert '"step": 5' in str(arrays["state"])


class InfiniteAfter(WrappedStep):
    """The run's step, whose update at step `at` makes the last weights infinite: the loss of
    that step, computed before the update, is still finite."""

    def __init__(self, step, at: int):
        super().__init__(step, at)
        self.taken = 0

    def __call__(self, params, state, X, y, lr, t, masks):
        out = self.step(params, state, X, y, lr, t, masks)
        self.taken = t
        if t == self.at:
            params.W[-1][...] = np.inf
        return out


class TooLargeAfter(InfiniteAfter):
    """The run's step, whose update at step `at` multiplies every weight by 1e30: finite, and
    the loss of that step is finite, but any loss computed with the weights is NaN."""

    def __call__(self, params, state, X, y, lr, t, masks):
        out = self.step(params, state, X, y, lr, t, masks)
        self.taken = t
        if t == self.at:
            for W in params.W:
                W *= 1e30
        return out


def assert_step_5s_checkpoint(out: Path) -> None:
    arrays = load_npz(out / "checkpoint.npz")                    # step 5's, not step 6's
    assert all(np.isfinite(arrays[k]).all() for k in ("W1", "b1", "W2", "b2"))
    assert np.abs(arrays["W1"]).max() < 10
    assert '"step": 5' in str(arrays["state"])


@pytest.mark.parametrize("trigger", ["checkpoint_every", "ctrl_c"])
def test_a_checkpoint_of_infinite_weights_is_never_written(tmp_path, monkeypatch, trigger):
    steps = []
    steps = wrap_steps(monkeypatch, lambda step: InfiniteAfter(step, at=6))
    config = tiny_config(*["train.checkpoint_every=1"] * (trigger == "checkpoint_every"))
    stop = (lambda: steps[-1].taken >= 6) if trigger == "ctrl_c" else (lambda: False)
    out = tmp_path / "run"
    with pytest.raises(NumericalError) as info:
        train(config, __import__("gpumlp.backend").backend.CPU, tiny_mnist(), out_dir=out,
              should_stop=stop)
    message = str(info.value)
    assert "weights became NaN or infinite in epoch 1 (by step 6)" in message
    assert "last good checkpoint" in message
    assert_step_5s_checkpoint(out)


@pytest.mark.parametrize("trigger", ["checkpoint_every", "ctrl_c"])
def test_a_checkpoint_of_weights_too_large_to_use_is_skipped_never_written(tmp_path,
                                                                           monkeypatch, trigger):
    """Finite weights whose probe loss is NaN are not checkpointed; the run is not ended for
    it (a spike may fall back), but by what follows: here the next step's NaN loss, or the stop
    asked for, which keeps step 5's checkpoint as the last good."""
    steps, skipped = [], []
    steps = wrap_steps(monkeypatch, lambda step: TooLargeAfter(step, at=6))
    config = tiny_config(*["train.checkpoint_every=1"] * (trigger == "checkpoint_every"))
    stop = (lambda: steps[-1].taken >= 6) if trigger == "ctrl_c" else (lambda: False)
    out = tmp_path / "run"
    probe = "their loss on the first 100 training examples was NaN or infinite"
    with pytest.raises(NumericalError if trigger == "checkpoint_every"
                       else GpumlpError) as info:
        train(config, __import__("gpumlp.backend").backend.CPU, tiny_mnist(), out_dir=out,
              should_stop=stop,
              on_event=lambda kind, info: skipped.append(info) if kind == "skipped" else None)
    message = str(info.value)
    if trigger == "checkpoint_every":   # step 6's checkpoint skipped, then step 7's loss is NaN
        assert skipped == [{"step": 6, "epoch": 1, "probe": probe, "saved_step": 5,
                            "checkpoint": str(out / "checkpoint.npz")}]
        assert message.startswith("the loss became NaN or infinite at epoch 1, step 7; the last "
                                  "good checkpoint")
    else:
        assert type(info.value).__name__ == "StoppedUnsaved" and skipped == []
        assert message == (f"stopped after step 6, whose weights were too large to checkpoint "
                           f"({probe}); the last good checkpoint {out / 'checkpoint.npz'} "
                           "(step 5) is kept")
    assert_step_5s_checkpoint(out)


# smoke.yaml on the tiny set at lr 1, 9 steps an epoch: the loss on the first 100 training
# examples of the weights after steps 5 and 6 is 615 and 380 (above 230), then falls back
SPIKE = ["--config", ROOT / "configs/smoke.yaml", "--set", "data.limit=null", "--set",
         "data.val_size=50", "--set", "optim.lr=1", "--set", "train.batch_size=30",
         "--device", "cpu", "-q"]
TOO_LARGE_AT_5 = ("after step 5, whose weights were too large to checkpoint (their loss on the "
                  "first 100 training examples was 615, above 230)")


def model_without_checkpoint_every(path: Path) -> dict:
    arrays = load_npz(path)
    config = json.loads(str(arrays.pop("config")))
    config["train"].pop("checkpoint_every")
    return {"config": config, **{name: a.tobytes() for name, a in arrays.items()}}


def test_a_loss_spike_ends_the_run_the_same_whatever_train_checkpoint_every(tiny_data_dir,
                                                                           tmp_path):
    """The reviewer's sweep: exit 0 with checkpoint_every 0, exit 1 ("... became 615 (above
    230) ...: the weights are finite but too large to use") with 1 or 2. Now each finishes with
    the same model (model.npz differs only in the config key), a checkpoint skipped in the
    spike said once, as a warning shown with --quiet."""
    results = {every: cli("train", *SPIKE, "--set", f"train.checkpoint_every={every}",
                          "--out", tmp_path / str(every), "--data-dir", tiny_data_dir)
               for every in (0, 1, 2, 4)}
    assert {every: r.exit_code for every, r in results.items()} == {0: 0, 1: 0, 2: 0, 4: 0}, \
        {every: r.stderr for every, r in results.items()}
    warning = ("Warning: skipped the checkpoint at step {}: its weights were too large to go on "
               "from (their loss on the first 100 training examples was {}, above 230); "
               "training on, as such a spike can fall back (a NaN or infinite loss of a step "
               "still ends the run); the last good checkpoint is {} "
               "(step 4) (later skips are not reported)\n")
    assert results[0].stderr == results[4].stderr == ""             # none due in the spike
    assert results[1].stderr == warning.format(5, 615, tmp_path / "1" / "checkpoint.npz")
    assert results[2].stderr == warning.format(6, 380, tmp_path / "2" / "checkpoint.npz")
    models = [model_without_checkpoint_every(tmp_path / str(every) / "model.npz")
              for every in (0, 1, 2, 4)]
    assert all(model == models[0] for model in models[1:])


@pytest.mark.parametrize("signum, every, code, said", [
    (signal.SIGINT, 0, 130, "interrupted"),
    (signal.SIGTERM, 2, 143, "terminated (SIGTERM)"),
], ids=["ctrl_c_before_any_checkpoint", "sigterm_after_step_4s"])
def test_a_stop_in_a_loss_spike_exits_128_plus_n_keeping_the_last_good_checkpoint(
        tiny_data_dir, tmp_path, monkeypatch, signum, every, code, said):
    """A stop after step 5, whose weights are too large to checkpoint, ended the run with exit
    1 and advice to lower optim.lr, and removed a new run's folder. Now it exits 128 + n: with
    step 4's checkpoint kept (whose resume ends as the run would have), or, with none written
    yet, as a stop during the set-up: the new run's folder goes, and the line says so."""
    args = [*SPIKE, "--set", f"train.checkpoint_every={every}", "--data-dir", tiny_data_dir]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert cli("train", *args, "--out", reference).exit_code == 0
    with monkeypatch.context() as patched:
        wrap_steps(patched, lambda step: SignalsAt(step, 5, signum))
        result = cli("train", *args, "--out", out)
    assert result.exit_code == code, result.output
    resume = f"gpumlp train --resume {shell_path(out)} --device cpu --data-dir " \
             f"{shell_path(tiny_data_dir)}"
    if every == 0:
        assert result.stderr == (f"{said} {TOO_LARGE_AT_5}; no checkpoint was written yet, so "
                                 "there is nothing to resume: start over (run the same command "
                                 "again)\n")
        assert not out.exists()
        return
    assert result.stderr == (f"{said} {TOO_LARGE_AT_5}, so the last good checkpoint (step 4) is "
                             f"kept. Resume with: {resume}\n")
    assert '"step": 4,' in str(load_npz(out / "checkpoint.npz")["state"])
    assert cli(*shlex.split(resume)[1:], "-q").exit_code == 0
    assert (out / "model.npz").read_bytes() == (reference / "model.npz").read_bytes()


def test_a_stop_in_a_loss_spike_before_the_first_checkpoint_loses_nothing(tiny_data_dir,
                                                                         tmp_path, monkeypatch):
    """--overwrite: the run it was to replace comes back as it was; --resume of a run killed
    before its first checkpoint: the folder stays, and the line gives the resume that starts
    it over (a new run's "run the same command again" would be refused there)."""
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    args = [*SPIKE, "--data-dir", tiny_data_dir]
    assert cli("train", *args, "--out", old).exit_code == 0
    assert cli("train", *args, "--out", fresh).exit_code == 0
    for name in ("checkpoint.npz", "model.npz", "summary.json"):
        (fresh / name).unlink()
    (fresh / "metrics.jsonl").write_bytes(b"")                # as left by an early kill
    before = digest_tree(old), digest_tree(fresh)
    wrap_steps(monkeypatch, lambda step: SignalsAt(step, 5))
    result = cli("train", *args, "--out", old, "--overwrite")
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == (
        f"interrupted {TOO_LARGE_AT_5}; no checkpoint was written yet, so there is nothing to "
        "resume: start over (run the same command again)")
    assert "put back what this run was to replace" in result.stderr
    result = cli("train", "--resume", fresh, "--device", "cpu", "--data-dir", tiny_data_dir)
    assert result.exit_code == 130, result.output
    resume = f"gpumlp train --resume {shell_path(fresh)} --device cpu --data-dir " \
             f"{shell_path(tiny_data_dir)}"
    assert result.stderr.splitlines()[-1] == (
        f"interrupted {TOO_LARGE_AT_5}; no checkpoint was written yet, so there is nothing to "
        f"resume: start over ({resume} starts it over)")
    assert (digest_tree(old), digest_tree(fresh)) == before


def test_a_huge_learning_rate_leaves_no_checkpoint_that_cannot_be_resumed(tmp_path):
    out = tmp_path / "run"
    config = tiny_config("optim.lr=1e39", "train.checkpoint_every=1")
    cpu = __import__("gpumlp.backend").backend.CPU
    with pytest.raises(NumericalError) as info:
        train(config, cpu, tiny_mnist(), out_dir=out)
    assert str(info.value).endswith("no checkpoint was written yet; start over with a lower "
                                    "optim.lr")
    assert not (out / "checkpoint.npz").exists()


def test_nan_from_a_huge_learning_rate_is_one_line_exit_1(reference, tmp_path):
    _, env, _ = reference
    result = subprocess.run(gpumlp_cmd("train", "--config", str(ROOT / "configs/smoke.yaml"),
                                       "--out", str(tmp_path / "run"), "--set", "optim.lr=1e30",
                                       "-q"), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NaN or infinite" in lines[0] and "step" in lines[0]


def test_a_first_checkpoint_that_cannot_be_written_does_not_advise_a_resume(tmp_path,
                                                                          monkeypatch):
    """No checkpoint is there yet (a new run's folder then goes, and --overwrite has removed the
    old run's): 'the previous checkpoint is intact; ... --resume' was false advice."""
    out = tmp_path / "run"
    real_replace = os.replace

    def too_large(src, dst):
        if Path(dst).name == "checkpoint.npz":
            raise OSError(errno.EFBIG, "File too large")
        return real_replace(src, dst)

    monkeypatch.setattr(npzio.os, "replace", too_large)
    with pytest.raises(GpumlpError) as info:
        train(tiny_config(), __import__("gpumlp.backend").backend.CPU, tiny_mnist(), out_dir=out)
    assert str(info.value) == (f"cannot write {out / 'checkpoint.npz'} (File too large); no "
                               "checkpoint was written yet; raise the file size limit "
                               "(ulimit -f), then run the same command again")


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real_replace = os.replace

    def full_disk(src, dst):
        calls["n"] += 1
        if Path(dst).name == "checkpoint.npz" and calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(npzio.os, "replace", full_disk)
    with pytest.raises(GpumlpError) as info:
        train(tiny_config(), __import__("gpumlp.backend").backend.CPU, tiny_mnist(), out_dir=out)
    assert "No space left on device" in str(info.value)
    assert "previous checkpoint is intact" in str(info.value)
    arrays = load_npz(out / "checkpoint.npz")  # the last one that was written, whole
    assert np.isfinite(arrays["W1"]).all()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary left


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "model.npz"
    target.write_bytes(b"old contents")

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(npzio.os, "fsync", failing_fsync)
    with pytest.raises(OSError) as info:
        npzio.atomic_write(target, b"new contents")
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(target))  # named
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_atomic_write_in_a_folder_it_cannot_write_names_the_file_not_a_temporary(tmp_path,
                                                                               monkeypatch):
    def refused(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".model.npz.x.tmp"))

    monkeypatch.setattr(npzio.tempfile, "mkstemp", refused)
    with pytest.raises(OSError) as info:
        npzio.atomic_write(tmp_path / "model.npz", b"new contents")
    assert (info.value.errno, info.value.filename) == (errno.EROFS, str(tmp_path / "model.npz"))


def test_atomic_write_all_whose_rename_fails_midway_leaves_no_temporary(tmp_path):
    """The first file is replaced; the second cannot be (a folder holds its name): it is named,
    and its temporary file, written in full, is removed."""
    (tmp_path / "b.png").mkdir()
    with pytest.raises(OSError) as info:
        npzio.atomic_write_all({tmp_path / "a.png": b"a", tmp_path / "b.png": b"b"})
    assert info.value.filename == str(tmp_path / "b.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    assert (tmp_path / "a.png").read_bytes() == b"a" and (tmp_path / "b.png").is_dir()


def test_atomic_write_all_fsyncs_every_file_before_the_first_rename_and_the_folder_after(
        tmp_path, monkeypatch):
    """Guards atomic_write_all's order: each temporary file is fsynced before any target is
    replaced (a full disk at the second file changes neither), and the folder is fsynced after
    the renames, which makes them durable."""
    import stat

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(npzio.os, "fsync", fsync)
    monkeypatch.setattr(npzio.os, "replace", replace)
    files = {tmp_path / "a.png": b"a", tmp_path / "b.png": b"b"}
    npzio.atomic_write_all(files)
    assert events == ["file", "file", "rename", "rename", "dir"]
    assert all(path.read_bytes() == data for path, data in files.items())

    def full_at_the_second(fd):
        if len(events) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    events.clear()
    monkeypatch.setattr(npzio.os, "fsync", full_at_the_second)
    with pytest.raises(OSError):
        npzio.atomic_write_all({path: b"new" for path in files})
    assert all(path.read_bytes() == data for path, data in files.items())   # neither replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_during_atomic_write_alls_renames_takes_effect_after_the_last(
        tmp_path, monkeypatch, signame):
    """A report's renames cut by Ctrl-C or SIGTERM left some new figures beside the old
    report.md: the signal now waits for the last rename, then raises as it would have."""
    import signal

    signum = getattr(signal, signame)

    class Stopped(BaseException):
        pass

    def stop(n, frame):
        raise Stopped(n)

    real_replace, renames = os.replace, []

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 1:
            signal.raise_signal(signum)          # the signal lands after the first rename
        real_replace(src, dst)

    previous = signal.signal(signum, stop)
    try:
        files = {tmp_path / name: b"old" for name in ("a.png", "b.png", "report.md")}
        for path, data in files.items():
            path.write_bytes(data)
        monkeypatch.setattr(npzio.os, "replace", replace)
        with pytest.raises(Stopped) as info:
            npzio.atomic_write_all({path: b"new" for path in files})
        assert info.value.args == (signum,) and len(renames) == 3
        assert all(path.read_bytes() == b"new" for path in files)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "report.md"]
        assert signal.getsignal(signum) is stop                  # its handler back in place
    finally:
        signal.signal(signum, previous)


def test_signals_held_leaves_an_ignored_signal_ignored_and_a_quiet_block_alone(monkeypatch):
    import signal

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with npzio.signals_held():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)                   # ignored: nothing happens
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    handler = signal.getsignal(signal.SIGINT)
    with npzio.signals_held():
        pass
    assert signal.getsignal(signal.SIGINT) is handler


def test_signals_held_puts_every_handler_back_when_a_restored_one_raises(tmp_path, monkeypatch):
    """signal.signal runs a pending signal's handler before it changes one: a Ctrl-C landing
    just after SIGINT's handler was put back raised in SIGTERM's restore, which left SIGTERM
    on the block's collecting handler for good (every later SIGTERM swallowed)."""
    import signal

    real, fired = signal.signal, []

    def term(n, frame):
        pass

    def restoring(signum, handler):
        if signum == signal.SIGTERM and handler is term and not fired:
            fired.append(signum)
            signal.raise_signal(signal.SIGINT)   # run as signal.signal runs a pending one
        return real(signum, handler)

    previous = real(signal.SIGTERM, term)
    previous_int = real(signal.SIGINT, signal.default_int_handler)  # whatever pytest runs under
    try:
        monkeypatch.setattr(signal, "signal", restoring)
        with pytest.raises(KeyboardInterrupt):
            npzio.atomic_write(tmp_path / "a", b"x")
        monkeypatch.undo()
        assert fired and signal.getsignal(signal.SIGTERM) is term
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert (tmp_path / "a").read_bytes() == b"x"
    finally:
        real(signal.SIGTERM, previous)
        real(signal.SIGINT, previous_int)


def test_restore_handlers_puts_each_back_and_raises_the_first_exception(monkeypatch,
                                                                        keep_stop_handlers):
    """Each handler whose restore a pending signal's handler cut short is tried again until it
    is back, and what the first of them raised is raised after the last, not the later one's."""
    from gpumlp.signals import restore_handlers

    class First(Exception):
        pass

    class Second(Exception):
        pass

    real, cut = signal.signal, []

    def cut_once(signum, handler):               # as signal.signal running a pending signal
        if signum not in cut:
            cut.append(signum)
            raise First() if len(cut) == 1 else Second()
        return real(signum, handler)

    def mine_int(n, frame):
        pass

    def mine_term(n, frame):
        pass

    monkeypatch.setattr(signal, "signal", cut_once)
    with pytest.raises(First):
        restore_handlers({signal.SIGINT: mine_int, signal.SIGTERM: mine_term})
    monkeypatch.undo()
    assert sorted(cut) == sorted([signal.SIGINT, signal.SIGTERM])   # each cut once
    assert signal.getsignal(signal.SIGINT) is mine_int
    assert signal.getsignal(signal.SIGTERM) is mine_term


def test_signals_held_delivers_the_first_of_two_signals(keep_stop_handlers):
    """SIGTERM, then Ctrl-C during the block: SIGTERM is the one delivered when it ends."""
    class Term(BaseException):
        pass

    class Int(BaseException):
        pass

    def on_term(n, frame):
        raise Term()

    def on_int(n, frame):
        raise Int()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)
    with pytest.raises(Term):
        with npzio.signals_held():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is on_term
    assert signal.getsignal(signal.SIGINT) is on_int


def test_a_handler_not_set_from_python_is_left_in_place(monkeypatch, keep_stop_handlers):
    """signal.getsignal says None for a handler that a program embedding Python set: it cannot
    be put back (signal.signal takes no None), so replace_handlers leaves that signal alone."""
    from gpumlp.signals import replace_handlers, restore_handlers

    real, saved = signal.getsignal, keep_stop_handlers

    def mine(n, frame):
        pass

    monkeypatch.setattr(signal, "getsignal",
                        lambda signum: None if signum == signal.SIGTERM else real(signum))
    previous = replace_handlers(mine)
    assert signal.SIGTERM not in previous and previous[signal.SIGINT] is saved[signal.SIGINT]
    assert real(signal.SIGTERM) is saved[signal.SIGTERM] and real(signal.SIGINT) is mine
    restore_handlers(previous)
    assert real(signal.SIGINT) is saved[signal.SIGINT]


@pytest.mark.parametrize("char", ["a", "\u6587"])   # 1 byte, 3 bytes in UTF-8
def test_atomic_write_takes_a_name_up_to_the_systems_limit(tmp_path, char):
    """Its temporary name adds 14 characters to the target's: one of 242 to 255 was refused.
    NAME_MAX counts bytes: a name of 84 three-byte characters is 252 of them."""
    name = char * ((os.pathconf(tmp_path, "PC_NAME_MAX") - 1) // len(char.encode()))
    npzio.atomic_write(tmp_path / name, b"contents")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes() == b"contents"


def test_reading_a_small_file_under_a_large_limit_reserves_no_more_than_a_chunk(tmp_path):
    """`read(limit + 1)` reserved the whole limit first (257 MiB for one 28x28 PNG): `predict`
    and `report` ran out of memory under `ulimit -v` with small files."""
    import tracemalloc

    from gpumlp.files import READ_CHUNK, read_at_most
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"x" * 1000)
    big.write_bytes(b"y" * (3 * READ_CHUNK + 5))
    tracemalloc.start()
    try:
        assert read_at_most(small, 256 << 20) == b"x" * 1000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * READ_CHUNK
    assert read_at_most(big, 3 * READ_CHUNK + 5) == big.read_bytes()
    assert read_at_most(big, 3 * READ_CHUNK + 4) is None
    assert read_at_most(small, 1000) == b"x" * 1000 and read_at_most(small, 999) is None


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def bad_inputs(tmp: Path, data_dir: Path) -> list[tuple[str, list[str], int]]:
    """(name, argv, expected exit code) for every kind of bad input of issue 4."""
    good_run = tmp / "good"
    model = good_run / "model.npz"
    cfg = lambda text: str(write(tmp / f"cfg{abs(hash(text))}.yaml", text))  # noqa: E731
    truncated = write(tmp / "truncated.npz", model.read_bytes()[:1000])
    garbage = write(tmp / "garbage.npz", os.urandom(4096))
    objects = tmp / "objects.npz"
    np.savez(objects, W1=np.array([{"evil": 1}], dtype=object))
    wrong_shapes = tmp / "wrong_shapes.npz"
    np.savez(wrong_shapes, W1=np.zeros((784, 7), np.float32), b1=np.zeros(7, np.float32),
             W2=np.zeros((7, 10), np.float32), b2=np.zeros(10, np.float32))
    bad_ckpt_run = tmp / "bad_ckpt"
    bad_ckpt_run.mkdir()
    write(bad_ckpt_run / "config.yaml", (good_run / "config.yaml").read_text())
    write(bad_ckpt_run / "checkpoint.npz", (good_run / "checkpoint.npz").read_bytes()[:5000])
    a_file = write(tmp / "a_file", "x")
    bad_data = tmp / "bad_data"
    bad_data.mkdir()
    for source in data_dir.iterdir():
        if "idx" in source.name:
            write(bad_data / source.name, source.read_bytes())
    images = next(bad_data.glob("t10k-images*"))
    write(images, images.read_bytes()[: len(images.read_bytes()) // 2])  # cut short
    html = tmp / "html_data"
    html.mkdir()
    for source in data_dir.iterdir():
        if "idx" in source.name:
            write(html / source.name, "<html><body>Not Found</body></html>")
    train = ["train", "--data-dir", str(data_dir), "--device", "cpu", "-q"]
    return [
        ("missing config", [*train, "--config", str(tmp / "nope.yaml")], 2),
        ("config not utf-8",
         [*train, "--config", str(write(tmp / "bin.yaml", b"\xff\xfe\x00bad"))], 2),
        ("config is a folder", [*train, "--config", str(tmp)], 2),
        ("malformed yaml", [*train, "--config", cfg("model: {hidden: [1, 2\n")], 2),
        ("yaml not a mapping", [*train, "--config", cfg("- 1\n- 2\n")], 2),
        ("unknown key", [*train, "--config", cfg("optim: {lrr: 0.1}\n")], 2),
        ("wrong type", [*train, "--set", "train.epochs=ten"], 2),
        ("lr zero", [*train, "--set", "optim.lr=0"], 2),
        ("lr negative", [*train, "--set", "optim.lr=-1"], 2),
        ("batch zero", [*train, "--set", "train.batch_size=0"], 2),
        ("batch larger than data", [*train, "--set", "data.limit=100", "--set",
                                    "train.batch_size=500", "--out", str(tmp / "big_batch")], 2),
        ("hidden zero", [*train, "--set", "model.hidden=0"], 2),
        ("hidden list with zero", [*train, "--set", "model.hidden=[64, 0]"], 2),
        ("negative epochs", [*train, "--set", "train.epochs=-1"], 2),
        ("unknown activation", [*train, "--set", "model.activation=swish"], 2),
        ("unknown optimizer", [*train, "--set", "optim.name=lbfgs"], 2),
        ("bad --set", [*train, "--set", "optim.lr"], 2),
        ("device that does not exist", [*train, "--device", "cuda:7"], 2),
        ("device that is not a device", [*train, "--device", "tpu"], 2),
        ("out holds another run", [*train, "--out", str(good_run)], 1),
        ("out cannot be written", [*train, "--out", str(a_file / "run")], 1),
        ("resume a folder with no run", ["train", "--resume", str(tmp / "empty_dir")], 1),
        ("resume with overwrite", ["train", "--resume", str(good_run), "--overwrite"], 2),
        ("resume with an empty out", ["train", "--resume", str(good_run), "--out", ""], 2),
        ("empty out", [*train, "--out", ""], 2),
        ("empty resume", ["train", "--resume", ""], 2),
        ("resume a truncated checkpoint",
         ["train", "--resume", str(bad_ckpt_run), "--device", "cpu"], 1),
        ("init truncated", [*train, "--init", str(truncated), "--out", str(tmp / "i1")], 1),
        ("init garbage", [*train, "--init", str(garbage), "--out", str(tmp / "i2")], 1),
        ("init object arrays", [*train, "--init", str(objects), "--out", str(tmp / "i3")], 1),
        ("init wrong shapes", [*train, "--init", str(wrong_shapes), "--out", str(tmp / "i4")], 1),
        ("evaluate missing model",
         ["evaluate", str(tmp / "none.npz"), "--data-dir", str(data_dir)], 1),
        ("evaluate truncated model", ["evaluate", str(truncated), "--data-dir", str(data_dir)], 1),
        ("evaluate object arrays", ["evaluate", str(objects), "--data-dir", str(data_dir)], 1),
        ("evaluate model without config",
         ["evaluate", str(wrong_shapes), "--data-dir", str(data_dir)], 1),
        ("data folder with a cut file", ["train", "--data-dir", str(bad_data), "-q",
                                         "--out", str(tmp / "d1")], 1),
        ("data folder of html pages", ["train", "--data-dir", str(html), "-q",
                                       "--out", str(tmp / "d2")], 1),
        ("data folder missing", ["evaluate", str(model), "--data-dir", str(tmp / "no_data")], 1),
        ("gradcheck bad config", ["gradcheck", "--config", cfg("model: {activation: nope}\n")], 2),
    ]


def test_every_bad_input_is_one_line_without_traceback_and_damages_nothing(tmp_path, mnist_dir):
    from click.testing import CliRunner

    from gpumlp.cli import main

    data_dir = mnist_dir
    runner = CliRunner()
    good = runner.invoke(main, ["train", "--config", str(ROOT / "configs/smoke.yaml"), "--out",
                                str(tmp_path / "good"), "--data-dir", str(data_dir), "-q",
                                "--set", "data.limit=1000", "--set", "train.epochs=1"])
    assert good.exit_code == 0, good.output
    (tmp_path / "empty_dir").mkdir()
    cases = bad_inputs(tmp_path, data_dir)
    before = digest_tree(tmp_path)
    for name, argv, code in cases:
        result = runner.invoke(main, argv)
        output = result.output.strip()
        assert result.exit_code == code, f"{name}: exit {result.exit_code}, output {output!r}"
        assert "Traceback" not in output, name
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), f"{name}: {output!r}"
        assert result.exception is None or isinstance(result.exception, SystemExit), name
    after = digest_tree(tmp_path)
    assert after == before  # nothing changed, and no half-made run folder was left behind


def test_checkpoint_keeps_the_fast_step_velocity_scale_and_refuses_a_damaged_one(tmp_path):
    """The fast CPU step keeps momentum as vel / s with s = mu^t (optim.OptState.scale): a
    checkpoint must hold s too, or a resume would continue from the wrong velocity."""
    from gpumlp.backend import CPU
    from gpumlp.errors import CheckpointError
    from gpumlp.runfiles import RunFiles

    config = build_config(None, ["model.hidden=8", "train.epochs=1", "train.batch_size=50",
                                 "optim.momentum=0.9", "optim.nesterov=false"])
    train(config, CPU, tiny_mnist(250, 50), out_dir=tmp_path / "run")
    saved = load_npz(tmp_path / "run" / "checkpoint.npz")
    assert saved["opt_scale"].tolist() == pytest.approx([0.9 ** 5], rel=1e-12)   # 5 steps
    state, _ = RunFiles(tmp_path / "run").load_checkpoint(config, CPU, 250)
    assert state.opt.scale.tolist() == saved["opt_scale"].tolist()
    for bad in ([-1.0], [0.0], [0.5, 0.5], [float("nan")]):   # 0: no velocity at all
        npzio.save_npz(tmp_path / "run" / "checkpoint.npz", {**saved, "opt_scale": np.array(bad)})
        with pytest.raises(CheckpointError, match=r"its velocity scale \(opt_scale\) is "
                           "damaged; start the run over: gpumlp train --config "):
            RunFiles(tmp_path / "run").load_checkpoint(config, CPU, 250)


# --- fsync, unpickling, non-finite weights, float64 models ---------------------------------

def test_each_metrics_row_is_fsynced_once_written(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append((st.st_ino, st.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    (tmp_path / "metrics.jsonl").write_bytes(b"")
    RunFiles(tmp_path).append_metrics({"epoch": 1})
    st = (tmp_path / "metrics.jsonl").stat()
    assert st.st_size > 0 and (st.st_ino, st.st_size) in synced


class Unpickles:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_load_npz_never_unpickles_an_object_array(tmp_path):
    marker = tmp_path / "ran"
    np.savez(tmp_path / "objects.npz", W1=np.array([Unpickles(str(marker))], dtype=object))
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_npz(tmp_path / "objects.npz")
    assert not marker.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_model_or_init_file_with_nan_or_infinite_weights_is_refused(tmp_path, bad):
    config = build_config(None, ["model.hidden=8"])
    params = init_params(config.model.layer_widths, "he", np.random.default_rng(0), "float32")
    params.b[1][3] = bad
    save_model(tmp_path / "model.npz", params, config)
    with pytest.raises(CheckpointError, match="b2 holds NaN or infinite values"):
        load_model(tmp_path / "model.npz")
    with pytest.raises(CheckpointError, match="b2 holds NaN or infinite values"):
        load_init(tmp_path / "model.npz", config.model.layer_widths, "float32")


def test_a_float64_model_loads_back_bit_for_bit_in_float64(tmp_path):
    config = build_config(None, ["model.hidden=8", "train.dtype=float64"])
    params = init_params(config.model.layer_widths, "he", np.random.default_rng(0), "float64")
    save_model(tmp_path / "model.npz", params, config)
    loaded, loaded_config = load_model(tmp_path / "model.npz")
    assert loaded_config == config
    for saved, back in zip((*params.W, *params.b), (*loaded.W, *loaded.b), strict=True):
        assert back.dtype == np.float64 and np.array_equal(saved, back)
