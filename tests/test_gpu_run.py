"""A `--device cuda` run through the paths that only a GPU run takes outside the fused step.

- dropout masks and every augmentation drawn by CuPy's generator (cupyx's map_coordinates for
  the warps), in a run interrupted mid-epoch after a checkpoint and resumed by the CLI; CuPy's
  generator cannot save its state, so the resume reseeds it from the position; and a CPU run
  resumed the same way on the GPU (its saved NumPy generator state is of no use to CuPy's);
- `evaluate`, `predict` and `report` with `--device cuda` on that run's model.

The fused-step tests (test_gpu_fused.py) give the step its masks and inputs from the host;
here the training loop makes them on the device. Skipped, with the reason, where gpumlp sees
no CUDA device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpumlp.cli import main
from gpumlp.config import build_config
from gpumlp.train import Interrupted, NumericalError, train

pytestmark = pytest.mark.gpu

SETTINGS = ["model.hidden=[64]", "model.dropout=0.2", "data.augment.shift=1",
            "data.augment.rotate=5", "data.augment.scale=0.05", "data.augment.elastic_alpha=2",
            "train.epochs=3", "train.batch_size=32", "train.checkpoint_every=4",
            "optim.lr=0.03"]  # learns within 3 epochs: 0.49-0.99 over 10 seeds (emulated)
STOP_AT = {"epoch": 2, "batch": 3}  # mid-epoch 2 (10 batches an epoch of 300 images)


def cli(*args) -> str:
    result = CliRunner().invoke(main, [*map(str, args)])
    if result.exit_code == 130:  # gpu_check.sh's SIGINT at its limit, taken by the command:
        raise KeyboardInterrupt  # pytest stops with its summary, not a made-up failure
    assert result.exit_code == 0, result.output
    return result.stdout


def stopped_and_resumed(backend, tiny_mnist, out: Path) -> None:
    """A run on `backend` with dropout and augmentation, stopped mid-epoch 2, resumed by the
    CLI with --device cuda."""
    stop = []

    def on_event(kind: str, info: dict) -> None:
        if kind == "step" and all(info[key] == value for key, value in STOP_AT.items()):
            stop.append(True)                                # as Ctrl-C sets the CLI's flag

    with pytest.raises(Interrupted):
        train(build_config(None, SETTINGS), backend, tiny_mnist.mnist, out_dir=out,
              on_event=on_event, should_stop=lambda: bool(stop))
    with np.load(out / "checkpoint.npz", allow_pickle=False) as npz:
        position = json.loads(str(npz["state"]))["position"]
    assert (position["epoch"], position["batch"], position["step"]) == (1, 3, 13)  # mid-epoch 2
    first_epoch = (out / "metrics.jsonl").read_text()
    assert len(first_epoch.splitlines()) == 1               # epoch 1 ended, epoch 2 did not
    with pytest.MonkeyPatch.context() as mp:                 # tiny_data_dir's set-up, module-wide
        from gpumlp import fetch
        mp.setattr(fetch, "CHECKSUMS", dict(tiny_mnist.checksums))
        mp.setenv("GPUMLP_CACHE_DIR", str(out.parent / "empty-cache"))
        mp.delenv("GPUMLP_DATA_DIR", raising=False)
        cli("train", "--resume", out, "--device", "cuda", "--data-dir", tiny_mnist.folder, "-q")
    assert (out / "metrics.jsonl").read_text().startswith(first_epoch)  # continued, not redone


@pytest.fixture(scope="module")
def resumed_run(gpu, tiny_mnist, tmp_path_factory) -> Path:
    """A cuda run with dropout and augmentation, stopped mid-epoch 2 and resumed by the CLI."""
    out = tmp_path_factory.mktemp("gpu-run") / "run"
    stopped_and_resumed(gpu, tiny_mnist, out)
    return out


def test_a_cpu_run_resumes_on_the_gpu(gpu, tiny_mnist, tmp_path):
    """The CPU run's checkpoint holds NumPy's device generator state, which CuPy's generator
    cannot take: the resume reseeds it (assigning the state hid its `state` method, and the
    first dropout mask failed)."""
    from gpumlp.backend import CPU

    stopped_and_resumed(CPU, tiny_mnist, tmp_path / "run")
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1, 2, 3]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"].startswith("cuda:0") and summary["test_accuracy"] > 0.3


def test_a_cuda_run_with_dropout_and_augmentation_resumes_mid_epoch(resumed_run):
    rows = [json.loads(line) for line in (resumed_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    summary = json.loads((resumed_run / "summary.json").read_text())
    assert summary["device"].startswith("cuda:0")
    with np.load(resumed_run / "model.npz", allow_pickle=False) as npz:
        assert all(np.isfinite(npz[key]).all() for key in ("W1", "b1", "W2", "b2"))
    assert summary["test_accuracy"] > 0.3                   # chance 0.1: it learned
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_evaluate_predict_and_report_on_the_gpu_agree_with_the_cpu(resumed_run, tiny_data_dir,
                                                                   tiny_mnist, tmp_path):
    model = resumed_run / "model.npz"
    on = {device: json.loads(cli("evaluate", model, "--device", device, "--data-dir",
                                 tiny_data_dir, "--json")) for device in ("cpu", "cuda")}
    summary = json.loads((resumed_run / "summary.json").read_text())
    assert on["cuda"]["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=0.011)
    assert on["cuda"]["test_accuracy"] == pytest.approx(on["cpu"]["test_accuracy"], abs=0.011)
    assert on["cuda"]["test_loss"] == pytest.approx(on["cpu"]["test_loss"], rel=1e-4)

    images = tiny_mnist.mnist.test.images[:5]                # (5, 784) uint8
    files = [tmp_path / f"digit{i}.npy" for i in range(len(images))]
    for path, image in zip(files, images):
        np.save(path, image.reshape(28, 28))
    predicted = {device: [json.loads(line)["prediction"] for line in
                          cli("predict", model, *files, "--json", "--device", device).splitlines()]
                 for device in ("cpu", "cuda")}
    assert predicted["cuda"] == predicted["cpu"]

    cli("report", resumed_run, "--device", "cuda", "--data-dir", tiny_data_dir)
    names = {"report.md", "learning_curves.png", "confusion_matrix.png",
             "first_layer_weights.png", "confident_mistakes.png"}
    assert names <= {p.name for p in resumed_run.iterdir()}


def test_a_gpu_run_reads_its_loss_every_50_steps_and_stops_at_the_first_nan(gpu, tiny_mnist):
    """On a GPU the loop reads the running loss back every 50 steps, not every step (a host
    round trip each) nor only at the epoch's end: a blow-up in step 1 stops the run at step 50."""
    config = build_config(None, ["model.hidden=[16]", "train.batch_size=4", "train.epochs=1",
                                 "data.val_size=50", "optim.lr=1e12"])   # 63 steps an epoch
    with pytest.raises(NumericalError, match=r"^the loss became NaN or infinite at epoch 1, "
                                             r"step 50; lower optim.lr$"):
        train(config, gpu, tiny_mnist.mnist)
