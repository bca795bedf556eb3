#!/usr/bin/env bash
# The GPU checks in one go, for a maintainer on a GPU host. It works in the checkout that holds
# it (from any folder) and needs a python3 with gpumlp's dependencies, CuPy (the cuda12 or
# cuda13 extra) and pytest, and PyTorch for CUDA for the benchmark's comparison (optional):
#
#     GPUMLP_DATA_DIR=/path/to/mnist bash scripts/gpu_check.sh
#
# Environment:
#   GPUMLP_DATA_DIR   the folder of the four MNIST files; nothing is downloaded when it is set.
#                     Without it, shared/data/mnist in the checkout is used if present (copy
#                     the files there: a link to a folder outside may not travel); else the
#                     real-MNIST test skips, the benchmark runs on random images and the h256
#                     run is not started (it would try to download MNIST).
#   GPUMLP_CACHE_DIR  default: a fresh temporary folder, so the user's cache is never touched.
#   CUPY_CACHE_DIR    CuPy's compiled kernels; default: gpumlp-cupy-kernels-<uid> in the
#                     temporary folder (mode 700, yours alone, else a fresh folder), the same
#                     for every run of the script, so a rerun of two sections on the same
#                     machine does not compile every kernel again.
#   CUPY_CACHE_TAR    a cupy-kernels.tar an earlier run left in its $OUT: its kernels are put in
#                     CUPY_CACHE_DIR first, so a rerun on a fresh machine compiles none of them
#                     again (a first run compiles about 80, about 25 s of NVRTC; docs/gpu.md).
#                     A relative path is taken from the checkout.
#   OUT               where the logs go (default: gpu-check-out/ in the checkout).
#   PYTHON            the interpreter (default: python3).
#   SECTIONS          the sections to run, by name (default: the first five, "info tests steps
#                     bench train"); e.g. SECTIONS="tests bench" to rerun two after a fix, or
#                     SECTIONS=sanitize for the sixth, which runs only when named.
#   SANITIZER         compute-sanitizer's path (default: the one on PATH, else CUDA's bin/).
#   TESTS             what the tests section gives pytest (default: tests/test_gpu_*.py), e.g.
#                     TESTS="tests/test_gpu_fused.py::test_one tests/test_gpu_run.py" to rerun
#                     only what failed (pytest's own cache is off: every machine is fresh).
#
# Sections, each under its own time limit (60 + 150 + 40 + 90 + 60 s, and 10 s more each to be
# killed: 450 s at most, usually far less; give a job runner at least that). At the limit a
# section gets SIGINT, so pytest still prints its failures and summary; pytest runs with -v
# (each test's result as it ends) and dumps the stack of a test still running after 40 s.
# The tests also stop between two tests after 120 s (GPUMLP_TESTS_DEADLINE, which
# tests/conftest.py reads), so that no test is cut off midway (a `gpumlp` command a test runs
# takes SIGINT as its own Ctrl-C: the test would fail with exit 130 and pytest go on).
# Each section's log ends with how many kernels CuPy compiled in it (a first run's cost).
#   info       nvidia-smi, versions, `gpumlp info`, a preflight of what  -> $OUT/info.log
#              the others need (cuBLAS, NVRTC, cuRAND, cupyx, Pillow,
#              matplotlib, pytest; whether PyTorch sees the GPU)
#   tests      python -m pytest -m gpu tests/test_gpu_*.py                -> $OUT/pytest-gpu.log
#   steps      generic vs fused step, h256, batch 128 (ms per step), and  -> $OUT/steps.log
#              the fused step replayed as a CUDA graph (a probe)
#   bench      gpumlp bench --device cuda (vs PyTorch eager)             -> $OUT/bench.log
#   train      gpumlp train --device cuda --config configs/h256.yaml    -> $OUT/train-h256.log,
#              then that run's metrics.jsonl and summary.json, also when it failed
#   sanitize   only when named, at most 240 s: a short `gpumlp train`   -> $OUT/sanitize.log
#              through every fused kernel under compute-sanitizer's
#              memcheck, then its racecheck; each array its own cudaMalloc
# A section that fails or runs out of time does not stop the next one; the last lines printed
# are a summary of all of them, and the exit status is 1 when any section did not end ok.
# Every file goes to one log per section, and the kernels this run compiled to
# cupy-kernels.tar (at most seven files in $OUT: a job runner may bring back only a few).
set -uo pipefail
cd "$(dirname "$0")/.."

