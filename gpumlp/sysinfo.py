"""What `gpumlp info` reports: versions, devices, BLAS, threads."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import numpy as np

from . import __version__
from .backend import available_devices, cuda_versions, cupy_load_error, cupy_version


def blas_name() -> str:
    """The BLAS library NumPy was built against, as NumPy reports it."""
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy without mode="dicts"
        return "unknown"


def cupy_entry() -> str:
    """CuPy's version, or why there is none: not installed, or installed but not loadable."""
    version = cupy_version()
    if version is not None:
        return version
    if cupy_load_error() is not None:
        return f"installed but cannot be loaded ({cupy_load_error()})"
    return "not installed (pip install -e '.[cuda12]' or '.[cuda13]' in the gpumlp folder)"


def system_info() -> dict:
    import yaml

    return {
        "gpumlp": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "blas": blas_name(),
        "cupy": cupy_entry(),
        "cuda": cuda_versions(),
        "click": importlib.metadata.version("click"),
        "pyyaml": yaml.__version__,
        "cpus": os.cpu_count(),
        "devices": ", ".join(available_devices()),
    }
