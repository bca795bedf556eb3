"""What `gpumlp info` reports: versions, devices, NumPy's and SciPy's BLAS, the CPU count."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import numpy as np

from . import __version__
from . import backend
from .backend import (available_devices, cuda_version_numbers, cuda_versions, cupy_load_error,
                      cupy_load_fix, cupy_version, no_cupy, no_gpu_reason)


def blas_name(module=np) -> str:
    """The BLAS library `module` (NumPy, or SciPy, whose BLAS the CPU training step's products
    use) was built against, as it reports it."""
    try:
        config = module.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy without mode="dicts"
        return "unknown"


def cupy_absence() -> str:
    """Why there is no CuPy version: not installed, or installed but not loadable."""
    if cupy_load_error() is not None:
        fix = f"; {cupy_load_fix()}" if cupy_load_fix() else ""
        return f"installed but cannot be loaded ({cupy_load_error()}){fix}"
    return "not installed (pip install -e '.[cuda12]' or '.[cuda13]' in the gpumlp folder)"


def system_info() -> dict:
    """Each value as a program reads it (`info --json`): text, a number, a list of device
    strings, the CUDA versions as {"runtime", "driver"} ("none" for a driver CUDA reports
    absent), or None for what is missing, with why it is missing under "unavailable" (a key
    per None; and "gpu", why no GPU is listed, when CuPy is there)."""
    import scipy
    import yaml

    unavailable = {}
    cupy = cupy_version()
    if cupy is None:
        unavailable["cupy"] = cupy_absence()
    try:
        numbers = cuda_version_numbers()
    except Exception:  # a broken CUDA install: cuda_versions says what it raised
        numbers = None
        unavailable["cuda"] = cuda_versions()
    else:
        if numbers is None:
            unavailable["cuda"] = no_cupy()
    cpus = os.cpu_count()
    if cpus is None:
        unavailable["cpus"] = "unknown"
    devices = available_devices()
    if cupy is not None and devices == ["cpu"]:
        unavailable["gpu"] = no_gpu_reason(backend._import_cupy())
    return {
        "gpumlp": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "blas": blas_name(),
        "scipy": scipy.__version__,
        "scipy_blas": blas_name(scipy),
        "cupy": cupy,
        "cuda": None if numbers is None else dict(zip(("runtime", "driver"), numbers)),
        "click": importlib.metadata.version("click"),
        "pyyaml": yaml.__version__,
        "cpus": cpus,
        "devices": devices,
        "unavailable": unavailable,
    }


def info_lines(details: dict) -> list[str]:
    """`gpumlp info`'s lines, "name  value", for a person: a missing value's reason in its
    place ("- (no CuPy)" for CUDA without a CuPy to ask)."""
    lines = []
    for key, value in details.items():
        if key == "unavailable":
            continue
        if value is None:
            value = details["unavailable"][key]
            value = f"- ({value})" if key == "cuda" and value == no_cupy() else value
        elif key == "cuda":
            value = f"CUDA runtime {value['runtime']}, driver {value['driver']}"
        elif key == "devices":
            gpu = details["unavailable"].get("gpu")
            value = ", ".join(value) + (f" (no CUDA GPU: {gpu})" if gpu else "")
        lines.append(f"{key:<10} {value}")
    return lines