SECTIONS="${SECTIONS:-info tests steps bench train}"
for name in $SECTIONS; do
  case $name in
    info|tests|steps|bench|train|sanitize) ;;
    *) echo "gpu_check.sh: no section '$name' in SECTIONS;" \
         "the sections are: info tests steps bench train sanitize" >&2
       exit 2 ;;
  esac
done
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export OUT PY PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GPUMLP_CACHE_DIR="${GPUMLP_CACHE_DIR:-$(mktemp -d)}"  # never the user's cache
if [ -z "${CUPY_CACHE_DIR:-}" ]; then  # one per user, only theirs; else a fresh one
  CUPY_CACHE_DIR="${TMPDIR:-/tmp}/gpumlp-cupy-kernels-$(id -u)"
  mkdir -p -m 700 "$CUPY_CACHE_DIR" 2>/dev/null
  if ! [ -O "$CUPY_CACHE_DIR" ] || ! [ -w "$CUPY_CACHE_DIR" ] || [ -L "$CUPY_CACHE_DIR" ]; then
    CUPY_CACHE_DIR="$(mktemp -d)"
  fi
fi
export CUPY_CACHE_DIR
# CuPy then compiles to the GPU's own code (cubin): PTX from an NVRTC newer than the driver
# is refused (CUDA_ERROR_UNSUPPORTED_PTX_VERSION), and the kernels in the tar are cubins
unset CUPY_COMPILE_WITH_PTX
kernels() { find "$CUPY_CACHE_DIR" -maxdepth 1 -type f 2>/dev/null | wc -l; }
if [ -n "${CUPY_CACHE_TAR:-}" ]; then  # an earlier run's kernels: none compiled again
  if [ -f "$CUPY_CACHE_TAR" ] && mkdir -p "$CUPY_CACHE_DIR"; then  # (a relative path: from
    tar -xf "$CUPY_CACHE_TAR" -C "$CUPY_CACHE_DIR" --no-same-owner 2>/dev/null  # the checkout)
    tar_rc=$?
    echo "kernel cache: $(kernels) kernels in $CUPY_CACHE_DIR after $CUPY_CACHE_TAR" \
      "(tar exited $tar_rc)"
  else
    echo "gpu_check.sh: cannot read CUPY_CACHE_TAR '$CUPY_CACHE_TAR'; every kernel is compiled" >&2
  fi
fi
START_KERNELS=$(kernels)
if [ -z "${GPUMLP_DATA_DIR:-}" ] && [ -d shared/data/mnist ]; then
  export GPUMLP_DATA_DIR="$PWD/shared/data/mnist"
fi
declare -A STATUS

wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }

section() {  # section NAME LIMIT_SECONDS LOG COMMAND...: run it, tee its output, note its status
  local name=$1 limit=$2 log=$3
  shift 3
  echo "=== $name (at most ${limit}s) ===" | tee "$OUT/$log"
  local start=$SECONDS before
  before=$(kernels)
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]} took=$((SECONDS - start))
  echo "($name took ${took}s; CuPy compiled $(($(kernels) - before)) kernels in it)" |
    tee -a "$OUT/$log"
  if [ "$rc" -eq 0 ]; then
    STATUS[$name]=ok
  elif [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$took" -ge "$limit" ]; }; then
    STATUS[$name]="TIMED OUT"           # 137: it ignored timeout's SIGINT and was killed
  else
    STATUS[$name]="failed ($rc)"        # 137 before the limit: killed, e.g. out of memory
  fi
}

