"""The fused CUDA step, checked without a GPU.

1. The CUDA source compiles: with nvcc for sm_90, and with NVRTC and the options CuPy's
   RawModule passes, where those compilers are here (each skipped visibly otherwise).
2. The same source compiled for the CPU (GPUMLP_HOST_EMULATION: each kernel runs its threads
   one at a time, the block reduction phase by phase) stands in for CuPy's RawModule, so that
   `fast_cuda.FusedStep` runs on NumPy arrays: against the generic step, for every
   activation, optimizer, dropout, label smoothing, max-norm and a deeper net, and its
   gradients against central differences of the float64 loss. Each launch is
   checked against the kernel's declared parameters (numpy scalar types, array dtypes,
   contiguity, block size), which on a GPU would otherwise fail silently.
3. The routing (which configs take the fused step), buffer keying and `enable_tf32`, with a
   fake CuPy; CuPy itself is never imported here.

What this cannot check: threads that run at once (grid-stride indexing, shared memory and
__syncthreads), which tests/test_cuda_threads.py checks on CPU threads under ThreadSanitizer;
and the GPU itself, cuBLAS through CuPy, which tests/test_gpu_fused.py checks on a GPU.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from gpumlp import bench, fast_cuda
from gpumlp.activations import ACTIVATIONS
from gpumlp.backend import CPU, Backend, enable_tf32
from gpumlp.config import ACTIVATIONS as config_activations
from gpumlp.config import build_config
from gpumlp.data import DeviceSplit, gather, to_inputs
from gpumlp.errors import DeviceError, GpumlpError
from gpumlp.gradcheck import EPS, FLOOR, loss_of
from gpumlp.model import (Params, backward, dropout_masks, forward, init_params,
                          loss_and_dA2)
from gpumlp.optim import init_state
from gpumlp.gpu_blas import Blas
from gpumlp.step import add_to_sums, generic_step
from activation_reference import GRID, TERMS, float32_error
from numeric_helpers import central_difference

RTOL, ATOL = 1e-5, 1e-6  # float32; the host's tanhf/expf and summation orders differ by ulps
NVRTC_OPTIONS = ("-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")  # CuPy's

C_TYPES = {"long long": (ctypes.c_longlong, np.int64), "int": (ctypes.c_int, np.int32),
           "float": (ctypes.c_float, np.float32)}
C_POINTEES = {"float": np.float32, "int": np.int32, "long long": np.int64,
              "unsigned char": np.uint8, "double": np.float64, "unsigned long long": np.uint64}


def kernel_signatures(source: str) -> dict[str, list[tuple[str, bool]]]:
    """name -> [(C type without const, is_pointer)] of every KERNEL in the source."""
    signatures = {}
    for name, params in re.findall(r"KERNEL\s+(\w+)\(([^)]*)\)", source):
        parsed = []
        for param in params.split(","):
            words = param.replace("*", " * ").split()[:-1]        # drop the parameter's name
            pointer = "*" in words
            parsed.append((" ".join(w for w in words if w not in ("const", "*")), pointer))
        signatures[name] = parsed
    return signatures


SIGNATURES = kernel_signatures(fast_cuda.cuda_source())


@pytest.fixture(scope="module")
def source_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cuda") / "gpumlp_kernels.cu"
    path.write_text(fast_cuda.cuda_source())
    return path


# --- 1. it compiles --------------------------------------------------------------------------

def test_nvcc_compiles_every_kernel(source_file):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA source was not compiled")
    ptx = source_file.with_suffix(".ptx")
    done = subprocess.run([nvcc, "--ptx", "-arch=sm_90", *fast_cuda.OPTIONS, "-ftz=true",
                           "-Werror", "all-warnings", str(source_file), "-o", str(ptx)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.read_text()))
    assert entries == set(SIGNATURES)
    # and on to sm_90's machine code, as CuPy's NVRTC does: ptxas's spills and stack frames
    # (registers out of room) would be slow local memory in every step
    done = subprocess.run([nvcc, "-cubin", "-arch=sm_90", *fast_cuda.OPTIONS, "-ftz=true",
                           "-Xptxas", "-v,-warn-spills,-warn-lmem-usage", "-Werror",
                           "all-warnings", str(source_file), "-o", str(ptx.with_suffix(".cubin"))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    usage = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", done.stderr)
    assert len(usage) == len(SIGNATURES) and set(usage) == {("0", "0")}, done.stderr


def find_nvrtc() -> ctypes.CDLL | None:
    """libnvrtc from a CUDA wheel (nvidia-cuda-nvrtc) or the CUDA toolkit, with its builtins."""
    folders = [os.path.join(p, "nvidia", "*", "lib") for p in sys.path if p]
    folders += [os.path.join(p, "nvidia", "cuda_nvrtc", "lib") for p in sys.path if p]
    toolkit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    folders += [os.path.join(toolkit, "lib64"), os.path.join(toolkit, "lib")]
    for folder in (f for pattern in folders for f in glob.glob(pattern)):
        libs = sorted(glob.glob(os.path.join(folder, "libnvrtc.so*")))
        builtins = sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so*")))
        libs = [lib for lib in libs if ".alt." not in lib]
        builtins = [lib for lib in builtins if ".alt." not in lib]
        if libs and builtins:
            ctypes.CDLL(builtins[0], mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(libs[0])
    return None


def cupy_nvrtc_options() -> tuple[str, ...]:
    """The options CuPy gives NVRTC for `RawModule(code, options=fast_cuda.OPTIONS)`: its own
    list (include paths, --std) where CuPy is installed, else ours and the ones it adds last."""
    try:
        from cupy._core.core import assemble_cupy_compiler_options
    except ImportError:
        return (*fast_cuda.OPTIONS, *NVRTC_OPTIONS)
    try:
        return (*assemble_cupy_compiler_options(fast_cuda.OPTIONS), *NVRTC_OPTIONS)
    except Exception as e:  # a CuPy that cannot find CUDA's headers could not build it either
        pytest.skip(f"CuPy cannot assemble its NVRTC options here ({type(e).__name__}: {e})")


def test_nvrtc_compiles_it_as_cupy_does():
    """CuPy compiles a RawModule with NVRTC, which has no host headers: the real test."""
    nvrtc = find_nvrtc()
    if nvrtc is None:
        why = "libnvrtc not found (pip install nvidia-cuda-nvrtc): not compiled with NVRTC"
        if os.environ.get("GPUMLP_REQUIRE_NVRTC", "0") not in ("", "0"):  # .ci/run sets it
            pytest.fail(f"{why} (GPUMLP_REQUIRE_NVRTC is set)")
        pytest.skip(why)
    program = ctypes.c_void_p()
    source = fast_cuda.cuda_source().encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"gpumlp.cu", 0, None, None) == 0
    options = [o.encode() for o in cupy_nvrtc_options()]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, log.value.decode()
    assert "warning" not in log.value.decode()


def test_the_source_carries_activations_constants():
    source = fast_cuda.cuda_source()
    assert "#define LEAKY_SLOPE 0.009999999776482582f" in source      # float32(0.01), exactly
    assert set(fast_cuda.ACTIVATION_TYPES) == set(ACTIVATIONS) == set(config_activations)


# --- 2. the kernels on the CPU, through FusedStep ----------------------------------------------

class HostKernel:
    """One kernel of the CPU build, called as CuPy calls a RawKernel: (grid, block, args)."""

    def __init__(self, library: ctypes.CDLL, name: str):
        self.name, self.signature = name, SIGNATURES[name]
        self.function = getattr(library, name)
        self.function.restype = None
        self.function.argtypes = [ctypes.c_void_p if pointer else C_TYPES[ctype][0]
                                  for ctype, pointer in self.signature]

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        if self.name == "softmax_xent":
            assert grid == (1,) and block == (fast_cuda.XENT_THREADS,)
        else:
            assert block == (fast_cuda.THREADS,) and 1 <= grid[0] <= fast_cuda.MAX_BLOCKS
        assert len(args) == len(self.signature), f"{self.name}: {len(args)} arguments"
        values = [self.check(i, arg) for i, arg in enumerate(args)]
        self.function(*values)

    def check(self, i: int, arg):
        ctype, pointer = self.signature[i]
        where = f"{self.name} argument {i + 1} ({ctype}{'*' if pointer else ''})"
        if pointer:
            assert isinstance(arg, np.ndarray) and arg.dtype == C_POINTEES[ctype], \
                f"{where}: got {type(arg).__name__} {getattr(arg, 'dtype', '')}"
            assert arg.flags.c_contiguous, f"{where}: not C-contiguous"
            return arg.ctypes.data
        assert type(arg) is C_TYPES[ctype][1], f"{where}: got {type(arg).__name__}"
        return arg


class HostModule:
    """Stands in for cupy.RawModule: the same source and options, built for the CPU."""
    library: ctypes.CDLL

    def __init__(self, code: str, options: tuple):
        assert code == fast_cuda.cuda_source() and options == fast_cuda.OPTIONS

    def get_function(self, name: str) -> HostKernel:
        return HostKernel(self.library, name)


@pytest.fixture(scope="module")
def host_library(source_file) -> ctypes.CDLL:
    return build_host_library(source_file)


def build_host_library(source_file: Path) -> ctypes.CDLL:
    """The CUDA source at `source_file` compiled for the CPU (GPUMLP_HOST_EMULATION), loaded."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler: the kernels were not run on the CPU")
    library = source_file.with_suffix(".so")
    done = subprocess.run([compiler, "-x", "c++", "-O1", "-shared", "-fPIC", "-ffp-contract=off",
                           "-Wall", "-Werror", "-DGPUMLP_HOST_EMULATION", str(source_file),
                           "-o", str(library)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(library))


class HostCublas:
    """Stands in for CuPy's cuBLAS wrapper: gemmEx with cuBLAS's column-major semantics,
    computed by NumPy on the host memory the addresses point to. Records each call."""
    CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_GEMM_DEFAULT, CUBLAS_POINTER_MODE_HOST = 0, 1, -1, 0
    CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
    HANDLE, STREAM = 1234, 5678

    def __init__(self):
        self.calls: list = []
        self.handle_state: dict = {}

    def setStream(self, handle, stream):
        self.handle_state["stream"] = (handle, stream)

    def setPointerMode(self, handle, mode):
        self.handle_state["pointer_mode"] = (handle, mode)

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta,
               C, Ctype, ldc, compute, algo):
        """C (m, n) = alpha op(A) op(B) + beta C, every matrix column-major with its ld."""
        assert handle == self.HANDLE and self.handle_state == {
            "stream": (self.HANDLE, self.STREAM), "pointer_mode": (self.HANDLE, 0)}
        assert (Atype, Btype, Ctype, algo) == (0, 0, 0, -1)   # float32 everywhere, default algo
        assert transa in (0, 1) and transb in (0, 1)
        self.calls.append(compute)
        alpha, beta = (float(ctypes.c_float.from_address(a).value) for a in (alpha, beta))

        def matrix(address, rows, cols, ld):   # column-major (rows, cols), leading dimension ld
            assert ld >= max(1, rows), "leading dimension shorter than a column"
            size = (cols - 1) * ld + rows
            flat = np.ctypeslib.as_array((ctypes.c_float * size).from_address(address))
            return np.lib.stride_tricks.as_strided(flat, (rows, cols), (4, 4 * ld))

        op_a = matrix(A, *((k, m) if transa else (m, k)), lda)
        op_b = matrix(B, *((n, k) if transb else (k, n)), ldb)
        c = matrix(C, m, n, ldc)
        product = (op_a.T if transa else op_a) @ (op_b.T if transb else op_b)   # float32, as cuBLAS
        c[...] = np.float32(alpha) * product + (np.float32(beta) * c if beta else 0)


