"""NumPy and CuPy agree in float32: forward, backward, one training step, a short run, all
through the generic code (the fused CUDA step has its own tests, tests/test_gpu_fused.py).

Skipped, with the reason, where gpumlp sees no CUDA device (the `gpu` fixture, conftest.py).
CuPy is reached only through gpumlp.backend (Backend.xp), never imported here.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpumlp.activations import ACTIVATIONS
from gpumlp.backend import CPU, to_host
from gpumlp.config import build_config
from gpumlp.model import Params, backward, forward, init_params, loss_and_dA2, params_on, softmax
from gpumlp.optim import init_state
from gpumlp.step import generic_step
from gpumlp.train import train

pytestmark = pytest.mark.gpu

RTOL, ATOL = 2e-5, 2e-6  # float32, different summation orders
WIDTHS = (784, 64, 32, 10)


def host_problem(seed=0, m=32):
    """float32 params with nonzero biases, inputs in [0, 1] and labels, on the host."""
    rng = np.random.default_rng(seed)
    params = init_params(WIDTHS, "he", rng)
    params = Params(params.W, tuple(rng.normal(0, 0.1, b.shape).astype(np.float32) for b in params.b))
    X = (rng.integers(0, 256, (m, 784)) / 255).astype(np.float32)
    y = rng.integers(0, 10, m)
    return params, X, y


def copy(params):
    return Params(tuple(w.copy() for w in params.W), tuple(b.copy() for b in params.b))


def close(gpu_array, cpu_array, name, atol=ATOL):
    got = to_host(gpu_array)
    assert got.dtype == np.float32 == np.asarray(cpu_array).dtype, name
    np.testing.assert_allclose(got, cpu_array, rtol=RTOL, atol=atol, err_msg=name)


def test_the_gpu_backend_runs_on_cupy(gpu):
    assert gpu.is_gpu and gpu.xp.__name__ == "cupy" and gpu.device.startswith("cuda:")
    assert type(gpu.asarray(np.zeros(2))).__module__.startswith("cupy")


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_and_backward_agree_float32(gpu, activation):
    act = ACTIVATIONS[activation]
    params, X, y = host_problem()
    cpu_cache = forward(params, X, act)
    cpu_L, cpu_dA2 = loss_and_dA2(cpu_cache.A[-1], y, 0.1)
    cpu_grads = backward(params, cpu_cache, cpu_dA2, act)

    g_params = params_on(gpu, params)
    g_cache = forward(g_params, gpu.asarray(X), act)
    g_L, g_dA2 = loss_and_dA2(g_cache.A[-1], gpu.asarray(y), 0.1)
    g_grads = backward(g_params, g_cache, g_dA2, act)

    for k, (a, b) in enumerate(zip(g_cache.A, cpu_cache.A)):
        close(a, b, f"A{k + 1}")
    for k, (a, b) in enumerate(zip(g_cache.Z[1:], cpu_cache.Z[1:])):
        close(a, b, f"Z{k + 1}")
    close(softmax(g_cache.A[-1]), softmax(cpu_cache.A[-1]), "Z_out")
    close(g_L, cpu_L, "L")
    for k in range(len(WIDTHS) - 1):
        close(g_grads.W[k], cpu_grads.W[k], f"dW{k + 1}")
        close(g_grads.b[k], cpu_grads.b[k], f"db{k + 1}")


# AdamW's first step moves each weight by about lr * g / (|g| + eps): where a gradient is near
# zero, an ulp of difference between cuBLAS's and the CPU's sums moves it by a visible fraction
# of lr (up to 1.7e-4 at the default eps, in a float64-vs-float32 simulation of this test).
# eps = 1e-4 and a tolerance of 2% of lr on the weights keep the comparison meaningful: a wrong
# update is off by about lr. The gradients and the moments are held to RTOL and ATOL.
@pytest.mark.parametrize("optim, weight_atol", [
    (["optim.name=sgd", "optim.nesterov=true"], ATOL),
    (["optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.01", "optim.eps=1e-4"], 2e-5)])
def test_one_training_step_agrees_float32(gpu, optim, weight_atol):
    config = build_config(None, ["model.hidden=[64, 32]", "model.max_norm=2", *optim])
    params, X, y = host_problem(seed=1)
    cpu_params = copy(params)
    cpu_state = init_state(config.optim, cpu_params)
    cpu_L, cpu_ok = generic_step(config)(cpu_params, cpu_state, X, y, 0.05, 1, ())

    g_params = params_on(gpu, params)
    g_state = init_state(config.optim, g_params)
    g_L, g_ok = generic_step(config)(g_params, g_state, gpu.asarray(X), gpu.asarray(y), 0.05, 1,
                                     ())

    close(g_L, cpu_L, "L")
    assert int(g_ok) == int(cpu_ok)
    for k in range(len(WIDTHS) - 1):
        close(g_params.W[k], cpu_params.W[k], f"W{k + 1}", atol=weight_atol)
        close(g_params.b[k], cpu_params.b[k], f"b{k + 1}", atol=weight_atol)
    for i, (a, b) in enumerate(zip(g_state.m + g_state.v, cpu_state.m + cpu_state.v)):
        close(a, b, f"state{i}")


def test_a_short_run_agrees(gpu, tiny_mnist, monkeypatch):
    """Two epochs of the generic step through train() on each device. (In the host emulation
    both run NumPy's maths: there it checks train()'s device plumbing only.)"""
    import gpumlp.train as train_module

    config = build_config(None, ["model.hidden=32", "train.epochs=2", "train.batch_size=50"])
    monkeypatch.setattr(train_module, "make_step", lambda config, backend: generic_step(config))
    cpu_run = train(config, CPU, tiny_mnist.mnist)
    gpu_run = train(config, gpu, tiny_mnist.mnist)
    for cpu_row, gpu_row in zip(cpu_run.history, gpu_run.history):
        assert gpu_row["train_loss"] == pytest.approx(cpu_row["train_loss"], rel=1e-4)
        assert gpu_row["test_loss"] == pytest.approx(cpu_row["test_loss"], rel=1e-4)
    for a, b in zip(gpu_run.params.W, cpu_run.params.W):
        np.testing.assert_allclose(to_host(a), b, rtol=1e-4, atol=1e-5)
    assert gpu_run.summary["device"].startswith("cuda")
