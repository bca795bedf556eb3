"""A dry run of the GPU tests on the CPU, before device time is spent on them:

    PYTHONPATH=tests python -m pytest -p emulate_gpu -m gpu tests

The `gpu` fixture then gets a CUDA backend whose "CuPy" is NumPy with the fused kernels built
for the host and the host cuBLAS of tests/test_cuda_source.py (its HostModule, HostCublas). It
runs the GPU tests' own code, and the fused step once more; it is no GPU result. Tests of CuPy
itself, tests whose two sides would both be NumPy, and every test not marked `gpu`, are
skipped with the reason. Without a C++ compiler every test skips, unless
GPUMLP_REQUIRE_EMULATION is set (as .ci/run does): then the run fails.
"""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

NEEDS_REAL_CUPY = {
    "test_the_gpu_backend_runs_on_cupy": "asserts the backend's module is CuPy",
    "test_tf32_is_used_when_asked_and_stays_close": "reads CuPy's own cuBLAS compute type",
    "test_a_step_does_not_synchronise_with_the_host": "needs a GPU running beside the host",
    # both sides of these would be NumPy running the same generic code: they could not fail
    "test_forward_and_backward_agree_float32": "both sides would be the same NumPy code",
    "test_one_training_step_agrees_float32": "both sides would be the same NumPy code",
}


class NumpyAsCupy(types.ModuleType):
    """NumPy under CuPy's name where FusedStep and the tests use more than fake_cupy has."""

    def __getattr__(self, name):
        return getattr(np, name)


UNAVAILABLE: list = []  # why the emulation could not be built, if it could not


def pytest_configure(config):
    import test_cuda_source as host
    from gpumlp import backend, fast_cuda

    source = Path(tempfile.mkdtemp(prefix="gpumlp-emulated-")) / "kernels.cu"
    source.write_text(fast_cuda.cuda_source())
    try:
        library = host.build_host_library(source)
    except pytest.skip.Exception as e:          # no C++ compiler: every test skips, saying so
        # CI sets GPUMLP_REQUIRE_EMULATION=1: a green run there must have run the tests
        if os.environ.get("GPUMLP_REQUIRE_EMULATION", "0") not in ("", "0"):
            raise pytest.UsageError(f"emulate_gpu: {e} (GPUMLP_REQUIRE_EMULATION is set)")
        UNAVAILABLE.append(str(e))
        return
    module = type("BuiltHostModule", (host.HostModule,), {"library": library})
    cupy = NumpyAsCupy("cupy (host emulation)")
    vars(cupy).update(vars(host.fake_cupy(module)))
    device = types.SimpleNamespace(compute_capability="90", synchronize=lambda: None)
    cupy.cuda.Device = lambda *args: device
    emulated = backend.Backend(cupy, "cuda:0", "cuda:0 (host emulation)")
    backend.available_devices = lambda: ["cpu", "cuda:0"]
    backend.get_backend = lambda name="cpu": emulated if name.startswith("cuda") else backend.CPU


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.name.split("[")[0]
        if UNAVAILABLE:
            item.add_marker(pytest.mark.skip(reason=f"emulate_gpu: {UNAVAILABLE[0]}"))
        elif item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.skip(reason="emulate_gpu runs the gpu tests only"))
        elif name in NEEDS_REAL_CUPY:
            item.add_marker(pytest.mark.skip(reason=f"host emulation: {NEEDS_REAL_CUPY[name]}"))