def fake_cupy(module: type = HostModule, capability: str = "90") -> types.SimpleNamespace:
    """What FusedStep and enable_tf32 use of cupy, on NumPy arrays; records compute types
    (CuPy's: compute_types; the step's own cuBLAS calls: cuda.cublas.calls)."""
    calls: list = []
    linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7,
                                   set_compute_type=lambda dtype, kind: calls.append(kind))
    device = types.SimpleNamespace(compute_capability=capability)
    cublas = HostCublas()
    cuda = types.SimpleNamespace(
        Device=lambda: device, cublas=cublas, runtime=types.SimpleNamespace(CUDA_R_32F=0),
        device=types.SimpleNamespace(get_cublas_handle=lambda: HostCublas.HANDLE),
        get_current_stream=lambda: types.SimpleNamespace(ptr=HostCublas.STREAM))
    return types.SimpleNamespace(
        __name__="fake_cupy", __version__="0", ndarray=np.ndarray, empty=np.empty, full=np.full,
        asarray=np.asarray, ascontiguousarray=np.ascontiguousarray, RawModule=module,
        _core=types.SimpleNamespace(_routines_linalg=linalg), cuda=cuda, compute_types=calls)


@pytest.fixture
def emulated(host_library) -> Backend:
    module = type("BuiltHostModule", (HostModule,), {"library": host_library})
    return Backend(fake_cupy(module), "cuda:0", "cuda:0 (host emulation)")


def problem(widths, m, seed=0):
    """float32 params with nonzero biases, inputs in [0, 1], labels (int32) on the host."""
    rng = np.random.default_rng(seed)
    params = init_params(widths, "he", rng)
    params = Params(params.W, tuple(rng.normal(0, 0.1, b.shape).astype(np.float32) for b in params.b))
    X = (rng.integers(0, 256, (m, widths[0])) / 255).astype(np.float32)
    return params, X, rng.integers(0, 10, m).astype(np.int32)


def copy(params: Params) -> Params:
    return Params(tuple(w.copy() for w in params.W), tuple(b.copy() for b in params.b))


def backward_of(params: Params, X, y, masks, config) -> Params:
    """model.backward's gradients (the generic step's) of the batch at these parameters."""
    act = ACTIVATIONS[config.model.activation]
    cache = forward(params, X, act, masks)
    _, dA2 = loss_and_dA2(cache.A[-1], y, config.train.label_smoothing)
    return backward(params, cache, dA2, act)


