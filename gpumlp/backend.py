"""The device: the only module that imports cupy.

`get_backend(device)` is called once, at the top of a command, and returns a `Backend`
whose `xp` (numpy or cupy) every function below it uses. The math never asks which
module it has; it only calls `xp`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .errors import DeviceError, error_summary

CUDA_HINT = ("install CuPy with pip install -e '.[cuda12]' (or '.[cuda13]') in the gpumlp folder, "
             "or use --device cpu")


@dataclass(frozen=True)
class Backend:
    xp: ModuleType      # numpy or cupy
    device: str         # "cpu" or "cuda:N"
    description: str    # human-readable, e.g. "cuda:0 (NVIDIA H200)"

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"

    def asarray(self, host_array: np.ndarray) -> Any:
        """Copy a host array onto this device (a no-op on the CPU)."""
        return self.xp.asarray(host_array)

    def synchronize(self) -> None:
        """Wait for queued device work; timing a GPU needs it."""
        if self.is_gpu:
            self.xp.cuda.Device().synchronize()


def to_host(array: Any) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array; used only at the edges (saving, printing)."""
    get = getattr(array, "get", None)
    return get() if callable(get) else np.asarray(array)


CUPY_IMPORT: list[str] = []  # why the last `import cupy` failed, when CuPy is there but broken
DRIVER_FIX = "check that the NVIDIA driver supports CuPy's CUDA version (nvidia-smi, gpumlp info)"


def _import_cupy() -> ModuleType | None:
    CUPY_IMPORT.clear()
    try:
        import cupy  # the project's only cupy import
    except ModuleNotFoundError as e:
        if e.name not in ("cupy", None):  # CuPy is there; something it imports is not
            CUPY_IMPORT.extend((error_summary(e), missing_module_fix(e.name)))
        return None
    except Exception as e:  # a broken CUDA install raising at import
        cause = original_error(e)  # CuPy 13 re-raises it under a banner ("Failed to import")
        CUPY_IMPORT.append(error_summary(cause))
        CUPY_IMPORT.append(lacking_fix(cause) or import_fix(cause))
        return None
    return cupy


def original_error(e: BaseException) -> BaseException:
    """The error `e` was raised from (`raise ... from`), and that one's, to the first (a
    chain that loops ends where it would come round)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


def lacking_fix(cause: BaseException) -> str | None:
    """missing_module_fix for a ModuleNotFoundError that names the module; None for any other."""
    if isinstance(cause, ModuleNotFoundError) and cause.name:
        return missing_module_fix(cause.name)
    return None


def missing_module_fix(name: str) -> str:
    """What to do when `import cupy` lacks module `name`: one of CuPy's own (a broken
    install), or a dependency (fastrlock, say)."""
    top = name.split(".")[0]
    if top == "cupy" or top.startswith("cupy_"):
        return ("its install is incomplete: reinstall it (pip install --force-reinstall "
                "cupy-cuda12x, or cupy-cuda13x: the one you have)")
    return f"install the module it lacks ({top}), or reinstall CuPy with its dependencies"


def import_fix(error: Exception) -> str:
    """What to do about `import cupy` raising `error`: a folder it could not make or reach (CuPy
    14 makes its kernel cache, CUPY_CACHE_DIR, at import), else the driver."""
    name = getattr(error, "filename", None)
    if isinstance(error, OSError) and name and ".so" not in os.fsdecode(name):
        return ("CuPy could not make or reach that folder at import (its kernel cache, "
                "CUPY_CACHE_DIR, default ~/.cupy/kernel_cache): make it writable, or set "
                "CUPY_CACHE_DIR to a folder you can write to")
    return DRIVER_FIX


def cupy_load_error() -> str | None:
    """The error of the last `import cupy` when CuPy is installed but cannot be loaded."""
    return CUPY_IMPORT[0] if CUPY_IMPORT else None


def cupy_load_fix() -> str | None:
    """What to do about the last `import cupy`'s error, where import_fix knew."""
    return CUPY_IMPORT[1] if len(CUPY_IMPORT) > 1 else None


