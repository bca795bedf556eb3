"""Matrix products of the fused GPU step, through cuBLAS's gemmEx called directly.

At the sizes of one training step (a 128 x 784 by 784 x 256 product should be a few
microseconds of an H200: estimated from its peak, not measured) the host time of
`ndarray.dot(out=)` (dtype promotion, overlap checks, views) is as long as the product. This
calls `cublasGemmEx` with the arrays' device pointers and nothing else. cuBLAS is
column-major: a C-contiguous (r, c) array is, to cuBLAS, its (c, r) transpose with leading
dimension c. So out = op(a) @ op(b) is computed as
out^T = op(b)^T @ op(a)^T, with b first:

    gemmEx(op_b, op_a, M=n, N=m, K=k, b, ldb=b.shape[1], a, lda=a.shape[1], out, ldc=n)

where out is (m, n), op(a) is (m, k), op(b) is (k, n), and op_x is OP_T when x is used
transposed. CuPy is reached only through `backend.xp` (`xp.cuda.cublas`, CuPy's wrapper).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DeviceError, error_summary


def address(array: Any) -> int:
    """Where an array's first element is: a CuPy array's device pointer (NumPy arrays, in the
    tests' host emulation of the step, by their host address)."""
    if isinstance(array, np.ndarray):
        return array.ctypes.data
    return array.data.ptr


class Blas:
    """out = op(a) @ op(b) for C-contiguous float32 matrices, on the current stream."""

    def __init__(self, xp: Any, tf32: bool):
        try:  # CuPy 14 loads libcublas on first use: a missing one shows here
            self.xp, self.cublas = xp, xp.cuda.cublas
            self.handle = xp.cuda.device.get_cublas_handle()
        except Exception as e:  # ImportError, or a CUDA error creating the handle
            raise DeviceError(f"cuBLAS could not be loaded ({error_summary(e)}); check "
                              "the CUDA installation (nvidia-smi, gpumlp info)") from None
        cublas = self.cublas
        self.full = cublas.CUBLAS_COMPUTE_32F  # float32 inputs, float32 sums
        self.compute = cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else self.full
        self.float32 = xp.cuda.runtime.CUDA_R_32F
        self.ops = (cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T)
        self.algo = cublas.CUBLAS_GEMM_DEFAULT
        self.scalars = np.array([1.0, 0.0], dtype=np.float32)  # alpha, beta: host memory
        self.one, self.zero = self.scalars.ctypes.data, self.scalars.ctypes.data + 4

    def begin(self) -> None:
        """Point CuPy's cuBLAS handle (one per thread and device) at the current stream with
        host scalars; once per step, since other CuPy calls may have changed either."""
        self.handle = self.xp.cuda.device.get_cublas_handle()
        self.cublas.setStream(self.handle, self.xp.cuda.get_current_stream().ptr)
        self.cublas.setPointerMode(self.handle, self.cublas.CUBLAS_POINTER_MODE_HOST)

    def gemm(self, a: Any, b: Any, out: Any, trans_a: bool = False, trans_b: bool = False,
             full: bool = False) -> None:
        """out (m, n) = op(a) (m, k) @ op(b) (k, n), op(x) = x.T where trans_x; no checks
        (the caller's shapes are fixed; FusedStep.check vets the arrays). `full` keeps float32
        inputs under TF32: for the bias gradients' sums, which the generic step sums in float32."""
        m, n = out.shape
        k = a.shape[0] if trans_a else a.shape[1]
        f32 = self.float32
        self.cublas.gemmEx(self.handle, self.ops[trans_b], self.ops[trans_a], n, m, k, self.one,
                           address(b), f32, b.shape[1], address(a), f32, a.shape[1], self.zero,
                           address(out), f32, n, self.full if full else self.compute, self.algo)
