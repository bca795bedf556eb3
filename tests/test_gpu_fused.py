"""The fused CUDA step (gpumlp.fast_cuda) on a real GPU.

- each kernel against the generic equation it replaces, both on the GPU, with sizes that make
  the grid-stride loops and softmax_xent's rows-per-thread go round more than once;
- whole fused steps against the generic step on the same GPU and against NumPy on the CPU
  (forward buffers, gradients, parameters and optimizer state), for every activation and
  optimizer, dropout, label smoothing, max-norm and a deeper net; a short training run;
- no host synchronisation inside a step; TF32 on request;
- `gpumlp train --device cuda` writes the files a CPU run writes, model.npz alike, and on the
  real MNIST reaches the CPU's test accuracy within 0.5 points.

Skipped, with the reason, where gpumlp sees no CUDA device. CuPy is reached through the
backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_cuda_source import OPTIMIZERS  # the optimizer settings of the CPU-side checks

from gpumlp import fast_cuda
from gpumlp.activations import ACTIVATIONS
from gpumlp.backend import CPU, enable_tf32, to_host
from gpumlp.cli import main
from gpumlp.config import build_config
from gpumlp.data import DeviceSplit, gather, to_inputs
from gpumlp.fast_cuda import FusedStep, launch
from gpumlp.model import (Grads, Params, backward, correct_count, forward, init_params,
                          loss_and_dA2)
from gpumlp.optim import OptState, adam_update, init_state, sgd_update
from gpumlp.step import add_to_sums, generic_step, make_step
from gpumlp.train import train

pytestmark = pytest.mark.gpu

RTOL, ATOL = 1e-5, 1e-6       # float32 on one device: rounding of one op, a few ulps
CROSS_RTOL, CROSS_ATOL = 2e-5, 2e-6  # GPU against NumPy: other BLAS, other summation order
BIG = (1100, 1000)            # 1.1M elements: more than THREADS * MAX_BLOCKS, the loop goes round
H256 = str(Path(__file__).resolve().parents[1] / "configs" / "h256.yaml")


def same(got, want, name, rtol=RTOL, atol=ATOL):
    got, want = to_host(got), to_host(want)
    assert got.dtype == want.dtype, f"{name}: {got.dtype} != {want.dtype}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def host_arrays(seed, *shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, scale, shape).astype(np.float32) for shape in shapes]


def host_mask(seed, shape, p=0.25):
    keep = np.random.default_rng(seed).random(shape) >= p
    return (keep / np.float32(1 - p)).astype(np.float32)


# --- each kernel against its generic equation, on the GPU --------------------------------------

@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("activation", sorted(fast_cuda.ACTIVATION_TYPES))
def test_bias_act_is_phi_of_A_plus_b(gpu, activation, masked):
    xp, act = gpu.xp, ACTIVATIONS[activation]
    kernels = FusedStep(build_config(None, [f"model.activation={activation}"]), gpu).kernels
    A, b = (xp.asarray(a) for a in host_arrays(1, BIG, BIG[1:], scale=2.0))
    M = xp.asarray(host_mask(2, BIG))
    want_A = A + b                                                     # A = Z_prev @ W + b
    want_Z = act.phi(want_A) * M if masked else act.phi(want_A)        # Z = phi(A) [* M]
    Z, n = xp.full_like(A, np.nan), A.size                            # poisoned: all must be written
    if masked:
        launch(kernels.bias_act_masked, n, np.int64(n), np.int32(BIG[1]), A, b, M, Z)
    else:
        launch(kernels.bias_act, n, np.int64(n), np.int32(BIG[1]), A, b, Z)
    same(A, want_A, "A")
    same(Z, want_Z, f"Z = {activation}(A)")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("activation", sorted(fast_cuda.ACTIVATION_TYPES))
def test_act_backward_is_dZ_times_phi_prime(gpu, activation, masked):
    xp, act = gpu.xp, ACTIVATIONS[activation]
    kernels = FusedStep(build_config(None, [f"model.activation={activation}"]), gpu).kernels
    dZ, A = (xp.asarray(a) for a in host_arrays(3, BIG, BIG, scale=2.0))
    M = xp.asarray(host_mask(4, BIG))
    want = (dZ * M if masked else dZ) * act.phi_prime(A)               # dA = dZ [* M] * phi'(A)
    n = dZ.size
    if masked:
        launch(kernels.act_backward_masked, n, np.int64(n), dZ, A, M)
    else:
        launch(kernels.act_backward, n, np.int64(n), dZ, A)
    same(dZ, want, f"dA = dZ * {activation}'(A)")


@pytest.mark.parametrize("m", [1, 128, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_xent_is_loss_and_dA2(gpu, m, smoothing):
    xp = gpu.xp
    step = FusedStep(build_config(None, [f"train.label_smoothing={smoothing}"]), gpu)
    A2, b2 = (xp.asarray(a) for a in host_arrays(5 + m, (m, 10), (10,), scale=3.0))
    y = xp.asarray(np.random.default_rng(m).integers(0, 10, m).astype(np.int32))
    want_L, want_dA2 = loss_and_dA2(A2 + b2, y, smoothing)
    want_correct = correct_count(A2 + b2, y)
    buf = step.step_buffers(m, (784, 32, 10))
    buf.A[-1][...] = A2
    L, correct = step.loss(Params((), (b2,)), y, buf)
    same(buf.A[-1], A2 + b2, "A2 += b2")
    same(buf.dA, want_dA2, "dA2 = (Z2 - Y) / m")
    same(L, want_L, "L", rtol=1e-5)
    assert int(correct) == int(want_correct) and correct.dtype == np.int64




@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_the_one_launch_update_is_the_optimizer_update_of_each_array(gpu, optimizer):
    """FusedStep.update (one launch through the table of addresses) on a big array and a
    small one against optim's update of each."""
    xp, config = gpu.xp, build_config(None, OPTIMIZERS[optimizer])
    cfg, step, shapes = config.optim, FusedStep(config, gpu), (BIG, (37,))
    p, g, m1, m2 = ([xp.asarray(a) for a in host_arrays(7 + i, *shapes, scale=0.1)]
                    for i in range(4))
    m2 = [xp.abs(v) for v in m2]                                       # second moments
    state = OptState(tuple(m1), tuple(m2) if cfg.name != "sgd" else ())
    want = [[a.copy() for a in arrays] for arrays in (p, m1, m2)]
    for t in (1, 2, 7):
        lr = cfg.lr / t
        step.update(Params((p[0],), (p[1],)), Grads((g[0],), (g[1],)), state, lr, t)
        for i in range(2):
            if cfg.name == "sgd":
                sgd_update(cfg, want[0][i], g[i], want[1][i], lr)
            else:
                adam_update(cfg, want[0][i], g[i], want[1][i], want[2][i], lr, t)
        for name, got, expected in zip(("p", "m", "v"), (p, m1, m2), want):
            for i in range(2):
                same(got[i], expected[i], f"{name}[{i}] after step {t}")