def cupy_missing() -> str:
    """Why CuPy is not there to use, after _import_cupy gave None, and what to do: not
    installed, or installed but not loadable (its error)."""
    if CUPY_IMPORT:
        fix = cupy_load_fix() or DRIVER_FIX
        return (f"CuPy is installed but cannot be loaded ({CUPY_IMPORT[0]}); {fix}, or use "
                "--device cpu")
    return f"CuPy is not installed; {CUDA_HINT}"


def _cuda_count(cupy: ModuleType) -> int:
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def no_gpu_reason(cupy: Any) -> str:
    """Why CUDA shows no GPU to `cupy`: no driver, a driver older than the CUDA that CuPy was
    built for (and the extra that fits it), a CUDA_VISIBLE_DEVICES that hides every GPU, or
    what CUDA raised."""
    late = missing_at_first_use(cupy)
    if late is not None:
        return f"CuPy cannot be loaded: {late[0]}; {late[1]}"
    try:
        cupy.cuda.runtime.getDeviceCount()
        error = None
    except Exception as e:
        error = error_summary(original_error(e))
    try:
        numbers = cuda_version_numbers(cupy)
    except Exception:
        numbers = None
    if numbers is not None and numbers[1] == "none":
        return "no NVIDIA driver is loaded; nvidia-smi says why"
    built, major = (v.split(".")[0] for v in numbers) if numbers is not None else ("0", "0")
    if major.isdigit() and built.isdigit() and int(major) < int(built):
        swap = (f", or swap CuPy for the one for CUDA {major} (pip uninstall cupy-cuda{built}x; "
                f"pip install -e '.[cuda{major}]' in the gpumlp folder)"
                if major in ("12", "13") else "")
        return (f"the NVIDIA driver supports CUDA {numbers[1]}, older than the CUDA "
                f"{numbers[0]} this CuPy is built for: update the driver{swap}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # which nvidia-smi does not heed
    if visible is not None and hides_every_gpu(visible):
        return (f"CUDA_VISIBLE_DEVICES is {visible!r}, which names no GPU CUDA has; unset it, "
                "or name a GPU nvidia-smi lists")
    if visible is not None and (error is None or "cudaErrorNoDevice" in error):  # either
        return (f"CUDA finds no GPU, CUDA_VISIBLE_DEVICES being {visible!r}: if nvidia-smi "
                "lists GPUs, name one of them (from 0) or unset it; if it lists none, the "
                "driver sees no GPU")
    shown_as = f" (CUDA_VISIBLE_DEVICES is {visible!r})" if visible is not None else ""
    if error is not None:
        return f"{error}{shown_as}; nvidia-smi says whether the driver sees a GPU"
    if numbers is None:
        return "CUDA reports no GPU (its driver's version could not be read); nvidia-smi says why"
    return f"the driver (CUDA {numbers[1]}) reports no GPU; nvidia-smi says whether it sees one"


def missing_at_first_use(cupy: Any) -> tuple[str, str] | None:
    """(the error, what to do) when `cupy` imported but lacks a module at its first use (its
    banner raised from ModuleNotFoundError), as _import_cupy says it at import; else None."""
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        cause = original_error(e)
        fix = lacking_fix(cause)
        if fix is not None:
            return error_summary(cause), fix
    return None


def hides_every_gpu(visible: str) -> bool:
    """Whether CUDA_VISIBLE_DEVICES=`visible` leaves CUDA no GPU: empty, or a first entry that
    is neither an index nor a GPU-/MIG- UUID (CUDA reads the list up to its first bad entry;
    "-1" is the usual way to hide them all)."""
    first = visible.split(",")[0].strip()
    return not (first.isdigit() or first.startswith(("GPU-", "MIG-")))


def cuda_backend(index: int, given: str | None = None) -> Backend:
    """The CuPy backend on GPU `index`, or a DeviceError saying how to get one; the error names
    the device as the user wrote it (`given`, e.g. "cuda"), else as cuda:N."""
    cupy = _import_cupy()
    named = f"--device {given if given is not None else f'cuda:{index}'}"
    if cupy is None:
        raise DeviceError(f"{named}: {cupy_missing()}")
    count = _cuda_count(cupy)
    late = missing_at_first_use(cupy) if count == 0 else None
    if late is not None:  # as at import: CuPy is the trouble, not the GPU
        raise DeviceError(f"{named}: CuPy is installed but cannot be loaded ({late[0]}); "
                          f"{late[1]}, or use --device cpu")
    if count == 0:
        raise DeviceError(f"{named}: no CUDA GPU is visible ({no_gpu_reason(cupy)}); use "
                          "--device cpu")
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown_as = f", CUDA_VISIBLE_DEVICES being {visible!r}" if visible is not None else ""
        raise DeviceError(f"{named}: only {count} GPU(s) here{shown_as} "
                          f"(cuda:0..cuda:{count - 1}); pick one of those or --device cpu")
    cupy.cuda.Device(index).use()
    # CuPy 14 loads these libraries at their first use: here, not mid-run, where what they raise
    # is no one-line error (NVRTC compiles every kernel: CuPy's own and the fused step's)
    for library, load in (("cuBLAS", lambda: cupy.cuda.cublas),
                          ("NVRTC", lambda: cupy.cuda.nvrtc.getVersion())):
        try:
            load()
        except Exception as e:
            why = error_summary(original_error(e))
            raise DeviceError(f"{named}: CuPy cannot load {library} ({why}); "
                              f"{library_fix(cupy, original_error(e))}, or use --device cpu"
                              ) from None
    name = cupy.cuda.runtime.getDeviceProperties(index)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return Backend(cupy, f"cuda:{index}", f"cuda:{index} ({name})")


def library_fix(cupy: Any, error: BaseException) -> str:
    """What to do when CuPy cannot load one of CUDA's libraries (cuBLAS, NVRTC). CuPy 14's
    wheel carries none: they come from a CUDA Toolkit or from pip, through CuPy's `ctk` extra
    (which gpumlp's cuda12/cuda13 extras ask for); a library it did not find ("Failure finding",
    from cuda-pathfinder) is installed so. Any other failure is the CUDA installation's."""
    if "Failure finding" not in str(error):
        return "check the CUDA installation (nvidia-smi, gpumlp info)"
    package = cupy_package(cupy)
    if package is not None and not package.startswith("cupy-cuda"):  # built from source, conda
        return ("this CuPy takes CUDA's libraries from a CUDA Toolkit: install one that has "
                "it (with conda: conda install cuda-toolkit)")
    which = (f"pip install '{package}[ctk]'" if package else
             "pip install 'cupy-cuda12x[ctk]' or 'cupy-cuda13x[ctk]', the one you have")
    return f"CuPy 14 takes CUDA's libraries from a CUDA Toolkit or from pip: {which}"


def cupy_package(cupy: Any) -> str | None:
    """The package that installed the CuPy here: its record's name (cupy-cuda13x from a wheel,
    cupy from source or conda), else the wheel for the CUDA it was built for; None when neither
    says."""
    try:
        from importlib.metadata import packages_distributions
        names = packages_distributions().get("cupy", [])
    except Exception:  # a broken record of some other package
        names = []
    if names:
        return sorted(names, key=lambda n: not n.startswith("cupy-cuda"))[0]
    try:
        major = int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:
        return None
    return f"cupy-cuda{major}x" if major >= 12 else None


CPU = Backend(np, "cpu", "cpu (NumPy)")


def get_backend(device: str = "auto") -> Backend:
    """Resolve `auto|cpu|cuda|cuda:N` into a Backend; a DeviceError when it is not usable."""
    given = device.strip()
    device = given.lower()
    if device == "cpu":
        return CPU
    if device == "auto":
        cupy = _import_cupy()
        usable = cupy is not None and _cuda_count(cupy) > 0
        return cuda_backend(0, "auto (cuda:0)") if usable else CPU
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise DeviceError(f"--device {given!r}: not a device; use auto, cpu, cuda or cuda:N")
    return cuda_backend(int(match.group(1) or 0), given)


def available_devices() -> list[str]:
    """Every device string that would work here, for `gpumlp info`."""
    cupy = _import_cupy()
    count = _cuda_count(cupy) if cupy is not None else 0
    return ["cpu"] + [f"cuda:{i}" for i in range(count)]


def cupy_version() -> str | None:
    cupy = _import_cupy()
    return None if cupy is None else cupy.__version__


def cuda_version_numbers(cupy: Any = None) -> tuple[str, str] | None:
    """("13.0", "13.0"): the CUDA runtime `cupy` was built with and what the driver supports
    (CUDA encodes 13.0 as 13000; "none" for no driver); None without CuPy. Raises what a broken
    CUDA install raises."""
    cupy = cupy if cupy is not None else _import_cupy()
    if cupy is None:
        return None
    runtime = cupy.cuda.runtime
    numbers = (runtime.runtimeGetVersion(), runtime.driverGetVersion())
    runtime_version, driver_version = (f"{v // 1000}.{v % 1000 // 10}" if v else "none"
                                       for v in map(int, numbers))
    return runtime_version, driver_version


def cuda_versions(cupy: Any = None) -> str:
    """"CUDA runtime 13.0, driver 13.0" (cuda_version_numbers); what is missing, said instead."""
    try:
        numbers = cuda_version_numbers(cupy)
    except Exception as e:  # a broken CUDA install, or no runtime library
        return f"unknown ({error_summary(original_error(e))})"
    if numbers is None:
        return f"- ({no_cupy()})"
    return f"CUDA runtime {numbers[0]}, driver {numbers[1]}"


def no_cupy() -> str:
    """Why there are no CUDA versions to show, after an `import cupy` gave none."""
    return "CuPy cannot be loaded" if CUPY_IMPORT else "no CuPy"


def array_module(array: Any) -> ModuleType:
    """numpy or cupy, whichever `array` belongs to (without importing cupy)."""
    if type(array).__module__.split(".")[0] == "cupy":
        import sys
        return sys.modules["cupy"]
    return np


def ndimage_for(xp: ModuleType) -> ModuleType:
    """scipy.ndimage for numpy, cupyx.scipy.ndimage for cupy: same functions, same arguments."""
    import importlib
    return importlib.import_module("cupyx.scipy.ndimage" if xp.__name__ == "cupy"
                                   else "scipy.ndimage")


TF32_MIN_CAPABILITY = 80  # TF32 tensor cores: Ampere (compute capability 8.0) and newer


def enable_tf32(backend: Backend, on: bool) -> bool:
    """Let float32 matrix products on this GPU run on TF32 tensor cores, or not; True if they do.

    CuPy keeps one cuBLAS compute type per dtype for the whole process (it reads CUPY_TF32 once,
    at its first product); this sets it, so that `train.tf32` alone decides. TF32 keeps float32's
    range with a 10-bit mantissa in the products' inputs. A no-op on the CPU; a GPU older than
    compute capability 8.0 keeps full float32.
    """
    if not backend.is_gpu:
        return False
    linalg = getattr(backend.xp._core, "_routines_linalg", None)
    if linalg is None or not hasattr(linalg, "set_compute_type"):
        if not on:
            return False
        raise DeviceError(f"train.tf32: CuPy {backend.xp.__version__} has no way to set the "
                          "matmul compute type; upgrade CuPy or set train.tf32: false")
    capability = int(backend.xp.cuda.Device().compute_capability)
    tf32 = on and capability >= TF32_MIN_CAPABILITY
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if tf32
                            else linalg.COMPUTE_TYPE_DEFAULT)
    return tf32
