"""Training speed: gpumlp epochs against PyTorch eager on the same model, interleaved.

One epoch is the real training loop (`train.train_epoch`, the step `make_step` picks) over
the first n MNIST training images, or over synthetic data of MNIST's shape (n uint8 images of
784 random pixels, random labels) where no MNIST files are at hand. The data matters to
gpumlp's CPU step, which leaves each batch's zero pixels out of its first products (about a
third of them on MNIST at batch 128; random images have none). PyTorch eager runs the same
net (nn.Linear, ReLU, nn.Linear, CrossEntropyLoss, SGD with momentum) on the same device and
data, with the same batch gathering from uint8, alternating with gpumlp epoch by epoch, so
that both see the same machine load.

FLOPs are those the step executes: forward 2 m sum(fan_in fan_out), backward the same for the
dW_k products plus 2 m fan_in fan_out for each dZ_k below the last layer (dX is never computed).
For 784-256-10 that is 49.1 GFLOP an epoch; the usual "backward = 2 x forward" count would say
73.2. A step that skips pixels counts the ones it multiplies (`FastStep.pixels_used`), and its
row gets the model's count less what it skipped. The sgemm rate the results are compared with
is the best of one measured at the start of the run and one at its end.

Nothing here prints: results come back as records, and `on_row` hears each one as it is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .backend import Backend
from .config import build_config
from .data import DeviceData, DeviceSplit, device_split
from .errors import ConfigError, error_summary
from .mnist import C, D
from .step import make_step, prepare_state
from .train import Position, new_state, train_epoch

LR, MOMENTUM = 0.01, 0.9   # constant, small enough that random labels never diverge


class BenchError(ConfigError):
    """The benchmark cannot run as asked."""


@dataclass(frozen=True)
class BenchSpec:
    hidden: tuple[int, ...]       # one hidden width per row of the table (one hidden layer)
    batch: tuple[int, ...]        # batch sizes
    epochs: int = 1               # epochs per timing
    repeats: int = 5              # interleaved timings of each implementation
    samples: int = 60000          # examples per epoch: the first n of the split, or synthetic
    torch: bool | None = None     # also time PyTorch eager: when it imports (None), always
                                  # (True: a BenchError without it), never (False)
    threads: int | None = None    # BLAS (and torch) threads; None leaves them as they are
    seed: int = 0


@dataclass
class Row:
    impl: str                     # "gpumlp" or "torch"
    hidden: int
    batch: int
    seconds: list[float] = field(default_factory=list)  # per epoch, one per repeat
    gflop: float = 0.0            # GFLOP executed per epoch (the mean over the timed epochs)
    samples: int = 0

    @property
    def epoch_s(self) -> float:
        """The median seconds per epoch over the repeats."""
        return statistics.median(self.seconds)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.epoch_s

    @property
    def gflops(self) -> float:
        return self.gflop / self.epoch_s


def paired_ratio(a: Row, b: Row) -> float:
    """The median over the rounds of a's epoch over b's epoch in the same round.

    The two epochs of a round run back to back (bench_pair), so each ratio sees one state of a
    shared machine; the median of these ratios moves less with the machine's load than the
    ratio of the two medians, which may come from different minutes.
    """
    return statistics.median(x / y for x, y in zip(a.seconds, b.seconds))


# ---- BLAS threads and the sgemm reference ----------------------------------------------------

# The symbols of the OpenBLAS builds NumPy and SciPy bundle: plain, 64-bit-integer ("64_", as
# NumPy 1.22 to 1.26 ship it) and NumPy 2's scipy_openblas, in both widths.
SET_NAMES = ("openblas_set_num_threads", "openblas_set_num_threads64_",
             "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads")
GET_NAMES = ("openblas_get_num_threads", "openblas_get_num_threads64_",
             "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads")
CORE_NAMES = ("openblas_get_corename", "openblas_get_corename64_",
              "scipy_openblas_get_corename64_", "scipy_openblas_get_corename")


def loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process (NumPy's, SciPy's); Linux only."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/") and ".so" in p)


def _blas_symbol(lib: ctypes.CDLL, names: tuple[str, ...]) -> Any:
    return next((getattr(lib, n) for n in names if hasattr(lib, n)), None)


def blas_threads(n: int | None = None) -> list[str]:
    """Set (when n is given) the threads of every loaded OpenBLAS; "library threads (core)" each."""
    from scipy.linalg import blas  # noqa: F401  (loads SciPy's OpenBLAS, which the step uses)

    described, set_any = [], False
    for path in loaded_openblas():
        lib = ctypes.CDLL(path)
        setter, getter = _blas_symbol(lib, SET_NAMES), _blas_symbol(lib, GET_NAMES)
        core = _blas_symbol(lib, CORE_NAMES)
        name = os.path.basename(path).split("-")[0]              # e.g. libscipy_openblas64_
        if n is not None and setter is None:
            raise BenchError(f"--threads {n}: {name} has no call to set its threads; drop "
                             "--threads and set OPENBLAS_NUM_THREADS before gpumlp starts")
        if n is not None:
            setter(ctypes.c_int(n))
            set_any = True
            if getter is not None and int(getter()) != n:        # capped at its build's maximum
                raise BenchError(f"--threads {n}: {name} runs at most {int(getter())} threads; "
                                 f"give --threads {int(getter())} or fewer")
        if getter is not None and core is not None:
            core.restype = ctypes.c_char_p
            described.append(f"{name} {int(getter())} ({core().decode().strip()})")
    if n is not None and not set_any:  # an MKL or Accelerate NumPy, or not Linux
        raise BenchError(f"--threads {n}: no OpenBLAS found in this process to set; drop "
                         "--threads and set the BLAS's own thread variable before gpumlp starts")
    return described


def sgemm_rate(backend: Backend, size: int = 2048, tries: int = 5) -> float:
    """The best GFLOP/s of a size^3 float32 product: SciPy's sgemm on the CPU (the BLAS the
    fast step calls), xp.matmul on a GPU."""
    xp = backend.xp
    rng = np.random.default_rng(0)
    a, b = (backend.asarray(rng.random((size, size), dtype=np.float32)) for _ in range(2))
    out = xp.empty((size, size), dtype=xp.float32)
    product = lambda: xp.matmul(a, b, out=out)  # noqa: E731
    if not backend.is_gpu:
        from scipy.linalg import blas

        from .fast_cpu import gemm_into
        product = lambda: gemm_into(blas.sgemm, 1.0, a, b, 0.0, out)  # noqa: E731
    best = float("inf")
    for _ in range(tries + 1):  # the first is a warm-up
        backend.synchronize()
        start = time.perf_counter()
        product()
        backend.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def executed_gflop(widths: tuple[int, ...], n: int) -> float:
    """GFLOP of one epoch of n examples: forward, dW_k for every layer, dZ_k below the last."""
    products = [fan_in * fan_out for fan_in, fan_out in zip(widths[:-1], widths[1:])]
    return 2 * n * (2 * sum(products) + sum(products[1:])) / 1e9


def skipped_gflop(widths: tuple[int, ...], n: int, pixels_used: int) -> float:
    """GFLOP of `executed_gflop` left out by a step that multiplied only `pixels_used` of the
    n d pixels of n examples (the fast CPU step skips zero pixels): 4 h_1 per pixel, the
    forward product and the dW_1 product."""
    return 4 * widths[1] * (n * widths[0] - pixels_used) / 1e9


# ---- the two implementations, one epoch each ----------------------------------------------------

def synthetic_split(backend: Backend, n: int, seed: int) -> DeviceSplit:
    """n random uint8 images of 784 pixels and random labels 0..9, on the device."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, D), dtype=np.uint8)
    labels = rng.integers(0, C, size=n).astype(np.int32)
    return DeviceSplit(backend.asarray(images), backend.asarray(labels))