def test_tally_is_the_loops_running_sums(gpu):
    xp, step = gpu.xp, FusedStep(build_config(), gpu)
    kernel = (xp.zeros((), xp.float64), xp.zeros((), xp.int64))
    loop = (xp.zeros((), xp.float64), xp.zeros((), xp.int64))
    for L, ok, m in ((0.7310586, 97, 128), (2.3025851, 3, 128), (1e-3, 17, 17)):
        L, ok = xp.asarray(L, dtype=xp.float32), xp.asarray(ok, dtype=xp.int64)
        step.tally(*kernel, L, ok, m)
        add_to_sums(*loop, L, ok, m)
    assert float(kernel[0]) == float(loop[0]) and int(kernel[1]) == int(loop[1]) == 117


@pytest.mark.parametrize("normalize", ["unit", "standard"])
def test_gather_inputs_is_gather_and_to_inputs(gpu, normalize):
    xp, rng = gpu.xp, np.random.default_rng(8)
    split = DeviceSplit(xp.asarray(rng.integers(0, 256, (3000, 784)).astype(np.uint8)),
                        xp.asarray(rng.integers(0, 10, 3000).astype(np.int32)))
    step = FusedStep(build_config(None, [f"data.normalize={normalize}"]), gpu)
    perm = xp.asarray(rng.permutation(3000))
    for idx in (perm[:1500], perm[2990:]):                              # 1.2M elements, then 10 rows
        X, y = step.batch(split, idx)
        images, labels = gather(split, idx)
        same(X, to_inputs(images, normalize, "float32"), "X", rtol=1e-6, atol=1e-7)
        assert bool((y == labels).all())