def assert_same_run(config, emulated, widths=(784, 48, 10), sizes=(32, 32, 7)):
    """Steps of FusedStep (host kernels) and generic_step from the same start agree, a shorter
    last batch included; parameters, optimizer state, loss and correct count, and each step's
    dW_k and db_k against model.backward. (Their own central-difference check, float64
    differences against the float32 kernels, is test_fused_step_gradients_are_the_central_...)"""
    params, _, _ = problem(widths, 1, seed=3)
    fused_params, generic_params = copy(params), copy(params)
    fused_state, generic_state = init_state(config.optim, fused_params), init_state(config.optim, generic_params)
    fused, generic = fast_cuda.FusedStep(config, emulated), generic_step(config)
    rng = np.random.default_rng(4)
    for t, m in enumerate(sizes, start=1):
        _, X, y = problem(widths, m, seed=10 + t)
        masks = dropout_masks(rng, m, widths[1:-1], config.model.dropout, np.float32)
        lr = config.optim.lr / (2 * t)
        expected = backward_of(copy(fused_params), X, y, masks, config)
        L_f, ok_f = fused(fused_params, fused_state, X, y, lr, t, masks)
        grads = fused.grads[tuple(widths)].grads
        for name, a, b in zip(("dW", "db"), (grads.W, grads.b), (expected.W, expected.b)):
            for k, (x, z) in enumerate(zip(a, b)):
                np.testing.assert_allclose(x, z, rtol=RTOL, atol=ATOL,
                                           err_msg=f"{name}{k + 1} at step {t}")
        L_g, ok_g = generic(generic_params, generic_state, X, y, lr, t, masks)
        assert L_f.shape == () and L_f.dtype == np.float32 and ok_f.dtype == np.int64
        np.testing.assert_allclose(L_f, L_g, rtol=RTOL, err_msg=f"L at step {t}")
        assert int(ok_f) == int(ok_g), f"correct at step {t}"
        for name, a, b in zip(("W", "b"), (fused_params.W, fused_params.b), (generic_params.W, generic_params.b)):
            for k, (x, z) in enumerate(zip(a, b)):
                np.testing.assert_allclose(x, z, rtol=RTOL, atol=ATOL, err_msg=f"{name}{k + 1} at step {t}")
        for i, (x, z) in enumerate(zip(fused_state.m + fused_state.v, generic_state.m + generic_state.v)):
            np.testing.assert_allclose(x, z, rtol=RTOL, atol=ATOL, err_msg=f"state {i} at step {t}")
    assert set(fused.buffers) == {(m, widths) for m in set(sizes)}


# Adam divides by sqrt(v) + eps: where a gradient is ~1e-8 (cancellation, a unit dead on the
# batch), its last-ulp difference between two summation orders (cuBLAS's products and ones @ dA
# for the bias gradients, against NumPy's) moves p by a visible fraction of lr. eps = 1e-4 keeps
# these whole-step comparisons well conditioned, as in tests/test_gpu_fused.py.
ADAM_EPS = "optim.eps=1e-4"
OPTIMIZERS = {
    "sgd": ["optim.momentum=0"],
    "sgd_wd": ["optim.momentum=0", "optim.weight_decay=0.01"],
    "momentum": ["optim.momentum=0.9"],
    "nesterov_wd": ["optim.nesterov=true", "optim.weight_decay=0.001"],
    "adam": ["optim.name=adam", "optim.lr=0.001", ADAM_EPS],
    "adam_l2": ["optim.name=adam", "optim.lr=0.001", "optim.weight_decay=0.01", ADAM_EPS],
    "adamw": ["optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.01", ADAM_EPS],
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_fused_step_matches_generic_for_each_optimizer(emulated, optimizer):
    assert_same_run(build_config(None, OPTIMIZERS[optimizer]), emulated)


@pytest.mark.parametrize("activation", sorted(fast_cuda.ACTIVATION_TYPES))
def test_fused_step_matches_generic_for_each_activation(emulated, activation):
    assert_same_run(build_config(None, [f"model.activation={activation}", "optim.nesterov=true"]),
                    emulated)


@pytest.mark.parametrize("extra", [["model.dropout=0.3"], ["train.label_smoothing=0.1"],
                                   ["model.max_norm=1.5"],
                                   ["model.dropout=0.2", "model.activation=gelu",
                                    "optim.name=adamw", "optim.weight_decay=0.1",
                                    "optim.lr=0.001", ADAM_EPS]])
def test_fused_step_matches_generic_with_dropout_smoothing_max_norm(emulated, extra):
    assert_same_run(build_config(None, extra), emulated)


def test_fused_step_matches_generic_on_a_deeper_net(emulated):
    config = build_config(None, ["model.hidden=[40, 24]", "model.dropout=0.1", "optim.name=adam",
                                 "optim.lr=0.001", "train.label_smoothing=0.05", ADAM_EPS])
    assert_same_run(config, emulated, widths=(784, 40, 24, 10), sizes=(16, 300, 5))


@pytest.mark.parametrize("activation", sorted(fast_cuda.ACTIVATION_TYPES))
def test_fused_step_gradients_are_the_central_differences_of_the_float64_loss(emulated,
                                                                            activation):
    """The kernels' own dW_k and db_k, not against model.backward: central differences in
    float64 of the loss at the same (float32) parameters, every entry of a small 30-12-8-10 net,
    with dropout and label smoothing. The float32 gradients' roundoff reaches 6.4e-5 of the
    floor (gradcheck.FLOOR) here; a derivative off by 5e-4 of itself is above 2e-4 (smaller
    slips are the comparison with model.backward's, to 1e-5). No hidden
    pre-activation is within 1e-3 of relu's kink, which a step of EPS moves by at most ~1e-5."""
    widths, m, smoothing = (30, 12, 8, 10), 16, 0.1
    config = build_config(None, [f"model.activation={activation}", "model.dropout=0.25",
                                 f"train.label_smoothing={smoothing}"])
    params, X, y = problem(widths, m, seed=21)
    masks = dropout_masks(np.random.default_rng(21), m, widths[1:-1], 0.25, np.float32)
    step = fast_cuda.FusedStep(config, emulated)
    at = Params(*(tuple(t.astype(np.float64) for t in ts) for ts in params))  # before the step
    step(params, init_state(config.optim, params), X, y, 0.1, 1, masks)
    grads = step.grads[widths].grads
    act, X64, masks64 = ACTIVATIONS[activation], X.astype(np.float64), tuple(
        M.astype(np.float64) for M in masks)
    assert min(np.abs(A).min() for A in forward(at, X64, act, masks64).A[:-1]) > 1e-3
    loss = lambda: loss_of(at, X64, y, act, masks64, smoothing)[0]  # noqa: E731
    for name, theta, g in zip(("W", "b"), (at.W, at.b), (grads.W, grads.b)):
        for k, (theta_k, g_k) in enumerate(zip(theta, g)):
            flat = theta_k.reshape(-1)
            numeric = np.array([central_difference(loss, flat, i, EPS) for i in range(flat.size)])
            analytic = g_k.reshape(-1).astype(np.float64)
            error = np.abs(analytic - numeric) / np.maximum(
                np.maximum(np.abs(analytic), np.abs(numeric)), FLOOR)
            assert np.abs(analytic).max() > 1e-3, f"d{name}{k + 1}"  # not zeros against zeros
            assert error.max() < 2e-4, (f"d{name}{k + 1}", error.max())


def test_a_batch_of_more_rows_than_threads_and_a_batch_of_one(emulated):
    """softmax_xent's threads take several rows each; m = 1 is a batch too."""
    assert_same_run(build_config(None, []), emulated, sizes=(3 * fast_cuda.XENT_THREADS + 5, 1))


def test_loss_and_labels(emulated):
    """Returned L and correct are fresh arrays each step; int64 labels work; a label out of
    range gives a NaN loss (the training loop's guard then stops the run)."""
    config = build_config(None, [])
    step = fast_cuda.FusedStep(config, emulated)
    params, X, y = problem((784, 16, 10), 8)
    state = init_state(config.optim, params)
    L1, _ = step(params, state, X, y.astype(np.int64), 0.1, 1)
    L2, _ = step(params, state, X, y, 0.1, 2)
    assert L1 is not L2 and np.isfinite(L1) and np.isfinite(L2)
    y[3] = 10
    L3, _ = step(params, state, X, y, 0.1, 3)
    assert np.isnan(L3)


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True),
                                              (True, True)])