info() {  # fails when the versions or `gpumlp info` cannot be printed, or a preflight fails
  local rc=0
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi || true
  "$PY" - <<'EOF' || rc=1
# Each version on a line of its own: one that cannot be read says why, and the rest still print.
import platform
from importlib import import_module
from importlib.metadata import version


def first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def about(name, optional=False):  # its module must import; the version is the dist's
    try:
        import_module(name)
        return version(name) if name != "cupy" else import_module(name).__version__
    except Exception as e:
        if not optional:
            missing.append(name)
        return f"{'not installed' if optional else 'MISSING'} ({first_line(e)})"


missing = []
print("python  ", platform.python_version())
for name in ("numpy", "cupy", "click", "pytest"):  # CUDA's versions: `gpumlp info` next
    print(f"{name:8}", about(name))
torch = about("torch", optional=True)
if not torch.startswith("not installed"):
    torch += f" (cuda {import_module('torch').version.cuda})"
print("torch   ", torch)
raise SystemExit(f"missing: {', '.join(missing)}" if missing else 0)
EOF
  "$PY" -m gpumlp info || rc=1
  "$PY" - <<'EOF' || rc=1
# What the other sections need, each tried once, so that a missing library fails here in one
# line rather than in every test (CuPy 14 loads cuBLAS, cuRAND and NVRTC at their first use).
import time

import numpy as np
checks = {  # each a statement that raises when the library cannot do its part
    "cuBLAS (a product)": "import cupy; a = cupy.asarray(np.ones((64, 64), np.float32)); "
                          "assert float((a @ a)[0, 0]) == 64, 'wrong product'",
    "the fused kernels (NVRTC)": "import cupy; from gpumlp.fast_cuda import Kernels; "
                                 "Kernels(cupy, 'relu')",
    "CuPy's generator": "import cupy; r = cupy.random.default_rng(0).random(4, cupy.float32); "
                        "assert r.dtype == cupy.float32, r.dtype",
    "cupyx map_coordinates": "import cupy, cupyx.scipy.ndimage as nd; "
                             "nd.map_coordinates(cupy.ones((4, 4), cupy.float32), "
                             "cupy.ones((2, 3), cupy.float32), order=1)",
    "Pillow, matplotlib (a GPU test)": "import PIL, matplotlib",
    "pytest (the tests section)": "import pytest",
}
failed = 0
for name, code in checks.items():  # each one's time: the first (CUDA, cuBLAS) and NVRTC's
    start = time.perf_counter()
    try:
        exec(code, {"np": np})
        print(f"preflight {name}: ok ({time.perf_counter() - start:.1f} s)")
    except BaseException as e:
        failed += 1
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"preflight {name}: FAILED ({type(e).__name__}: {first})")
try:  # for docs/benchmarks.md beside CuPy's and CUDA's: the libraries that compile and multiply
    import cupy
    handle = cupy.cuda.device.get_cublas_handle()
    print(f"versions NVRTC {'.'.join(map(str, cupy.cuda.nvrtc.getVersion()))}, cuBLAS "
          f"{cupy.cuda.cublas.getVersion(handle)}")
except Exception as e:  # informs only
    print(f"versions of NVRTC and cuBLAS: not read ({type(e).__name__}: {e})")
try:  # optional: bench compares with PyTorch only where it sees the GPU
    import torch
    print(f"preflight PyTorch on the GPU (bench's comparison): {torch.cuda.is_available()}")
except ImportError:
    print("preflight PyTorch on the GPU (bench's comparison): not installed")
raise SystemExit(1 if failed else 0)
EOF
  echo "GPUMLP_DATA_DIR=${GPUMLP_DATA_DIR:-<unset: the real-MNIST test and the h256 run will skip or fail>}"
  return $rc
}