# --- whole steps --------------------------------------------------------------------------------

def host_problem(widths, m, seed):
    rng = np.random.default_rng(seed)
    params = init_params(widths, "he", rng)
    params = Params(params.W, tuple(rng.normal(0, 0.1, b.shape).astype(np.float32) for b in params.b))
    X = (rng.integers(0, 256, (m, widths[0])) / 255).astype(np.float32)
    return params, X, rng.integers(0, 10, m).astype(np.int32)


def to_device(device, params):
    """A copy of host params on `device` (a copy on the CPU too: steps update in place)."""
    return Params(tuple(device.asarray(w.copy()) for w in params.W),
                  tuple(device.asarray(b.copy()) for b in params.b))


# Adam divides by sqrt(v) + eps: where a gradient is ~1e-8 (a unit dead on the batch), an ulp of
# difference in it moves p by a visible fraction of lr. eps = 1e-4 keeps whole-step comparisons
# well conditioned; the update kernel itself is compared at the default eps above.
ADAM_EPS = ["optim.eps=1e-4"]
CONFIGS = {**{f"opt_{name}": overrides + (ADAM_EPS if "adam" in name else [])
              for name, overrides in OPTIMIZERS.items()},
           **{f"act_{name}": [f"model.activation={name}", "optim.nesterov=true"]
              for name in fast_cuda.ACTIVATION_TYPES},
           "dropout": ["model.dropout=0.3"], "smoothing": ["train.label_smoothing=0.1"],
           "max_norm": ["model.max_norm=1.5"],
           "deep_adamw_all": ["model.hidden=[96, 48]", "model.dropout=0.2", "model.activation=gelu",
                              "optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.1",
                              *ADAM_EPS,
                              "train.label_smoothing=0.05", "model.max_norm=2"]}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_steps_match_the_generic_step_on_the_gpu_and_numpy(gpu, name):
    """Three steps (the last batch shorter) from the same start: fused on the GPU, generic on
    the GPU, generic on the CPU. After the first, also the fused step's forward buffers and
    gradients against the CPU's forward and backward."""
    config = build_config(None, CONFIGS[name])
    widths = (784, *config.model.hidden_widths, 10)
    act = ACTIVATIONS[config.model.activation]
    params, _, _ = host_problem(widths, 1, seed=20)
    runs = {"fused": (to_device(gpu, params), gpu, FusedStep(config, gpu)),
            "gpu generic": (to_device(gpu, params), gpu, generic_step(config)),
            "cpu": (to_device(CPU, params), CPU, generic_step(config))}
    states = {key: init_state(config.optim, run[0]) for key, run in runs.items()}
    for t, m in enumerate((128, 128, 37), start=1):
        _, X, y = host_problem(widths, m, seed=30 + t)
        masks = tuple(host_mask(40 + t + k, (m, h))
                      for k, h in enumerate(config.model.hidden_widths)) \
            if config.model.dropout else ()
        before = to_device(CPU, runs["cpu"][0])
        out = {key: step(p, states[key], dev.asarray(X), dev.asarray(y), config.optim.lr / (2 * t), t,
                         tuple(map(dev.asarray, masks)))
               for key, (p, dev, step) in runs.items()}
        if t == 1:
            check_forward_and_backward(runs["fused"][2], before, X, y, masks, act, config)
        same(out["fused"][0], out["gpu generic"][0], f"L vs gpu generic, step {t}")
        same(out["fused"][0], out["cpu"][0], f"L vs cpu, step {t}", CROSS_RTOL, CROSS_ATOL)
        assert int(out["fused"][1]) == int(out["gpu generic"][1]) == int(out["cpu"][1]), t
        for other in ("gpu generic", "cpu"):
            # the fused step's own cuBLAS calls (db as ones @ dA) sum in another order than
            # CuPy's dot and sum: against either side, float32 of another summation order
            rtol, atol = CROSS_RTOL, CROSS_ATOL
            for k in range(len(widths) - 1):
                same(runs["fused"][0].W[k], runs[other][0].W[k], f"W{k + 1} vs {other}, step {t}", rtol, atol)
                same(runs["fused"][0].b[k], runs[other][0].b[k], f"b{k + 1} vs {other}, step {t}", rtol, atol)
            for i, (a, b) in enumerate(zip(states["fused"].m + states["fused"].v,
                                           states[other].m + states[other].v)):
                same(a, b, f"optimizer state {i} vs {other}, step {t}", rtol, atol)