def first_of(images: np.ndarray, labels: np.ndarray, n: int, backend: Backend) -> DeviceSplit:
    """The first n (images, labels) of a host split (say MNIST's training set), on the device."""
    if n > len(labels):
        raise BenchError(f"--samples {n} is more than the {len(labels)} images of the data; "
                         f"lower it to {len(labels)} or fewer")
    return device_split(images[:n], labels[:n], backend)


def gpumlp_runner(backend: Backend, split: DeviceSplit, hidden: int, batch: int,
                  seed: int) -> Callable[[], None]:
    """A function that trains one more epoch with gpumlp's own loop and step."""
    config = build_config(None, [f"model.hidden={hidden}", f"train.batch_size={batch}",
                                 f"train.seed={seed}", "optim.name=sgd", f"optim.lr={LR}",
                                 f"optim.momentum={MOMENTUM}", "optim.nesterov=false"])
    state = new_state(config, backend)
    data = DeviceData(split, None, split)
    step_fn = make_step(config, backend)
    prepare_state(step_fn, state, split)

    widths, n = (D, hidden, C), len(split)
    done = {"gflop": 0.0}                              # GFLOP executed in all epochs so far

    def epoch() -> None:
        used = getattr(step_fn, "pixels_used", None)
        train_epoch(state, data, config, backend, step_fn, lambda kind, info: None,
                    lambda: None, lambda: False)
        state.pos = Position(epoch=state.pos.epoch + 1, step=state.pos.step)
        done["gflop"] += executed_gflop(widths, n)
        if used is not None:
            done["gflop"] -= skipped_gflop(widths, n, step_fn.pixels_used - used)

    epoch.kind = getattr(step_fn, "kind", "generic")  # which step make_step took
    epoch.gflop_done = lambda: done["gflop"]
    return epoch