steps() {  # ms per step of the generic and the fused step, same data, interleaved; and the host's
           # time to issue 10 steps into an empty queue: near the ms/step, the step is host-bound
  "$PY" - <<'EOF'
import time
import numpy as np
from gpumlp.backend import get_backend
from gpumlp.config import build_config
from gpumlp.fast_cuda import FusedStep
from gpumlp.model import Params, init_params
from gpumlp.optim import init_state
from gpumlp.step import generic_step

gpu = get_backend("cuda")
config = build_config("configs/h256.yaml")
rng = np.random.default_rng(0)
host = init_params((784, 256, 10), "he", rng)
X = gpu.asarray(rng.random((128, 784), dtype=np.float32))
y = gpu.asarray(rng.integers(0, 10, 128).astype(np.int32))
steps = {"generic": generic_step(config), "fused": FusedStep(config, gpu)}
times = {name: [] for name in steps}
issue = {name: [] for name in steps}
for repeat in range(5):
    for name, step in steps.items():
        params = Params(tuple(map(gpu.asarray, host.W)), tuple(map(gpu.asarray, host.b)))
        state = init_state(config.optim, params)
        for t in range(1, 21):  # warm-up: compiles, allocates
            step(params, state, X, y, 0.1, t)
        gpu.synchronize()
        start = time.perf_counter()
        for t in range(21, 31):
            step(params, state, X, y, 0.1, t)
        issue[name].append((time.perf_counter() - start) / 10 * 1e3)
        gpu.synchronize()
        start = time.perf_counter()
        for t in range(31, 531):
            step(params, state, X, y, 0.1, t)
        gpu.synchronize()
        times[name].append((time.perf_counter() - start) / 500 * 1e3)
for name, values in times.items():
    print(f"{name:8s} h256 batch 128: {np.median(values):.3f} ms/step (median of 5 x 500 steps), "
          f"an epoch of 469 steps ~{np.median(values) * 0.469:.3f} s; host issue "
          f"{np.median(issue[name]):.3f} ms/step")

# A probe, not the product: the fused step captured once as a CUDA graph (fixed lr and t) and
# replayed, to tell what a whole-step graph would save (docs/gpu.md). A failure is reported.
import ctypes


class DirectCublas:
    """The three calls gpu_blas.Blas makes of CuPy's cuBLAS wrapper, straight to libcublas:
    the wrapper refuses every call (its setStream first) while a stream is being captured."""

    def __init__(self, cublas):
        for name in dir(cublas):
            if name.startswith("CUBLAS_"):
                setattr(self, name, getattr(cublas, name))
        with open("/proc/self/maps") as maps:  # the libcublas CuPy loaded (the steps ran)
            path = next((line.split()[-1] for line in maps if "/libcublas.so" in line), None)
        if path is None:
            raise RuntimeError("libcublas is not loaded in this process")
        lib = ctypes.CDLL(path)
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.cublasSetStream_v2.argtypes = [p, p]
        lib.cublasSetPointerMode_v2.argtypes = [p, i]
        lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
        self.lib = lib

    def call(self, status):
        if status != 0:
            raise RuntimeError(f"cuBLAS status {status}")

    def setStream(self, handle, stream):
        self.call(self.lib.cublasSetStream_v2(handle, stream))

    def setPointerMode(self, handle, mode):
        self.call(self.lib.cublasSetPointerMode_v2(handle, mode))

    def gemmEx(self, *args):
        self.call(self.lib.cublasGemmEx(*args))


cp = gpu.xp
try:
    step = steps["fused"]
    step.blas.cublas = DirectCublas(step.blas.cublas)
    params = Params(tuple(map(gpu.asarray, host.W)), tuple(map(gpu.asarray, host.b)))
    state = init_state(config.optim, params)
    stream = cp.cuda.Stream(non_blocking=True)
    gpu.synchronize()  # the copies above, on the default stream, which this one does not wait on
    with stream:
        for _ in range(3):  # on the capturing stream first: cuBLAS workspace, pool blocks
            step(params, state, X, y, 0.1, 1)
        stream.synchronize()
        stream.begin_capture()
        try:
            step(params, state, X, y, 0.1, 1)
        except BaseException:  # one that failed while captured still ends the capture, and
            try:               # its error, not end_capture's, is the one reported
                stream.end_capture()
            except Exception:
                pass
            raise
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        replays = []
        for repeat in range(5):
            start = time.perf_counter()
            for _ in range(500):
                graph.launch(stream)
            stream.synchronize()
            replays.append((time.perf_counter() - start) / 500 * 1e3)
    print(f"graph    h256 batch 128: {np.median(replays):.3f} ms/step (the fused step replayed "
          f"as one CUDA graph, median of 5 x 500; a probe for docs/gpu.md)")
except Exception as e:  # the probe only informs: say why it could not run
    print(f"graph    probe failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
EOF
}

train_h256() {  # the run's metrics and summary, what there is of them, go into its log
  local run rc=0 file
  if [ -z "${GPUMLP_DATA_DIR:-}" ]; then
    echo "no MNIST: set GPUMLP_DATA_DIR or copy the four files into shared/data/mnist"
    return 1
  fi
  run="$(mktemp -d)/h256"
  "$PY" -m gpumlp train --device cuda --config configs/h256.yaml --out "$run" || rc=$?
  for file in metrics.jsonl summary.json; do
    echo "--- $file"
    cat "$run/$file" 2>/dev/null || echo "(none)"
  done
  return $rc
}

sanitize() {  # opt-in: a short cuda run under compute-sanitizer, memcheck then racecheck
  local tool run rc=0
  if ! [ -x "$SANITIZER" ]; then
    echo "compute-sanitizer not found at '$SANITIZER'; set SANITIZER to its path"
    return 1
  fi
  for tool in memcheck racecheck; do
    run="$(mktemp -d)/small"
    echo "--- $tool"
    "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" - "$run" <<'EOF' || rc=1
# Every fused kernel (the loader, dropout, two hidden layers, Adam, label smoothing, a shorter
# last batch, the loop's tally) in one short `gpumlp train`, each array its own cudaMalloc, so
# that memcheck sees a read or write one element past an array's end.
import sys

import cupy

from gpumlp.cli import main

cupy.cuda.set_allocator(None)
main(["train", "--device", "cuda", "--config", "configs/smoke.yaml", "--out", sys.argv[1], "-q",
      "--set", "model.hidden=[64, 32]", "--set", "model.dropout=0.2",
      "--set", "model.activation=gelu", "--set", "optim.name=adam", "--set", "optim.lr=0.001",
      "--set", "train.label_smoothing=0.1", "--set", "data.limit=1550",
      "--set", "data.val_size=0", "--set", "train.epochs=1"])
EOF
  done
  return $rc
}

SANITIZER="${SANITIZER:-$(command -v compute-sanitizer ||
                            echo /usr/local/cuda/bin/compute-sanitizer)}"