def test_gemm_is_the_row_major_product_for_each_transpose(trans_a, trans_b):
    """gpu_blas.Blas.gemm hands cuBLAS (column-major) the arguments of out = op(a) @ op(b)
    for C-contiguous arrays: checked by a gemmEx written from cuBLAS's definition."""
    cupy, rng = fake_cupy(), np.random.default_rng(6)
    blas = Blas(cupy, tf32=False)
    m, k, n = 5, 7, 3
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    out = np.full((m, n), np.nan, dtype=np.float32)
    blas.begin()
    blas.gemm(a, b, out, trans_a=trans_a, trans_b=trans_b)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert cupy.cuda.cublas.calls == [HostCublas.CUBLAS_COMPUTE_32F]


def test_a_cublas_cupy_cannot_load_is_a_one_line_device_error():
    """CuPy 14 loads libcublas at its first use (`cupy.cuda.cublas`): a CUDA install without
    it is a DeviceError naming the library, not a traceback out of the step."""
    def missing():
        raise ImportError('Failure finding "libcublasLt.so.13 or libcublasLt.so.12"\nsearched')
    cupy = fake_cupy()
    cupy.cuda.device.get_cublas_handle = missing
    with pytest.raises(DeviceError) as e:
        Blas(cupy, tf32=False)
    assert str(e.value) == ('cuBLAS could not be loaded (ImportError: Failure finding '
                            '"libcublasLt.so.13 or libcublasLt.so.12"); check the CUDA '
                            'installation (nvidia-smi, gpumlp info)')


@pytest.mark.parametrize("tf32, capability, compute", [(True, "90", 77), (False, "90", 68),
                                                        (True, "75", 68)])
def test_tf32_reaches_the_fused_steps_own_products(emulated, tf32, capability, compute):
    """train.tf32 picks cuBLAS's TF32 compute type for every matrix product of the step (on
    compute capability 8.0 and newer), as it does for CuPy's own; the bias gradients' sums
    (ones @ dA) stay full float32, as the generic step's dA.sum(axis=0) does."""
    emulated.xp.cuda.Device = lambda: types.SimpleNamespace(compute_capability=capability)
    config = build_config(None, [f"train.tf32={str(tf32).lower()}"])
    step = fast_cuda.FusedStep(config, emulated)
    params, X, y = problem((784, 16, 10), 4)
    step(params, init_state(config.optim, params), X, y, 0.1, 1)
    calls = emulated.xp.cuda.cublas.calls
    full = HostCublas.CUBLAS_COMPUTE_32F
    assert calls == [compute, compute, compute, full, compute, compute, full]
    #                A1       A2       dW2      db2   dZ1      dW1      db1
    assert emulated.xp.compute_types == [7 if compute == 77 else 1]