@contextlib.contextmanager
def torch_memory():
    """PyTorch's out of memory (a RuntimeError, on the CPU or a GPU) as the MemoryError that
    `gpumlp bench` says in one line, not a traceback."""
    try:
        yield
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise MemoryError(f"PyTorch: {str(e).strip().splitlines()[0]}") from None
        raise


def torch_runner(torch: Any, device: str, split: DeviceSplit, hidden: int, batch: int,
                 seed: int) -> Callable[[], None]:
    """A function that trains one more epoch of the same net in PyTorch eager."""
    with torch_memory():  # its copy of the data and its net, as its epochs
        return make_torch_runner(torch, device, split, hidden, batch, seed)


def make_torch_runner(torch: Any, device: str, split: DeviceSplit, hidden: int, batch: int,
                      seed: int) -> Callable[[], None]:
    from .backend import to_host

    torch.manual_seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda":  # full float32 products, as gpumlp's (train.tf32: false), whatever
        torch.set_float32_matmul_precision("highest")  # TORCH_ALLOW_TF32_CUBLAS_OVERRIDE says
    # (n, d) uint8; torch.from_numpy wants it writable: copied only if read-only (only read)
    images = torch.from_numpy(np.require(to_host(split.images), requirements="W")).to(dev)
    labels = torch.from_numpy(to_host(split.labels).astype(np.int64)).to(dev)
    net = torch.nn.Sequential(torch.nn.Linear(D, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, C)).to(dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = images.shape[0]

    def epoch() -> None:
        with torch_memory():
            train_epoch()

    def train_epoch() -> None:
        perm = torch.randperm(n, device=dev)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            X = images.index_select(0, idx).to(torch.float32).mul_(1.0 / 255.0)
            y = labels.index_select(0, idx)
            A2 = net(X)
            loss = loss_fn(A2, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * idx.shape[0]
            correct += (A2.detach().argmax(1) == y).sum()
        sync()

    epoch.net = net  # the model it trains, for the tests
    return epoch


def import_torch(device: str) -> tuple[Any, str | None]:
    """(torch, None), or (None, why it is left out)."""
    try:
        import torch
    except Exception as e:  # not installed, or a broken install (a missing shared library)
        if isinstance(e, ModuleNotFoundError) and e.name in ("torch", None):
            return None, "PyTorch is not installed (pip install torch)"
        return None, f"PyTorch is installed but cannot be loaded ({error_summary(e)})"
    if device != "cpu":
        with warnings.catch_warnings(record=True) as said:  # a CUDA build that cannot start
            warnings.simplefilter("always")                 # warns (the driver, say): 3 lines
            usable = torch.cuda.is_available()
        if not usable and getattr(torch.version, "cuda", None) is None:
            return None, f"this PyTorch build ({torch.__version__}) has no CUDA"
        if not usable:
            why = next((first_sentence(str(w.message)) for w in said), "no GPU visible")
            return None, (f"PyTorch {torch.__version__} (built for CUDA {torch.version.cuda}) "
                          f"cannot use the GPU here ({why})")
    return torch, None


def first_sentence(text: str) -> str:
    """"CUDA initialization: The NVIDIA driver on your system is too old (found version 12080)"
    of PyTorch's warning, without its advice, URLs and "(Triggered internally at ...)"; where
    it carries CUDA's "Error N: ..." (cudaGetDeviceCount's 802, 803, 804), that error."""
    text = text.split(" (Triggered internally")[0].strip()
    code = re.search(r"Error \d+: [^(\n]*[^(\s.]", text)
    if code:
        before = text[:code.start()]
        return f"{before.split(':')[0]}: {code.group(0)}" if ":" in before else code.group(0)
    line = text.splitlines()[0] if text else ""
    return re.split(r"(?<!e\.g)(?<!i\.e)\. ", line)[0].rstrip(".")


def torch_for(spec: BenchSpec, backend: Backend) -> tuple[Any, str | None]:
    """import_torch's answer, its reason said as the table's header says it; a BenchError
    where `spec.torch` asks for PyTorch (--torch) and it cannot run here."""
    torch, why_not = import_torch(backend.device)
    if torch is None and spec.torch:
        raise BenchError(f"--torch: {why_not}; install a PyTorch that runs on "
                         f"{backend.device}, or drop --torch (or pass --no-torch)")
    return torch, None if torch is not None else f"{why_not} - no comparison"


# ---- the run ------------------------------------------------------------------------------

SETTLE_WINDOW = 0.02   # s: settle() looks again after this long
SETTLE_MAX = 1.0       # s: and waits at most this long


def runnable_threads() -> int | None:
    """How many of this process's other threads are running or waiting for a core (state R in
    Linux's /proc/self/task), whether or not the scheduler gives them one; None without /proc."""
    me = threading.get_native_id()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    busy = 0
    for tid in tasks:
        if tid == str(me):
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread has ended
            continue
        busy += stat.rpartition(")")[2].split()[:1] == ["R"]
    return busy


def settle(max_wait: float = SETTLE_MAX) -> None:
    """Wait until no other thread of this process runs: after an epoch, OpenBLAS's threads spin
    for about 0.1 s (OpenMP's for 0.01 s), and on a 2-core machine the other side's epoch
    timed next lost a core to them for that long (PyTorch's ratio was 10-15% too slow). A
    spinning thread is runnable however loaded the machine is; without /proc, the process's
    CPU time over a window is the sign (which a busy machine can hide)."""
    deadline = time.perf_counter() + max_wait
    while time.perf_counter() < deadline:
        cpu = time.process_time()                 # every thread of the process
        time.sleep(SETTLE_WINDOW)
        runnable = runnable_threads()
        if runnable == 0 or (runnable is None
                             and time.process_time() - cpu < 0.1 * SETTLE_WINDOW):
            return


def time_epochs(epoch: Callable[[], None], epochs: int, backend: Backend) -> float:
    """Seconds per epoch of `epochs` epochs in a row, once the process is idle (`settle`)."""
    backend.synchronize()
    settle()
    start = time.perf_counter()
    for _ in range(epochs):
        epoch()
    backend.synchronize()
    return (time.perf_counter() - start) / epochs


def bench_pair(runners: dict[str, Callable], spec: BenchSpec, backend: Backend,
               rows: dict[str, Row]) -> None:
    """One warm-up epoch each, then `repeats` rounds alternating the order (A B, B A, ...)."""
    for run in runners.values():
        run()
    order = list(runners)
    before = {impl: done() for impl, done in gflop_counters(runners).items()}
    for r in range(spec.repeats):
        for impl in (order if r % 2 == 0 else order[::-1]):
            rows[impl].seconds.append(time_epochs(runners[impl], spec.epochs, backend))
    for impl, done in gflop_counters(runners).items():                 # what the step executed
        rows[impl].gflop = (done() - before[impl]) / (spec.repeats * spec.epochs)


def gflop_counters(runners: dict[str, Callable]) -> dict[str, Callable[[], float]]:
    """impl -> its runner's count of the GFLOP executed so far, for runners that keep one."""
    return {impl: run.gflop_done for impl, run in runners.items() if hasattr(run, "gflop_done")}


def check_sizes(spec: BenchSpec) -> None:
    """A BenchError for a --samples below the largest --batch (before any data is read)."""
    if spec.samples < max(spec.batch):
        raise BenchError(f"--samples {spec.samples} is smaller than the largest --batch "
                         f"{max(spec.batch)}; raise it")


def run_bench(spec: BenchSpec, backend: Backend, split: DeviceSplit | None = None,
              on_row: Callable[[Row], None] = lambda row: None) -> dict:
    """Time every (hidden, batch) of `spec` on `split` (spec.samples examples; None: synthetic
    data); returns the sgemm rate (the best of the start's and the end's), the rows and
    notes."""
    check_sizes(spec)
    threads = blas_threads(spec.threads) if not backend.is_gpu else []
    torch, why_not = (None, "--no-torch") if spec.torch is False else torch_for(spec, backend)
    if torch is not None and spec.threads is not None:
        torch.set_num_threads(spec.threads)
    if backend.is_gpu:  # the sgemm reference in full float32 too (CUPY_TF32 would make it TF32's)
        from .backend import enable_tf32
        enable_tf32(backend, False)
    if split is None:
        split = synthetic_split(backend, spec.samples, spec.seed)
    if len(split) != spec.samples:
        raise BenchError(f"the data has {len(split)} examples but --samples is {spec.samples}")
    result = {"sgemm_gflops": sgemm_rate(backend), "rows": [], "blas_threads": threads,
              "torch": None if torch is None else torch.__version__, "torch_note": why_not,
              "torch_threads": None if torch is None else torch.get_num_threads()}
    try:
        time_sizes(spec, backend, split, torch, result, on_row)
        # again at the end, the best of both: a shared machine may have been in a slow phase
        # at the start, and a share of the reference above 100% would mean nothing
        result["sgemm_gflops"] = max(result["sgemm_gflops"], sgemm_rate(backend))
    except KeyboardInterrupt as e:  # the rows done so far go with it (`gpumlp bench` prints them)
        result["sgemm_when"] = "at the start; stopped before the end"
        e.partial = result
        raise
    return result


def time_sizes(spec: BenchSpec, backend: Backend, split: DeviceSplit, torch: Any, result: dict,
               on_row: Callable[[Row], None]) -> None:
    """Time each (hidden, batch) of `spec`, its rows added to result["rows"] as they come."""
    for hidden in spec.hidden:
        for batch in spec.batch:
            runners = None  # the last pair's memory given back before the next is made
            runners = {"gpumlp": gpumlp_runner(backend, split, hidden, batch, spec.seed)}
            result["gpumlp_step"] = runners["gpumlp"].kind
            if torch is not None:
                runners["torch"] = torch_runner(torch, backend.device, split, hidden, batch,
                                                spec.seed)
            gflop = executed_gflop((D, hidden, C), spec.samples)
            rows = {impl: Row(impl, hidden, batch, gflop=gflop, samples=spec.samples)
                    for impl in runners}
            bench_pair(runners, spec, backend, rows)
            for row in rows.values():
                result["rows"].append(row)
                on_row(row)