export SANITIZER
export -f info steps train_h256 sanitize  # so that `timeout bash -c NAME` runs them
wanted info && section info 60 info.log bash -c info  # 3 CUDA starts, 2 of PyTorch
if wanted tests; then
  PER_TEST=()  # with pytest-timeout, a test that hangs costs 45 s, not the section's 150
  # shellcheck disable=SC2206  # TESTS: split into words, the default's glob expanded
  TEST_ARGS=(${TESTS:-tests/test_gpu_*.py})  # only these: a missing onnx must not stop them
  "$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=45)
  # tests/conftest.py starts no test after this deadline: the run stops between two tests,
  # with its summary, rather than by the SIGINT at 150 s
  GPUMLP_TESTS_DEADLINE=$(($(date +%s) + 120)) section tests 150 pytest-gpu.log \
    "$PY" -m pytest -m gpu -v -rfEs --durations=10 -p no:cacheprovider \
    -o faulthandler_timeout=40 "${PER_TEST[@]}" "${TEST_ARGS[@]}"
  if [ "${STATUS[tests]}" != "TIMED OUT" ] &&
     grep -q "GPUMLP_TESTS_DEADLINE passed: stopped between two tests" "$OUT/pytest-gpu.log"; then
    STATUS[tests]="TIMED OUT (stopped between tests after 120s)"
  elif [ "${STATUS[tests]}" = ok ] && ! grep -qE "[0-9]+ passed" "$OUT/pytest-gpu.log"; then
    STATUS[tests]="failed: no test passed (all skipped: is the GPU visible?)"  # pytest says 0
  fi
fi
wanted steps && section steps 40 steps.log bash -c steps
BENCH_DATA=mnist  # the MNIST files when they came along, else random images of their shape
[ -n "${GPUMLP_DATA_DIR:-}" ] || BENCH_DATA=synthetic
wanted bench && section bench 90 bench.log \
  "$PY" -m gpumlp bench --device cuda --data "$BENCH_DATA" --hidden 256 --hidden 1024 \
  --batch 128 --batch 1024
wanted train && section train 60 train-h256.log bash -c train_h256
wanted sanitize && section sanitize 240 sanitize.log bash -c sanitize

if [ "$(kernels)" -gt "$START_KERNELS" ]; then  # for CUPY_CACHE_TAR in a rerun elsewhere
  tar -cf "$OUT/cupy-kernels.tar" -C "$CUPY_CACHE_DIR" . 2>/dev/null &&
    echo "kernel cache: $(kernels) kernels -> $OUT/cupy-kernels.tar (CUPY_CACHE_TAR for a rerun)"
fi
echo "=== summary ==="
for name in $SECTIONS; do
  printf '%-6s %s\n' "$name" "${STATUS[$name]}"
done
! wanted info || grep -E "^preflight .*FAILED" "$OUT/info.log"
! wanted tests || grep -E "[0-9]+ (passed|failed|skipped|errors?)" "$OUT/pytest-gpu.log" | tail -n 1
last_word() { grep -vE "^\([a-z]+ took [0-9]+s; CuPy compiled" "$@" | tail -n 1; }  # not ours
! wanted steps || grep -E "ms/step|probe failed" "$OUT/steps.log" || last_word "$OUT/steps.log"
! wanted bench || grep -E "^\||no comparison" "$OUT/bench.log" || last_word "$OUT/bench.log"
! wanted train || grep -E "^(Error|no MNIST|test_accuracy )" "$OUT/train-h256.log" ||
  sed '/^--- metrics.jsonl$/,$d' "$OUT/train-h256.log" | last_word  # the run's last word
! wanted sanitize || grep -E "ERROR SUMMARY|RACECHECK SUMMARY|not found" "$OUT/sanitize.log"
failed=0  # the exit status: 1 when any section did not end ok
for name in $SECTIONS; do
  [ "${STATUS[$name]}" = ok ] || failed=1
done
exit $failed