def check_forward_and_backward(fused, params, X, y, masks, act, config):
    """The fused step's buffers of its last call (m rows) against model.forward/backward on the CPU."""
    widths = fast_cuda.widths_of(params)
    cache = forward(params, X, act, masks)
    _, dA2 = loss_and_dA2(cache.A[-1], y, config.train.label_smoothing)
    grads = backward(params, cache, dA2, act)
    buf, fused_grads = fused.buffers[(X.shape[0], widths)], fused.grads[widths].grads
    for k, (a, b) in enumerate(zip(buf.A, cache.A)):
        same(a, b, f"A{k + 1}", CROSS_RTOL, CROSS_ATOL)
    for k, (a, b) in enumerate(zip(buf.Z, cache.Z[1:])):
        same(a, b, f"Z{k + 1}", CROSS_RTOL, CROSS_ATOL)
    same(buf.dA, dA2, "dA_out", CROSS_RTOL, CROSS_ATOL)
    for k in range(len(params.W)):
        same(fused_grads.W[k], grads.W[k], f"dW{k + 1}", CROSS_RTOL, CROSS_ATOL)
        same(fused_grads.b[k], grads.b[k], f"db{k + 1}", CROSS_RTOL, CROSS_ATOL)


def test_make_step_takes_the_fused_step_on_the_gpu(gpu):
    assert isinstance(make_step(build_config(), gpu), FusedStep)
    assert not isinstance(make_step(build_config(None, ["train.dtype=float64"]), gpu), FusedStep)


# Keeps one thread of the GPU busy for `cycles` of its clock (2e9 cycles: 1 s at 1.98 GHz).
SPIN = r"""extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}"""


def test_a_step_does_not_synchronise_with_the_host(gpu):
    """Three steps and tallies queued behind a kernel that keeps the GPU busy for seconds: the
    host must issue them all while that kernel still runs. A step that waited for the GPU (a
    `.item()`, a copy to the host, a synchronize) would return only after it ended.
    (CuPy 14's `cupyx.allow_synchronize` detects nothing: its checks were removed.)"""
    config = build_config(None, ["model.dropout=0.1", "model.max_norm=3", "optim.name=adam"])
    params, X, y = host_problem((784, 256, 10), 128, seed=50)
    params, step = to_device(gpu, params), FusedStep(config, gpu)
    state = init_state(config.optim, params)
    split = DeviceSplit(gpu.asarray((X * 255).astype(np.uint8)), gpu.asarray(y))
    idx, masks = gpu.asarray(np.arange(128)), (gpu.asarray(host_mask(51, (128, 256))),)
    sums = (gpu.xp.zeros((), np.float64), gpu.xp.zeros((), np.int64))   # the loop's
    L, ok = step(params, state, *step.batch(split, idx), 0.01, 1, masks)  # compiles, allocates
    step.tally(*sums, L, ok, 128)
    spin = gpu.xp.RawKernel(SPIN, "spin")
    spin((1,), (1,), (np.int64(1000),))                                   # compiled
    gpu.synchronize()
    spin((1,), (1,), (np.int64(4_000_000_000),))                          # 2 s or more
    busy = gpu.xp.cuda.Event()
    busy.record()
    for t in (2, 3, 4):
        L, ok = step(params, state, *step.batch(split, idx), 0.01, t, masks)
        step.tally(*sums, L, ok, 128)
    issued_while_busy = not busy.done
    gpu.synchronize()
    assert issued_while_busy, "a step or tally waited for the GPU: it synchronises with the host"
    assert 0 < int(sums[1]) <= 4 * 128 and np.isfinite(float(sums[0]))


def test_a_short_run_matches_the_cpu(gpu, tiny_mnist):
    config = build_config(None, ["model.hidden=48", "model.activation=gelu", "train.epochs=2",
                                 "train.batch_size=64", "train.label_smoothing=0.1",
                                 "optim.nesterov=true", "optim.weight_decay=0.0005"])
    cpu_run, gpu_run = train(config, CPU, tiny_mnist.mnist), train(config, gpu, tiny_mnist.mnist)
    for cpu_row, gpu_row in zip(cpu_run.history, gpu_run.history, strict=True):
        for key in ("train_loss", "test_loss"):
            assert gpu_row[key] == pytest.approx(cpu_row[key], rel=1e-4), key
    for a, b in zip(gpu_run.params.W, cpu_run.params.W):
        np.testing.assert_allclose(to_host(a), b, rtol=1e-4, atol=1e-5)