def test_new_parameter_arrays_get_a_new_update_table(emulated):
    """The one-launch optimizer reaches the arrays by address: a step with other parameter
    or state arrays updates those, and leaves the last ones alone."""
    config = build_config(None, ["optim.nesterov=true"])
    fused, generic = fast_cuda.FusedStep(config, emulated), generic_step(config)
    first, X, y = problem((784, 16, 10), 8)
    second = Params(tuple(w * 0.5 for w in first.W), tuple(b + 0.1 for b in first.b))
    first_state = init_state(config.optim, first)
    fused(first, first_state, X, y, 0.1, 1)
    kept = copy(first)
    want, got = copy(second), copy(second)
    want_state, got_state = init_state(config.optim, want), init_state(config.optim, got)
    generic(want, want_state, X, y, 0.1, 1)
    fused(got, got_state, X, y, 0.1, 1)
    for a, b in zip((*got.W, *got.b, *got_state.m), (*want.W, *want.b, *want_state.m)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    for a, b in zip((*first.W, *first.b), (*kept.W, *kept.b)):
        np.testing.assert_array_equal(a, b)


def test_host_arrays_are_refused_not_read_through_their_addresses(emulated):
    """On a GPU, a NumPy array's address is no device pointer: the step says so instead."""
    config = build_config(None, [])
    params, X, y = problem((784, 16, 10), 4)
    state = init_state(config.optim, params)
    on_gpu = fast_cuda.FusedStep(config, emulated)
    on_gpu.xp = types.SimpleNamespace(**{**vars(emulated.xp), "ndarray": type("DeviceArray", (), {})})
    sums = (np.zeros((), np.float64), np.zeros((), np.int64), np.ones((), np.float32),
            np.ones((), np.int64))
    for what, call in (("X, y", lambda: on_gpu(params, state, X, y, 0.1, 1)),
                       ("the batch's row indices",
                        lambda: on_gpu.batch(DeviceSplit(X, y), np.arange(2))),
                       ("the running sums", lambda: on_gpu.tally(*sums, 4))):
        with pytest.raises(GpumlpError, match=f"needs {what}.* on the GPU"):
            call()
    on_gpu.xp = emulated.xp
    on_gpu(params, state, X, y, 0.1, 1)                 # the same arrays, "on the device"


def test_inputs_in_another_memory_order_give_the_same_step(emulated):
    """cuBLAS reads X through its pointer: a Fortran-ordered or strided X is made C-contiguous
    first, not misread."""
    config = build_config(None, [])
    params, X, y = problem((784, 16, 10), 8)
    results = []
    labels = (y, y.astype(np.int64), np.repeat(y, 2)[::2])     # int32; int64; strided
    for inputs, y_in in zip((X, np.asfortranarray(X), np.repeat(X, 2, axis=1)[:, ::2]), labels):
        assert inputs.flags.c_contiguous == (inputs is X)
        p = copy(params)
        L, _ = fast_cuda.FusedStep(config, emulated)(p, init_state(config.optim, p), inputs, y_in,
                                                     0.1, 1)
        results.append((float(L), p))
    for L, p in results[1:]:
        assert L == results[0][0]
        for a, b in zip((*p.W, *p.b), (*results[0][1].W, *results[0][1].b)):
            np.testing.assert_array_equal(a, b)


def test_tally_adds_as_the_training_loop_does(emulated):
    """FusedStep.tally (one launch) gives the loop's running sums exactly as add_to_sums."""
    step = fast_cuda.FusedStep(build_config(), emulated)
    sums = {"kernel": (np.zeros((), np.float64), np.zeros((), np.int64)),
            "loop": (np.zeros((), np.float64), np.zeros((), np.int64))}
    for L, ok, m in ((0.7310586, 97, 128), (2.3025851, 3, 128), (1e-3, 17, 17)):
        L, ok = np.array(L, dtype=np.float32), np.array(ok, dtype=np.int64)
        step.tally(*sums["kernel"], L, ok, m)
        add_to_sums(*sums["loop"], L, ok, m)
    assert sums["kernel"][0] == sums["loop"][0] and sums["kernel"][1] == sums["loop"][1] == 117
    assert sums["kernel"][0].dtype == np.float64


@pytest.mark.parametrize("normalize", ["unit", "standard"])
def test_batch_loader_matches_gather_and_to_inputs(emulated, normalize):
    config = build_config(None, [f"data.normalize={normalize}"])
    rng = np.random.default_rng(5)
    split = DeviceSplit(rng.integers(0, 256, (50, 784)).astype(np.uint8),
                        rng.integers(0, 10, 50).astype(np.int32))
    step = fast_cuda.FusedStep(config, emulated)
    for idx in (rng.permutation(50)[:20], np.arange(45, 50),                 # int64, and:
                rng.permutation(50)[:40:2].astype(np.int32)):            # strided int32
        X, y = step.batch(split, idx)
        images, labels = gather(split, idx)
        np.testing.assert_array_equal(X, to_inputs(images, normalize, "float32"))
        np.testing.assert_array_equal(y, labels)
    X20, _ = step.batch(split, np.arange(20))
    assert X20 is step.inputs[(20, 784)][0] and set(step.inputs) == {(20, 784), (5, 784)}
    assert fast_cuda.contiguous(np, idx, np.int32) is idx               # nothing to convert


def test_the_fused_step_refuses_arrays_its_kernels_would_misread(emulated):
    config = build_config(None, [])
    step = fast_cuda.FusedStep(config, emulated)
    params, X, y = problem((784, 16, 10), 4)
    state = init_state(config.optim, params)
    fortran = Params((np.asfortranarray(params.W[0]), params.W[1]), params.b)
    with pytest.raises(GpumlpError, match="W1 as a C-contiguous float32"):
        step(fortran, state, X, y, 0.1, 1)
    with pytest.raises(GpumlpError, match="float32 inputs"):
        step(params, state, X.astype(np.float64), y, 0.1, 1)


# --- 3. routing, buffers, TF32 ----------------------------------------------------------------

class RecordingModule:
    """A RawModule that builds nothing and remembers which kernels were asked for."""
    asked: list = []

    def __init__(self, code: str, options: tuple):
        self.code = code

    def get_function(self, name: str):
        assert name in SIGNATURES, f"no kernel {name} in the source"
        RecordingModule.asked.append(name)
        return name


def gpu_backend(capability: str = "90") -> Backend:
    return Backend(fake_cupy(RecordingModule, capability), "cuda:0", "cuda:0 (fake)")


@pytest.mark.parametrize("activation", sorted(fast_cuda.ACTIVATION_TYPES))
def test_float32_configs_take_the_fused_step(activation):
    config = build_config(None, [f"model.activation={activation}", "model.dropout=0.5",
                                 "model.max_norm=3", "train.label_smoothing=0.1", "optim.name=adamw"])
    assert fast_cuda.unsupported(config) is None
    RecordingModule.asked = []
    step = fast_cuda.gpu_step(config, gpu_backend())
    assert isinstance(step, fast_cuda.FusedStep) and step.kind == "fused_cuda"
    assert f"bias_act_{activation}" in RecordingModule.asked


def test_float64_takes_the_generic_step():
    config = build_config(None, ["train.dtype=float64"])
    assert "float64" in fast_cuda.unsupported(config)
    step = fast_cuda.gpu_step(config, gpu_backend())
    assert not isinstance(step, fast_cuda.FusedStep) and not hasattr(step, "batch")


def test_a_build_failure_is_one_line_device_error():
    class Broken(RecordingModule):
        def get_function(self, name):
            raise RuntimeError("kern.cu(12): error: expected a ';'\nmore lines")

    class CompileException(Exception):   # CuPy's: NVRTC refused the source
        pass

    class Refused(RecordingModule):
        def get_function(self, name):
            raise CompileException("kern.cu(12): error: expected a ';'\nmore lines")

    backend = Backend(fake_cupy(Broken), "cuda:0", "fake")
    with pytest.raises(GpumlpError, match=r"did not build \(RuntimeError: kern.cu\(12\)") as e:
        fast_cuda.FusedStep(build_config(), backend)
    assert "\n" not in str(e.value)
    assert str(e.value).endswith("; check the CUDA installation (nvidia-smi, gpumlp info)")
    with pytest.raises(GpumlpError, match=r"\(CompileException: kern.cu\(12\): error: expected "
                       r"a ';'\); this is a gpumlp bug, please report it$"):
        fast_cuda.FusedStep(build_config(), Backend(fake_cupy(Refused), "cuda:0", "fake"))


def test_buffers_are_keyed_by_batch_size_and_widths():
    step = fast_cuda.FusedStep(build_config(), gpu_backend())
    widths = (784, 32, 10)
    first = step.step_buffers(128, widths)
    assert step.step_buffers(128, widths) is first                  # reused, not reallocated
    last = step.step_buffers(96, widths)                            # the epoch's shorter batch
    assert last is not first and set(step.buffers) == {(128, widths), (96, widths)}
    assert [a.shape for a in first.A] == [(128, 32), (128, 10)]
    assert fast_cuda.buffer_shapes((784, 64, 32, 10), 5) == {
        "A": ((5, 64), (5, 32), (5, 10)), "Z": ((5, 64), (5, 32)), "dZ": ((5, 64), (5, 32)),
        "dA": (5, 10)}


@pytest.mark.parametrize("on, capability, expected", [(True, "90", [7]), (False, "90", [1]),
                                                      (True, "75", [1])])
def test_enable_tf32_sets_cupys_compute_type(on, capability, expected):
    backend = gpu_backend(capability)
    assert enable_tf32(backend, on) is (expected == [7])
    assert backend.xp.compute_types == expected


def test_tf32_follows_the_config_when_a_gpu_step_is_made():
    backend = gpu_backend()
    fast_cuda.gpu_step(build_config(None, ["train.tf32=true"]), backend)
    fast_cuda.gpu_step(build_config(None, ["train.dtype=float64"]), backend)
    assert backend.xp.compute_types == [7, 1]
    assert enable_tf32(CPU, True) is False


def test_importing_the_fused_step_does_not_import_cupy():
    code = "import sys, gpumlp.fast_cuda, gpumlp.step; sys.exit('cupy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_softmax_xent_keeps_huge_logits_finite_and_counts_the_first_maximum_of_a_tie(emulated):
    """Row 0's logits are huge (exp would overflow without the row maximum taken off first);
    row 1 ties its maximum between classes 2 and 7 and is labelled 2: the first maximum
    counts, as argmax (model.correct_count) takes it."""
    step = fast_cuda.FusedStep(build_config(None, []), emulated)
    rng = np.random.default_rng(4)
    A2 = (3 * rng.standard_normal((6, 10))).astype(np.float32)
    A2[0] = 1e4 + np.arange(10, dtype=np.float32)
    A2[1] = 0.0
    A2[1, [2, 7]] = 5.0
    y = rng.integers(0, 10, 6).astype(np.int32)
    y[1] = 2
    b2 = np.zeros(10, dtype=np.float32)
    want_L, want_dA2 = loss_and_dA2(A2, y)
    buf = step.step_buffers(6, (784, 16, 10))
    buf.A[-1][...] = A2
    L, correct = step.loss(Params((), (b2,)), y, buf)
    assert np.isfinite(L) and np.isfinite(buf.dA).all()
    np.testing.assert_allclose(L, want_L, rtol=RTOL)
    np.testing.assert_allclose(buf.dA, want_dA2, rtol=RTOL, atol=ATOL)
    assert int(correct) == int((A2.argmax(axis=1) == y).sum())


def test_softmax_xent_of_a_logit_spread_past_float_is_the_loss_not_nan(emulated):
    """The kernel's 0-target terms count 0 where log Z2 is -inf, as model.loss_and_dA2 and the
    fast CPU step do (0 * -inf was NaN)."""
    step = fast_cuda.FusedStep(build_config(None, []), emulated)
    A2 = np.zeros((2, 10), dtype=np.float32)
    A2[:, 0], A2[:, 1] = 3e38, -3e38
    y = np.zeros(2, dtype=np.int32)
    buf = step.step_buffers(2, (784, 16, 10))
    buf.A[-1][...] = A2
    L, _ = step.loss(Params((), (np.zeros(10, dtype=np.float32),)), y, buf)
    with np.errstate(over="ignore", invalid="ignore"):
        assert float(L) == float(loss_and_dA2(A2, y)[0]) == 0.0


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_act_backward_takes_phi_prime_at_exactly_zero_as_activations_does(emulated, activation):
    """A pre-activation of exactly 0 (zero bias on a blank image, say) is on the kink:
    phi'(0) is 0 for relu and the slope for leaky_relu, in the kernel as in activations.py."""
    step = fast_cuda.FusedStep(build_config(None, [f"model.activation={activation}"]), emulated)
    A = np.array([[0.0, -0.0, 1.0, -1.0], [0.0, 2.0, 0.0, -3.0]], dtype=np.float32)
    dZ = np.full_like(A, 0.5)
    want = dZ * ACTIVATIONS[activation].phi_prime(A)
    fast_cuda.launch(step.kernels.act_backward, A.size, np.int64(A.size), dZ, A)
    np.testing.assert_array_equal(dZ, want)


@pytest.mark.parametrize("activation", sorted(TERMS))
def test_the_kernels_smooth_activations_are_within_4_ulps_of_float64_on_both_tails(emulated,
                                                                                  activation):
    """bias_act's phi and act_backward's phi' from A = -40 to 40, as test_activations checks
    activations.py's: the kernel's forms of 1 + tanh and 1 - tanh^2 cancelled to 0 in the tails."""
    step = fast_cuda.FusedStep(build_config(None, [f"model.activation={activation}"]), emulated)
    A, n = GRID.reshape(1, -1).copy(), GRID.size
    Z = np.full_like(A, np.nan)
    fast_cuda.launch(step.kernels.bias_act, n, np.int64(n), np.int32(n), A,
                     np.zeros(n, dtype=np.float32), Z)
    dA = np.ones_like(A)
    fast_cuda.launch(step.kernels.act_backward, n, np.int64(n), dA, A)
    for which, got in (("phi", Z[0]), ("phi_prime", dA[0])):
        error = float32_error(activation, which, got)
        worst = np.nanargmax(error)
        assert error[worst] <= 4, f"{which} at A = {GRID[worst]}: {error[worst]:.3g} ulps"


@pytest.mark.parametrize("activation", sorted(TERMS))
def test_act_backward_of_huge_pre_activations_is_no_nan(emulated, activation):
    """phi' at the ends of float32, as activations.py gives it: gelu' took 2 K a (inf) times
    e (0), a NaN that a blown-up run's guard would then report as the weights' own."""
    step = fast_cuda.FusedStep(build_config(None, [f"model.activation={activation}"]), emulated)
    A = np.array([[-3.4e38, -2.2e38, 2.2e38, 3.4e38]], dtype=np.float32)
    dA = np.ones_like(A)
    fast_cuda.launch(step.kernels.act_backward, A.size, np.int64(A.size), dA, A)
    with np.errstate(all="ignore"):
        want = ACTIVATIONS[activation].phi_prime(A)
    assert not np.isnan(dA).any()
    np.testing.assert_array_equal(dA, want)


def test_the_batch_loader_clips_row_indices_outside_the_split_as_take_does(emulated):
    """The kernel reads no row outside the images: an index below 0 or past the end reads
    the first or the last row, as np.take(mode="clip") (fast_cpu's loader) does."""
    rng = np.random.default_rng(6)
    split = DeviceSplit(rng.integers(0, 256, (5, 784)).astype(np.uint8),
                        rng.integers(0, 10, 5).astype(np.int32))
    idx = np.array([-3, 0, 4, 5, 1000], dtype=np.int64)
    X, y = fast_cuda.FusedStep(build_config(None, []), emulated).batch(split, idx)
    rows = split.images.take(idx, axis=0, mode="clip")
    np.testing.assert_array_equal(X, to_inputs(rows, "unit", "float32"))
    np.testing.assert_array_equal(y, split.labels.take(idx, mode="clip"))


def test_a_label_below_zero_gives_a_nan_loss_as_one_past_the_last_does(emulated):
    """softmax_xent's guard is on both ends of 0..c-1: a label of -1 matches no class, so its
    row would add a loss of 0 (or -y_off's sum) and the mean would look plausible; the
    training loop's NaN guard must see it instead. The rows' count stays the argmax's."""
    step = fast_cuda.FusedStep(build_config(None, []), emulated)
    A2 = np.random.default_rng(7).standard_normal((5, 10)).astype(np.float32)
    b2 = np.zeros(10, dtype=np.float32)
    for bad in (-1, -1000, 10):
        y = A2.argmax(axis=1).astype(np.int32)
        y[2] = bad
        buf = step.step_buffers(5, (784, 16, 10))
        buf.A[-1][...] = A2
        L, correct = step.loss(Params((), (b2,)), y, buf)
        assert np.isnan(L), f"label {bad}: L = {L}"
        assert int(correct) == 4, f"label {bad}"


def test_softmax_xent_smooths_labels_over_the_nets_own_class_count(emulated):
    """Y's y_off is e / c for the c the logits have, not MNIST's 10: a net of 4 or 13 outputs
    gets the targets model.targets gives it (its dA, and its loss through them)."""
    step = fast_cuda.FusedStep(build_config(None, ["train.label_smoothing=0.2"]), emulated)
    rng = np.random.default_rng(8)
    for c in (4, 13):
        A2 = rng.standard_normal((6, c)).astype(np.float32)
        b2 = rng.normal(0, 0.1, c).astype(np.float32)
        y = rng.integers(0, c, 6).astype(np.int32)
        want_L, want_dA2 = loss_and_dA2(A2 + b2, y, 0.2)
        buf = step.step_buffers(6, (784, 16, c))
        buf.A[-1][...] = A2
        L, _ = step.loss(Params((), (b2,)), y, buf)
        np.testing.assert_allclose(L, want_L, rtol=RTOL, err_msg=f"c = {c}")
        np.testing.assert_allclose(buf.dA, want_dA2, rtol=RTOL, atol=ATOL, err_msg=f"c = {c}")


@pytest.mark.parametrize("activation", sorted(fast_cuda.ACTIVATION_TYPES))
def test_bias_act_passes_nan_and_infinities_through_as_activations_does(emulated, activation):
    """A NaN pre-activation (a NaN weight, an overflowed product) stays NaN through phi, as
    activations.py's (np.maximum propagates it): a relu written `a > 0 ? a : 0` would turn it
    into 0, and the training loop's NaN guard would never see the broken weight."""
    step = fast_cuda.FusedStep(build_config(None, [f"model.activation={activation}"]), emulated)
    A = np.array([[np.nan, np.inf, -np.inf, 0.0], [1.5, -2.0, 30.0, -30.0]], dtype=np.float32)
    b = np.array([0.0, 0.0, 0.0, 0.5], dtype=np.float32)
    Z = np.full_like(A, 7.0)
    with np.errstate(all="ignore"):
        want = ACTIVATIONS[activation].phi(A + b)
    fast_cuda.launch(step.kernels.bias_act, A.size, np.int64(A.size), np.int32(4), A, b, Z)
    assert np.isnan(Z[0, 0])
    np.testing.assert_allclose(Z, want, rtol=RTOL, atol=ATOL)   # NaN where want has NaN


@pytest.mark.parametrize("d", [1, 3])
def test_the_batch_loader_writes_every_label_whatever_the_row_width(emulated, d):
    """gather_inputs writes y[r] from one element of row r (its column 0): with rows of one
    or three columns every label must still be written (a new y is all -1 until then)."""
    rng = np.random.default_rng(9)
    split = DeviceSplit(rng.integers(0, 256, (7, d)).astype(np.uint8),
                        rng.integers(0, 10, 7).astype(np.int32))
    idx = np.array([6, 0, 3, 3, 5], dtype=np.int64)
    X, y = fast_cuda.FusedStep(build_config(None, []), emulated).batch(split, idx)
    np.testing.assert_array_equal(y, split.labels[idx])
    np.testing.assert_array_equal(X, to_inputs(split.images[idx], "unit", "float32"))


# --- 4. what the step's host side must keep right, on a GPU more than here --------------------
def test_new_buffers_are_poisoned_so_that_a_missed_element_shows():
    """Every buffer is NaN (labels -1) until a kernel writes it: an element a kernel misses
    shows at once instead of reading as a plausible 0. The ones row of db = ones @ dA is 1."""
    step = fast_cuda.FusedStep(build_config(), gpu_backend())
    params, _, _ = problem((784, 16, 10), 1)
    buf = step.step_buffers(3, (784, 16, 10))
    for a in (*buf.A, *buf.Z, *buf.dZ, buf.dA):
        assert a.dtype == np.float32 and np.isnan(a).all()
    assert buf.ones.dtype == np.float32 and (buf.ones == 1).all()
    grads, rows = step.grad_buffers(params, (784, 16, 10))
    assert all(np.isnan(g).all() for g in (*grads.W, *grads.b))
    assert np.shares_memory(rows[0], grads.b[0])
    X, y = step.poisoned((4, 784)), step.poisoned((4,), np.int32)     # as batch makes the loader's
    assert np.isnan(X).all() and y.dtype == np.int32 and (y == -1).all()


def test_a_step_keeps_gradient_buffers_per_layer_widths(emulated):
    """One FusedStep given nets of two widths writes each net's gradients into buffers of its
    own shapes (cuBLAS would write past a smaller buffer on a GPU)."""
    config = build_config(None, ["optim.momentum=0.9"])
    fused, generic = fast_cuda.FusedStep(config, emulated), generic_step(config)
    for widths in ((784, 24, 10), (784, 16, 10), (784, 24, 10)):
        params, X, y = problem(widths, 8, seed=widths[1])
        want, got = copy(params), copy(params)
        want_state, got_state = init_state(config.optim, want), init_state(config.optim, got)
        generic(want, want_state, X, y, 0.1, 1)
        fused(got, got_state, X, y, 0.1, 1)
        for a, b in zip((*got.W, *got.b, *got_state.m), (*want.W, *want.b, *want_state.m)):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=str(widths))
    assert set(fused.grads) == {(784, 24, 10), (784, 16, 10)}


