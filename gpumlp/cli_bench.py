"""`gpumlp bench`: seconds per epoch, samples/s, GFLOP/s and the ratio to PyTorch eager.

The command gathers its options, makes one call into `gpumlp.bench`, and prints a Markdown
table (ready for docs/benchmarks.md) and the command that reproduces it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform

import click

from .cli_common import (OneLineError, device_option, domain_errors, load_mnist_for,
                         train_data_dir_option)
from .config import MAX_WIDTH

MAX_SYNTHETIC = 10_000_000   # --samples: 7.8 GB of synthetic uint8 images (and as much
                             # again for the fast CPU step's copy in its pixel order)
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "GOTO_NUM_THREADS",  # change the timings: said when set
            # and on a GPU: TF32 for one side or both, launches made synchronous, no caching
            "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE", "CUPY_TF32",
            "CUDA_LAUNCH_BLOCKING", "PYTORCH_NO_CUDA_MEMORY_CACHING")
MNIST_TRAIN = 60_000         # --samples with --data mnist: MNIST's training images
MAX_THREADS = 4096           # --threads: past any BLAS build's maximum (and C int's range)
CPU_BATCHES = (64, 128, 256, 1024)
GPU_BATCHES = (128, 1024)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reproduce_command(device: str, hidden, batch, epochs, repeats, samples, torch, threads,
                      data: str = "mnist") -> str:
    parts = ["gpumlp bench", f"--device {device}", f"--data {data}"]
    parts += [f"--hidden {h}" for h in hidden] + [f"--batch {m}" for m in batch]
    parts += [f"--epochs {epochs}", f"--repeats {repeats}", f"--samples {samples}",
              "--torch" if torch else "--no-torch"]
    if threads is not None:
        parts.append(f"--threads {threads}")
    return " ".join(parts)


def data_line(data: str, samples: int) -> str:
    if data == "mnist":
        return f"MNIST, the first {samples} training images"
    return f"synthetic uint8 {samples}x784 with random labels (MNIST's shape, no zero pixels)"


def header_lines(backend, result: dict, spec, data: str = "mnist") -> list[str]:
    import numpy
    import scipy

    from . import __version__
    from .backend import cuda_versions
    from .bench import LR, MOMENTUM

    torch = result["torch"] or f"- ({result['torch_note']})"
    epochs_timed = f"{spec.epochs} epoch" + ("" if spec.epochs == 1 else "s")

    def timed(how: str) -> str:
        return (f"one timing of {epochs_timed}" if spec.repeats == 1 else
                f"median of {spec.repeats} {how}timings of {epochs_timed}")

    ratios = ("the round's ratio" if spec.repeats == 1 else
              f"median of the {spec.repeats} rounds' ratios")
    threads = ", ".join(result["blas_threads"]) or "-"
    cupy = (f"cupy {backend.xp.__version__} ({cuda_versions(backend.xp)}), " if backend.is_gpu
            else "")
    return [
        f"# gpumlp bench, {datetime.date.today().isoformat()}",
        f"device    {backend.description}; CPU {cpu_model()}, {os.cpu_count()} cores",
        f"versions  gpumlp {__version__}, python {platform.python_version()}, numpy "
        f"{numpy.__version__}, scipy {scipy.__version__}, {cupy}torch {torch}",
        f"threads   {threads}; torch {result['torch_threads'] or '-'}; "
        f"gpumlp step: {result.get('gpumlp_step', '-')}",
        *([f"env       {' '.join(f'{k}={os.environ[k]}' for k in BLAS_ENV if k in os.environ)}"
           " (set before gpumlp started: they change the BLAS's or the GPU's speed; the"
           " bench keeps TF32 off on both sides whatever they say)"]
          if any(k in os.environ for k in BLAS_ENV) else []),
        f"sgemm     {result['sgemm_gflops']:.1f} GFLOP/s (best 2048^3 float32 product, measured "
        f"{result.get('sgemm_when', 'at the start and at the end')})",
        f"data      {data_line(data, spec.samples)}; fp32; SGD momentum {MOMENTUM}, lr {LR}; "
        + (f"{timed('interleaved ')}; "
           f"gpumlp/torch: {ratios} of gpumlp's epoch to torch's (below 1: gpumlp is faster)"
           if result["torch"] else
           f"{timed('')} (no torch to compare)"),
        "GFLOP/s   the products each side executes (gpumlp's CPU step leaves zero pixels out of "
        "its first layer's), over s/epoch",
    ]


def seconds(value: float) -> str:
    """Seconds to the millisecond, and to 3 significant digits below 0.01 s (a small
    --samples showed 0.000)."""
    return f"{value:.3f}" if value >= 0.01 else f"{value:.3g}"


def table_lines(result: dict) -> list[str]:
    from .bench import paired_ratio

    lines = ["| h | batch | impl | s/epoch | samples/s | GFLOP/s | % of sgemm | gpumlp/torch |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    torch_rows = {(r.hidden, r.batch): r for r in result["rows"] if r.impl == "torch"}
    for r in result["rows"]:
        ratio = "-"
        if r.impl == "gpumlp" and (r.hidden, r.batch) in torch_rows:
            ratio = f"{paired_ratio(r, torch_rows[(r.hidden, r.batch)]):.3f}"  # 1/3: 0.333
        share = 100 * r.gflops / result["sgemm_gflops"]
        lines.append(f"| {r.hidden} | {r.batch} | {r.impl} | {seconds(r.epoch_s)} | "
                     f"{r.samples_per_s:,.0f} | {r.gflops:.1f} | {share:.0f}% | {ratio} |")
    return lines


def check_data_options(data: str, data_dir: str | None, samples: int) -> None:
    """Refuse, before any data is read or fetched, more samples than MNIST has and a
    --data-dir on the command line that --data synthetic would ignore."""
    ctx = click.get_current_context()
    if data == "synthetic" and data_dir and (ctx.get_parameter_source("data_dir") ==
                                             click.core.ParameterSource.COMMANDLINE):
        raise OneLineError("--data-dir is read with --data mnist only; drop it, or drop "
                           "--data synthetic", exit_code=2)
    if data == "mnist" and samples > MNIST_TRAIN:
        raise OneLineError(f"--samples {samples}: MNIST has {MNIST_TRAIN} training images; give "
                           f"at most {MNIST_TRAIN}, or --data synthetic for more", exit_code=2)


@click.command()
@device_option
@click.option("--hidden", multiple=True, type=click.IntRange(1, MAX_WIDTH),
              help="Hidden width; repeatable. [default: 256 and 1024]")
@click.option("--batch", multiple=True, type=click.IntRange(min=1),
              help="Batch size; repeatable. [default: 64 128 256 1024 on the CPU, "
                   "128 1024 on a GPU]")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Epochs in each timing.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timings of each implementation, interleaved; the median is reported.")
@click.option("--data", "data", type=click.Choice(["mnist", "synthetic"]), default="mnist",
              show_default=True,
              help="Train on MNIST (from --data-dir or the cache, fetched on first use) or on "
                   "random images of MNIST's shape.")
@train_data_dir_option
@click.option("--samples", default=MNIST_TRAIN, show_default=True,
              type=click.IntRange(1, MAX_SYNTHETIC),
              help="Examples per epoch: the first N MNIST training images (at most 60000), "
                   "or N synthetic ones (at most 10^7).")
@click.option("--torch/--no-torch", "with_torch", default=None,
              help="Also time PyTorch eager on the same net. Default: when PyTorch is installed "
                   "(and sees the device); --torch: an error without it; --no-torch: never.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="BLAS and PyTorch threads (default: leave them as they are).")
@domain_errors
def bench(device, hidden, batch, epochs, repeats, data, data_dir, samples, with_torch, threads):
    """Time training epochs, against PyTorch eager in the same run.

    Prints seconds per epoch, samples per second, achieved GFLOP/s and their share of an
    sgemm rate measured at the start and the end, and the ratio gpumlp/PyTorch, as a Markdown table,
    then the command that reproduces it. Epochs run on MNIST's training images (or, with
    --data synthetic, on random images of its shape, which have no zero pixels to skip).

    \b
    Example:
      gpumlp bench --device cpu --hidden 256 --batch 128 --threads 2
    """
    from .backend import get_backend
    from .bench import BenchSpec, check_sizes, first_of, run_bench, torch_for

    check_data_options(data, data_dir, samples)
    backend = get_backend(device)
    hidden = tuple(dict.fromkeys(hidden)) or (256, 1024)   # each size once, in order given
    batch = tuple(dict.fromkeys(batch)) or (GPU_BATCHES if backend.is_gpu else CPU_BATCHES)
    spec = BenchSpec(hidden=hidden, batch=batch, epochs=epochs, repeats=repeats,
                     samples=samples, torch=with_torch, threads=threads)
    check_sizes(spec)  # before the data is read
    if with_torch:  # before the data is read: --torch where PyTorch cannot run is refused
        torch_for(spec, backend)
    split = None
    if data == "mnist":
        train = load_mnist_for(data_dir, split="train")
        split = first_of(train.images, train.labels, samples, backend)
    try:
        result = run_bench(spec, backend, split, on_row=lambda row: click.echo(
            f"  {row.impl:<6} h={row.hidden} batch={row.batch}: {seconds(row.epoch_s)} s/epoch",
            err=True))
    except KeyboardInterrupt as e:  # Ctrl-C: the sizes measured so far, then "interrupted"
        partial = getattr(e, "partial", None)
        if partial and partial["rows"]:
            with contextlib.suppress(OSError):
                for line in (header_lines(backend, partial, spec, data) + [""]
                             + table_lines(partial) + ["", "(interrupted: the sizes measured "
                                                       "before it was stopped)"]):
                    click.echo(line)
        raise
    for line in header_lines(backend, result, spec, data) + [""] + table_lines(result):
        click.echo(line)
    click.echo("")
    click.echo("reproduce: " + reproduce_command(backend.device, hidden, batch, epochs, repeats,
                                                 samples, result["torch"] is not None,
                                                 threads, data))
