"""The fused CUDA kernels on concurrent threads, under ThreadSanitizer and AddressSanitizer:
what the one-thread-at-a-time host build of tests/test_cuda_source.py cannot check without a
GPU.

The CUDA source's device branch (the one NVRTC compiles, not GPUMLP_HOST_EMULATION) is built
for the CPU with a small shim of CUDA's execution model: every thread of every block of a
launch is a thread of its own, all running at once; blockIdx, threadIdx, blockDim and gridDim
are what the kernel sees; `__syncthreads()` is a barrier of the block's threads. Built with
`-fsanitize=thread`, any two threads that touch the same element without a barrier between
them (a write and a read or a second write) are reported, whatever the scheduling was. Built
with `-fsanitize=address`, any read or write past the end of an array is reported: on a GPU it
would go unseen, into the padding of CuPy's allocations (rounded up to 512 bytes) or into the
next array.

This module's tests run a child Python with the sanitizer's runtime preloaded (it must be
loaded first),
which calls every test of tests/test_cuda_source.py that runs `fast_cuda.FusedStep` on the
host kernels (the `emulated` fixture), for each of its parameters, with these kernels instead:
the same comparisons against the generic step, now through the grid-stride loops as a GPU runs
them and softmax_xent's shared-memory reduction on its 256 threads. The elementwise kernels
are launched on at most GRID_CAP blocks of BLOCK_CAP threads (their loops take any grid), so
each thread strides over many elements. Three more tests break the source on purpose (a
missing barrier, a stride without gridDim, a loop one element past the end) and check that
this finds it.

Run by hand: `python tests/test_cuda_threads.py LIBRARY [NAME ...]` under
`LD_PRELOAD=$(g++ -print-file-name=libtsan.so)` (or libasan.so with ASAN_OPTIONS=detect_leaks=0),
with LIBRARY built by `build_threaded`.
"""

from __future__ import annotations

import inspect
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GRID_CAP, BLOCK_CAP = 3, 64   # the elementwise launches' blocks and threads per block, at most

SHIM = r"""
// CUDA's execution model on host threads: one std::thread per CUDA thread, every block at once.
#include <math.h>
#include <pthread.h>
#include <thread>
#include <vector>
#define __global__
#define __host__
#define __device__
#define __shared__ static  // one copy: right for softmax_xent, the one such kernel (one block)
struct Dim3 { unsigned int x, y, z; };
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;
static thread_local pthread_barrier_t* block_barrier;
static void __syncthreads() { pthread_barrier_wait(block_barrier); }

template <class Body>
static void run_grid(unsigned int grid, unsigned int block, Body body) {
  blockDim = Dim3{block, 1, 1};
  gridDim = Dim3{grid, 1, 1};
  std::vector<pthread_barrier_t> barriers(grid);
  for (auto& b : barriers) pthread_barrier_init(&b, nullptr, block);
  std::vector<std::thread> threads;
  for (unsigned int b = 0; b < grid; ++b)
    for (unsigned int t = 0; t < block; ++t)
      threads.emplace_back([&, b, t] {
        blockIdx = Dim3{b, 0, 0};
        threadIdx = Dim3{t, 0, 0};
        block_barrier = &barriers[b];
        body();
      });
  for (auto& thread : threads) thread.join();
  for (auto& b : barriers) pthread_barrier_destroy(&b);
}
"""


def launchers(source: str) -> str:
    """`launch_NAME(grid, block, params...)` for every KERNEL NAME(params...) of the source."""
    wrappers = []
    for name, params in re.findall(r"KERNEL\s+(\w+)\(([^)]*)\)", source):
        names = ", ".join(re.findall(r"(\w+)\s*(?:,|$)", params))
        wrappers.append(f'extern "C" void launch_{name}(unsigned int grid_, unsigned int block_, '
                        f"{params}) {{\n"
                        f"  run_grid(grid_, block_, [=] {{ {name}({names}); }});\n}}\n")
    return "".join(wrappers)


SANITIZERS = {  # -fsanitize=NAME: (GCC's runtime library, the child's options)
    "thread": ("libtsan.so", {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66 "
                                              "report_signal_unsafe=0"}),
    "address": ("libasan.so", {"ASAN_OPTIONS": "detect_leaks=0 exitcode=66"}),
}