def test_a_new_optimizer_state_for_the_same_parameters_gets_a_new_update_table(emulated):
    """The table holds the state arrays' addresses too: a step given the same Params with
    another OptState (a reset velocity, say) updates that state, not the last one."""
    config = build_config(None, ["optim.momentum=0.9"])
    fused, generic = fast_cuda.FusedStep(config, emulated), generic_step(config)
    params, X, y = problem((784, 16, 10), 8)
    want = copy(params)
    old_state = init_state(config.optim, params)
    fused(params, old_state, X, y, 0.1, 1)
    generic(want, init_state(config.optim, want), X, y, 0.1, 1)
    kept = [m.copy() for m in old_state.m]
    new_state, want_state = init_state(config.optim, params), init_state(config.optim, want)
    fused(params, new_state, X, y, 0.1, 2)
    generic(want, want_state, X, y, 0.1, 2)
    for a, b in zip((*params.W, *params.b, *new_state.m), (*want.W, *want.b, *want_state.m)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    for a, b in zip(old_state.m, kept):
        np.testing.assert_array_equal(a, b)


def test_the_fused_step_refuses_shapes_and_host_arrays_its_kernels_would_misread(emulated):
    """The kernels index raw memory by the shapes the step assumes; on a GPU a wrong shape
    reads or writes past an array, and a host array's address is no device pointer."""
    config = build_config(None, ["optim.momentum=0.9", "model.dropout=0.5"])
    params, X, y = problem((784, 16, 10), 4)
    state = init_state(config.optim, params)
    mask = np.ones((4, 16), np.float32)
    short_b = Params(params.W, (params.b[0][:8].copy(), params.b[1]))
    short_m = state._replace(m=(state.m[0][:100].copy(), *state.m[1:]))
    cases = [("dropout mask 1", (params, state, X, y, [np.ones((4, 8), np.float32)])),
             ("b1 as a C-contiguous float32", (short_b, state, X, y, [mask])),
             (r"optimizer state m\[0\]", (params, short_m, X, y, [mask])),
             ("one integer label per row", (params, state, X, y[:3], [mask])),
             (r"inputs of shape \(m, 784\)", (params, state, X[:, :700].copy(), y, [mask]))]
    for match, (p, s, X_in, y_in, masks) in cases:
        with pytest.raises(GpumlpError, match=match):
            fast_cuda.FusedStep(config, emulated)(p, s, X_in, y_in, 0.1, 1, tuple(masks))
    split = DeviceSplit(np.zeros((6, 784), np.uint16), np.zeros(6, np.int32))
    with pytest.raises(GpumlpError, match="the training images as a C-contiguous uint8"):
        fast_cuda.FusedStep(config, emulated).batch(split, np.arange(2))

    device = type("DeviceArray", (np.ndarray,), {})                  # what is "on the GPU"

    def on(array):
        return array.view(device)

    step = fast_cuda.FusedStep(config, emulated)
    step.xp = types.SimpleNamespace(**{**vars(emulated.xp), "ndarray": device})
    with pytest.raises(GpumlpError, match="needs the parameters and optimizer state on the GPU"):
        step(params, state, on(X), on(y), 0.1, 1, (on(mask),))
    with pytest.raises(GpumlpError, match="needs the training split on the GPU"):
        step.batch(DeviceSplit(np.zeros((6, 784), np.uint8), np.zeros(6, np.int32)),
                   on(np.arange(2)))


def test_each_step_points_cublas_at_the_current_handle_stream_and_host_scalars(emulated):
    """CuPy's own calls between two steps may leave its cuBLAS handle on another stream or in
    device pointer mode, and the handle is per thread and device: each step sets them again."""
    config = build_config(None, [])
    step = fast_cuda.FusedStep(config, emulated)
    params, X, y = problem((784, 16, 10), 4)
    state = init_state(config.optim, params)
    step(params, state, X, y, 0.1, 1)
    cublas = emulated.xp.cuda.cublas
    cublas.handle_state = {"stream": (HostCublas.HANDLE, 0), "pointer_mode": (HostCublas.HANDLE, 1)}
    step(params, state, X, y, 0.1, 2)
    cublas.HANDLE, cublas.handle_state = 4321, {}                    # another thread's handle
    emulated.xp.cuda.device.get_cublas_handle = lambda: 4321
    step(params, state, X, y, 0.1, 3)
    assert len(cublas.calls) == 3 * 7


def test_tf32_is_used_from_compute_capability_8_0_and_old_cupy_without_it_is_fine_when_off():
    assert enable_tf32(gpu_backend("80"), True) is True
    old = gpu_backend()
    old.xp._core = types.SimpleNamespace()                           # no set_compute_type
    assert enable_tf32(old, False) is False
    with pytest.raises(DeviceError, match="has no way to set the matmul compute type"):
        enable_tf32(old, True)


class FakeCupy:
    """What backend.cuda_backend uses of CuPy, with `count` GPUs; records the device used."""

    def __init__(self, count):
        self.used = []
        fake = self

        class Device:
            def __init__(self, index):
                self.index = index

            def use(self):
                fake.used.append(self.index)

        self.cuda = types.SimpleNamespace(
            Device=Device, cublas=object(),
            nvrtc=types.SimpleNamespace(getVersion=lambda: (13, 0)), runtime=types.SimpleNamespace(
                getDeviceCount=lambda: count,
                getDeviceProperties=lambda i: {"name": f"GPU{i}".encode()}))


def test_cuda_n_picks_gpu_n_and_a_gpu_past_the_last_is_refused(monkeypatch):
    from gpumlp import backend as backend_module
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cupy = FakeCupy(2)
    monkeypatch.setattr(backend_module, "_import_cupy", lambda: cupy)
    chosen = backend_module.get_backend("cuda:1")
    assert (chosen.device, chosen.description, cupy.used) == ("cuda:1", "cuda:1 (GPU1)", [1])
    assert backend_module.get_backend("CUDA").device == "cuda:0" and cupy.used == [1, 0]
    assert backend_module.get_backend("auto").device == "cuda:0"
    assert backend_module.available_devices() == ["cpu", "cuda:0", "cuda:1"]
    with pytest.raises(DeviceError) as e:
        backend_module.get_backend("cuda:2")
    assert str(e.value) == ("--device cuda:2: only 2 GPU(s) here (cuda:0..cuda:1); pick one of "
                            "those or --device cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")     # which may be why
    with pytest.raises(DeviceError, match=r"only 2 GPU\(s\) here, CUDA_VISIBLE_DEVICES being "
                                          r"'2,3' \(cuda:0\.\.cuda:1\)"):
        backend_module.get_backend("cuda:2")
    for name in ("cuda:1x", "cuda:", "cuda1"):
        with pytest.raises(DeviceError, match="not a device"):
            backend_module.get_backend(name)
    assert cupy.used == [1, 0, 0]
    monkeypatch.setattr(backend_module, "_import_cupy", lambda: FakeCupy(0))  # no GPU
    assert backend_module.get_backend("auto") is backend_module.CPU


def test_batch_inputs_uses_the_steps_loader_only_without_augmentation():
    from gpumlp.step import batch_inputs
    split = DeviceSplit(np.full((4, 784), 255, np.uint8), np.arange(4, dtype=np.int32))
    loaded = []
    step = types.SimpleNamespace(batch=lambda s, idx: loaded.append(idx) or ("X", "y"))
    config = build_config(None, [])
    assert batch_inputs(step, split, np.arange(2), config, None, None) == ("X", "y")
    X, y = batch_inputs(step, split, np.arange(2), config, lambda X, rng: X * 0.5, None)
    assert len(loaded) == 1 and (X == 0.5).all() and list(y) == [0, 1]


def test_the_benchs_sgemm_reference_is_full_float32_after_a_tf32_run_in_the_process(
        monkeypatch):
    """CuPy keeps one compute type per process: after a train.tf32 run (or with CUPY_TF32=1)
    the bench's sgemm reference, and its gpumlp rows, would run on TF32 tensor cores, and the
    share of the reference would compare TF32 with full float32 products."""
    backend = gpu_backend()
    enable_tf32(backend, True)
    seen = []

    def reference(on):
        seen.append(list(on.xp.compute_types))
        raise KeyboardInterrupt        # no GPU here: stop at the reference, before any row

    monkeypatch.setattr(bench, "sgemm_rate", reference)
    spec = bench.BenchSpec(hidden=(16,), batch=(8,), samples=8, torch=False)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(spec, backend, split=list(range(8)))
    assert seen == [[7, 1]]            # TF32 (the run before), then full float32 (the bench's)