def test_tf32_reaches_the_fused_steps_own_products(gpu):
    try:
        step = make_step(build_config(None, ["train.tf32=true"]), gpu)
        assert step.blas.compute == gpu.xp.cuda.cublas.CUBLAS_COMPUTE_32F_FAST_TF32
    finally:
        enable_tf32(gpu, False)
    step = make_step(build_config(None, ["train.tf32=false"]), gpu)
    assert step.blas.compute == gpu.xp.cuda.cublas.CUBLAS_COMPUTE_32F


def test_tf32_is_used_when_asked_and_stays_close(gpu):
    linalg = gpu.xp._core._routines_linalg
    config = build_config(None, ["train.tf32=true"])
    try:
        step = make_step(config, gpu)
        assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32
        params, X, y = host_problem((784, 256, 10), 128, seed=60)
        fp32, tf32 = to_device(CPU, params), to_device(gpu, params)
        L, _ = step(tf32, init_state(config.optim, tf32), gpu.asarray(X), gpu.asarray(y), 0.1, 1)
        L_cpu, _ = generic_step(config)(fp32, init_state(config.optim, fp32), X, y, 0.1, 1)
        assert float(L) == pytest.approx(float(L_cpu), rel=1e-2)
        np.testing.assert_allclose(to_host(tf32.W[1]), fp32.W[1], rtol=1e-2, atol=1e-3)
    finally:
        enable_tf32(gpu, False)
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT


# --- the CLI: a cuda run writes what a cpu run writes -----------------------------------------

def cli_train(*args):
    result = CliRunner().invoke(main, ["train", *map(str, args), "--quiet"])
    if result.exit_code == 130:  # gpu_check.sh's SIGINT at its limit (test_gpu_run.cli)
        raise KeyboardInterrupt
    assert result.exit_code == 0, result.output
    return result


def run_files(folder: Path) -> dict:
    with np.load(folder / "model.npz", allow_pickle=False) as npz:
        model = {key: (npz[key].shape, npz[key].dtype.str) for key in npz.files if key != "config"}
        config = json.loads(str(npz["config"]))
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"files": sorted(p.name for p in folder.iterdir()), "model": model, "config": config,
            "metric_keys": [sorted(row) for row in metrics],
            "summary": json.loads((folder / "summary.json").read_text())}


def cpu_and_cuda_runs(folder: Path, *args) -> tuple[dict, dict]:
    """The run files of `gpumlp train ARGS` on the CPU and on the GPU."""
    for device in ("cpu", "cuda"):
        cli_train(*args, "--device", device, "--out", folder / device)
    return run_files(folder / "cpu"), run_files(folder / "cuda")


def test_a_cuda_run_writes_the_files_of_a_cpu_run(gpu, tiny_data_dir, tmp_path):
    cpu, cuda = cpu_and_cuda_runs(tmp_path, "--config", H256, "--set", "train.epochs=2",
                                  "--data-dir", tiny_data_dir)
    assert cuda["files"] == cpu["files"]
    assert cuda["model"] == cpu["model"] and cuda["model"]["W1"] == ((784, 256), "<f4")
    assert cuda["config"] == cpu["config"] and cuda["metric_keys"] == cpu["metric_keys"]
    assert cuda["summary"]["device"].startswith("cuda:0")
    assert abs(cuda["summary"]["test_accuracy"] - cpu["summary"]["test_accuracy"]) <= 0.02


@pytest.mark.slow
def test_h256_on_mnist_reaches_the_cpus_accuracy(gpu, mnist_dir, tmp_path):
    cpu, cuda = cpu_and_cuda_runs(tmp_path, "--config", H256, "--set", "train.epochs=3",
                                  "--data-dir", mnist_dir)
    assert cuda["model"] == cpu["model"]
    assert cuda["summary"]["test_accuracy"] > 0.97
    assert abs(cuda["summary"]["test_accuracy"] - cpu["summary"]["test_accuracy"]) <= 0.005