def runtime(sanitizer: str) -> str | None:
    """The path of GCC's runtime of `sanitizer`, or None where there is no g++ or no runtime."""
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    found = subprocess.run([compiler, f"-print-file-name={SANITIZERS[sanitizer][0]}"],
                           capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


def build_threaded(source: str, folder: Path, sanitizer: str = "thread") -> Path:
    """The CUDA source's device branch with the shim, built with `-fsanitize=sanitizer`: its
    path."""
    path = folder / f"threaded_kernels_{sanitizer}.cpp"
    path.write_text(SHIM + source + launchers(source))
    library = path.with_suffix(".so")
    done = subprocess.run(["g++", "-x", "c++", "-std=c++17", "-O1", "-g", "-shared", "-fPIC",
                           "-pthread", f"-fsanitize={sanitizer}", "-ffp-contract=off", "-Wall",
                           "-Werror", str(path), "-o", str(library)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return library


# --- the child: test_cuda_source's emulated tests on these kernels -------------------------------

def emulated_cases() -> dict[str, tuple]:
    """name -> (test function, its arguments but `emulated`) for every test of
    test_cuda_source that takes the `emulated` fixture, once per parameter set."""
    import test_cuda_source as source_tests

    cases = {}
    for name, fn in vars(source_tests).items():
        if not name.startswith("test_") or "emulated" not in inspect.signature(fn).parameters:
            continue
        axes = []
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize":
                argnames, values = mark.args[0], mark.args[1]
                argnames = [a.strip() for a in argnames.split(",")] \
                    if isinstance(argnames, str) else list(argnames)
                rows = [v if len(argnames) > 1 else (v,) for v in values]
                axes.append([dict(zip(argnames, row)) for row in rows])
        for combo in itertools.product(*axes):
            kwargs = {k: v for part in combo for k, v in part.items()}
            label = "-".join(str(v) for v in kwargs.values())
            cases[f"{name}[{label}]" if label else name] = (fn, kwargs)
    return cases


def threaded_backends(library_path: str):
    """A function that gives a new Backend (as the `emulated` fixture does, one per test)
    whose RawModule runs the kernels of `library_path` on threads."""
    import ctypes

    import test_cuda_source as source_tests
    from gpumlp import fast_cuda
    from gpumlp.backend import Backend

    library = ctypes.CDLL(library_path)

    class ThreadedKernel(source_tests.HostKernel):
        def __init__(self, name: str):
            super().__init__(library, name)
            self.launch = getattr(library, f"launch_{name}")
            self.launch.restype = None
            self.launch.argtypes = [ctypes.c_uint, ctypes.c_uint, *self.function.argtypes]

        def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
            self.function = self.launch_on(grid, block)
            super().__call__(grid, block, args)            # its checks, then this launch

        def launch_on(self, grid: tuple, block: tuple):
            if self.name != "softmax_xent":   # any grid does: run a few small blocks
                grid, block = (min(grid[0], GRID_CAP),), (min(block[0], BLOCK_CAP),)
            return lambda *values: self.launch(grid[0], block[0], *values)

    class ThreadedModule(source_tests.HostModule):
        def get_function(self, name: str):
            return ThreadedKernel(name)

    assert fast_cuda.XENT_THREADS >= BLOCK_CAP
    return lambda: Backend(source_tests.fake_cupy(ThreadedModule), "cuda:0", "cuda:0 (threads)")


def child(library_path: str, wanted: list[str]) -> int:
    """Run the emulated cases (those whose name contains one of `wanted`, or all): one line
    each, 'ok NAME' or 'FAILED NAME: why'. Exit status 1 if any failed."""
    new_backend = threaded_backends(library_path)
    failed = 0
    for name, (fn, kwargs) in emulated_cases().items():
        if wanted and not any(w in name for w in wanted):
            continue
        try:
            fn(emulated=new_backend(), **kwargs)
            print(f"ok {name}", flush=True)
        except AssertionError as e:
            failed += 1
            print(f"FAILED {name}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                  flush=True)
    return 1 if failed else 0


# --- the tests ---------------------------------------------------------------------------------

def sanitized_env(sanitizer: str) -> dict:
    """The environment of a child Python with `sanitizer`'s runtime preloaded: every race is
    reported ('halt_on_error=0'; AddressSanitizer stops at its first report), and the exit
    status is 66 if there was one."""
    tests = Path(__file__).resolve().parent
    return {**os.environ, "LD_PRELOAD": runtime(sanitizer), "OPENBLAS_NUM_THREADS": "1",
            **SANITIZERS[sanitizer][1], "PYTHONPATH": os.pathsep.join(
                [str(tests), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run_child(library: Path, *wanted: str, sanitizer: str = "thread"
              ) -> subprocess.CompletedProcess:
    """This file as a child Python under `sanitizer`, running the cases named `wanted` (all
    when none is) on the kernels of `library`."""
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), str(library), *wanted],
                          capture_output=True, text=True, env=sanitized_env(sanitizer),
                          timeout=900)


def sanitizer_folder(sanitizer: str, tmp_path_factory) -> Path:
    """A folder for the builds, or a skip that says why `sanitizer` cannot run here."""
    name = SANITIZERS[sanitizer][0]
    if runtime(sanitizer) is None:
        pytest.skip(f"no g++ with the {sanitizer} sanitizer's runtime ({name}): the kernels "
                    "were not run on threads under it")
    started = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True,
                             env=sanitized_env(sanitizer), timeout=120)
    if started.returncode != 0:   # e.g. "FATAL: ThreadSanitizer: unexpected memory mapping"
        lines = started.stderr.strip().splitlines() or [f"exit {started.returncode}"]
        pytest.skip(f"{name} does not start here ({lines[0]}): the kernels were not run on "
                    "threads under it")
    return tmp_path_factory.mktemp(sanitizer)


@pytest.fixture(scope="module")
def tsan(tmp_path_factory) -> Path:
    return sanitizer_folder("thread", tmp_path_factory)


@pytest.fixture(scope="module")
def asan(tmp_path_factory) -> Path:
    return sanitizer_folder("address", tmp_path_factory)


def source() -> str:
    from gpumlp import fast_cuda

    return fast_cuda.cuda_source()


def test_kernels_on_concurrent_threads_match_generic_with_no_race(tsan):
    """Every emulated test of test_cuda_source, each parameter set, passes on these threads,
    and ThreadSanitizer reports no race."""
    done = run_child(build_threaded(source(), tsan))
    assert "ThreadSanitizer" not in done.stderr, done.stderr[-4000:]
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    ran = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert sorted(ran) == sorted(emulated_cases()) and len(ran) >= 20, done.stdout
    assert any("more_rows_than_threads" in name for name in ran)  # softmax_xent's rows loop


def test_a_missing_barrier_in_the_reduction_is_reported(tsan):
    """Without the __syncthreads() after each step of softmax_xent's tree, threads read
    partial sums their neighbours are still writing: ThreadSanitizer must say so."""
    text = source()
    loop = re.search(r"for \(int half = .*?\n  \}\n", text, re.S).group(0)
    assert loop.count("SYNC_THREADS();") == 1
    broken = text.replace(loop, loop.replace("SYNC_THREADS();", ""))
    folder = tsan / "no_barrier"
    folder.mkdir()
    done = run_child(build_threaded(broken, folder), "more_rows_than_threads")
    assert done.returncode == 66 and "WARNING: ThreadSanitizer: data race" in done.stderr, \
        done.stdout + done.stderr[-2000:]
    assert "softmax_xent" in done.stderr


def test_a_grid_stride_without_the_grid_is_caught(tsan):
    """A grid-stride loop that steps by blockDim only (forgetting gridDim) has every block
    redo the others' elements: the in-place update runs several times over, and two blocks
    write the same element."""
    text = source()
    stride = "i += (long long)blockDim.x * gridDim.x"
    assert text.count(stride) == 1
    folder = tsan / "no_grid"
    folder.mkdir()
    done = run_child(build_threaded(text.replace(stride, "i += (long long)blockDim.x"), folder),
                     "for_each_optimizer[momentum]")
    assert "FAILED test_fused_step_matches_generic_for_each_optimizer[momentum]" in done.stdout, \
        done.stdout + done.stderr[-2000:]
    assert "WARNING: ThreadSanitizer: data race" in done.stderr


def test_kernels_on_concurrent_threads_stay_inside_their_arrays(asan):
    """The same cases under AddressSanitizer: no kernel reads or writes outside its arrays
    (those it is given and those its address tables point to)."""
    done = run_child(build_threaded(source(), asan, "address"), sanitizer="address")
    assert "AddressSanitizer" not in done.stderr, done.stderr[-4000:]
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    ran = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert sorted(ran) == sorted(emulated_cases()), done.stdout


def test_a_loop_one_past_the_end_is_reported(asan):
    """A grid-stride loop that runs while i <= n writes one element past each array, which a
    GPU would put unseen into an allocation's padding: AddressSanitizer must say so."""
    text = source()
    bound = "i < (n); \\"
    assert text.count(bound) == 1
    broken = text.replace(bound, "i <= (n); \\")
    done = run_child(build_threaded(broken, asan, "address"), "for_each_optimizer[momentum]",
                     sanitizer="address")
    assert done.returncode == 66, done.stdout + done.stderr[-2000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in done.stderr


if __name__ == "__main__":
    sys.exit(child(sys.argv[1], sys.argv[2:]))
