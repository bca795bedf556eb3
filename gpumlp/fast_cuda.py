"""The training step on a GPU with fused CUDA kernels: the same Step as `step.generic_step`.

A small MLP on a GPU is bound by kernel launches and host round trips, not by arithmetic:
the generic step launches one CuPy kernel per array expression (about 60 for one hidden
layer with Nesterov, and three more for the loop's sums). This step does the same mathematics
in 11 calls (13 with the loader's gather and the loop's tally), each one kernel or one cuBLAS
product made with as little host work as possible, into device buffers allocated once per
batch size and reused, without reading anything back to the host.
One step with one hidden layer (shape letters as in model.py: m, d, h, c):

    gather_inputs        X = images[idx] / 255, y = labels[idx]        (m, d), (m,)  the loader
    gemm                 A1 = X @ W1                                    (m, h)  cuBLAS
    bias_act_<phi>       A1 += b1;  Z1 = phi(A1) [* M1]                 (m, h)  one launch
    gemm                 A2 = Z1 @ W2                                   (m, c)  cuBLAS
    softmax_xent         A2 += b2;  dA2 = (Z2 - Y) / m;  L;  correct    (m, c)  one launch
    gemm, gemm           dW2 = Z1.T @ dA2;  db2 = ones(1, m) @ dA2      (h, c), (1, c)
    gemm                 dZ1 = dA2 @ W2.T                               (m, h)  cuBLAS
    act_backward_<phi>   dA1 = dZ1 [* M1] * phi'(A1), over dZ1          (m, h)  one launch
    gemm, gemm           dW1 = X.T @ dA1;  db1 = ones(1, m) @ dA1       (d, h), (1, h)
    sgd_update / adam_update   every parameter array in place, one launch (UpdateTable)
    tally                the loop's loss_sum += L * m, correct += ok    one launch

The products call cuBLAS's gemmEx on the arrays' device pointers (gpu_blas.Blas), not
`ndarray.dot`, whose host-side checks cost as much as a product of this size takes.
Deeper nets repeat the hidden-layer lines. Dropout masks (made by the training loop) enter
bias_act and act_backward; label smoothing enters softmax_xent; max-norm runs the generic
`optim.apply_max_norm` after the update. float64 (`train.dtype`), or an activation
without a kernel, routes to the generic step (see `unsupported`; every activation of
activations.py has one). docs/gpu.md tells the whole story.

The kernels are one CUDA source (`cuda_source()`), compiled by CuPy's RawModule with
`--fmad=false`, so that each float32 operation rounds as the generic step's does. Every
kernel's per-element work is a `__host__ __device__` function; the tests compile the same
source for the CPU (GPUMLP_HOST_EMULATION) and run this very step on NumPy arrays against
the generic step. CuPy is reached only through `backend.xp`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .activations import GELU_C, GELU_K, LEAKY_SLOPE
from .backend import Backend, enable_tf32
from .config import Config
from .data import MNIST_MEAN, MNIST_STD, DeviceSplit
from .errors import DeviceError, GpumlpError, error_summary
from .gpu_blas import Blas, address
from .model import Grads, Params
from .optim import OptState, apply_max_norm, flat
from .step import Step, generic_step

OPTIONS = ("--fmad=false",)  # no fused multiply-add: float32 rounding as in the generic step
THREADS = 256                # threads per block of the elementwise kernels
MAX_BLOCKS = 4096            # more rows than this covers are taken by the grid-stride loop
XENT_THREADS = 256           # the one block of softmax_xent (a power of two)

# The C++ type of each activation of activations.py, in the CUDA source below.
ACTIVATION_TYPES = {"relu": "Relu", "leaky_relu": "LeakyRelu", "sigmoid": "Sigmoid",
                    "tanh": "Tanh", "gelu": "Gelu"}

PRELUDE = r"""
// gpumlp's fused kernels. float32, C-contiguous arrays, one example per row.
// Notation of model.py: A before the nonlinearity, Z after; d + tensor is its gradient.
#ifdef GPUMLP_HOST_EMULATION  // the tests' CPU build: one thread at a time, in order
#include <math.h>
#define __host__
#define __device__
#define __shared__ static
#define KERNEL extern "C" void
#define FOR_EACH_INDEX(i, n) for (long long i = 0; i < (n); ++i)
#define FOR_EACH_THREAD(t) for (int t = 0; t < XENT_THREADS; ++t)
#define SYNC_THREADS()
#else
#define KERNEL extern "C" __global__ void
#define FOR_EACH_INDEX(i, n) \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long long)blockDim.x * gridDim.x)
#define FOR_EACH_THREAD(t) for (int t = threadIdx.x, once_ = 1; once_; once_ = 0)
#define SYNC_THREADS() __syncthreads()
#endif
"""

ELEMENTS = r"""
// phi and phi' of activations.py, side by side (the constants are written in from there).
struct Relu {
  __host__ __device__ static float phi(float a) { return a < 0.0f ? 0.0f : a; }
  __host__ __device__ static float phi_prime(float a) { return a > 0.0f ? 1.0f : 0.0f; }
};
struct LeakyRelu {
  __host__ __device__ static float phi(float a) { return a > 0.0f ? a : a * LEAKY_SLOPE; }
  __host__ __device__ static float phi_prime(float a) { return a > 0.0f ? 1.0f : LEAKY_SLOPE; }
};
// The logistic function from exponents <= 0 only, as activations.py writes it: e = e^-|x|,
// sigma(x) = (x < 0 ? e : 1) / (1 + e) (activations.py's e^min(x, 0), the same bits) and
// sigma'(x) = e / (1 + e)^2, without overflow and without cancellation.
__host__ __device__ inline float exp_minus_abs(float x) { return expf(-fabsf(x)); }
__host__ __device__ inline float logistic(float x, float e) {
  return (x < 0.0f ? e : 1.0f) / (1.0f + e);
}
struct Sigmoid {
  __host__ __device__ static float phi(float a) { return logistic(a, exp_minus_abs(a)); }
  __host__ __device__ static float phi_prime(float a) {
    float e = exp_minus_abs(a), d = 1.0f + e;
    return e / (d * d);
  }
};
struct Tanh {
  __host__ __device__ static float phi(float a) { return tanhf(a); }
  __host__ __device__ static float phi_prime(float a) {  // 1 - tanh^2 a
    float e = exp_minus_abs(2.0f * a), d = 1.0f + e;
    return 4.0f * e / (d * d);
  }
};
struct Gelu {  // tanh approximation: A (1 + tanh u) / 2 = A sigma(2u), u = K (A + C A^3)
  __host__ __device__ static float two_u(float a) { return GELU_2K * (a + GELU_C * (a * a * a)); }
  __host__ __device__ static float phi(float a) {
    float v = two_u(a);
    return a * logistic(v, exp_minus_abs(v));
  }
  __host__ __device__ static float phi_prime(float a) {
    float v = two_u(a), e = exp_minus_abs(v), d = 1.0f + e, ae = a * e;  // a e first: e = 0
    return logistic(v, e) + GELU_2K * (ae + GELU_3C * a * (a * ae)) / (d * d);  // gives 0
  }
};

// X = images[idx] / 255 (standardised if asked), y = labels[idx]; element e = (row r, column k).
// An index outside 0..n-1 is clipped, as np.take(mode="clip") does.
__host__ __device__ inline void gather_at(long long e, int d, long long n,
                                          const unsigned char* images, const long long* idx,
                                          const int* labels, float scale, int standard,
                                          float mean, float inv_std, float* X, int* y) {
  long long r = e / d, k = e % d;
  long long src = idx[r] < 0 ? 0 : (idx[r] >= n ? n - 1 : idx[r]);
  float x = (float)images[src * d + k] * scale;   // x / 255
  if (standard) x = (x - mean) * inv_std;         // (x / 255 - mean) / std
  X[e] = x;
  if (k == 0) y[r] = labels[src];
}

// A = Z_prev @ W + b (the bias is added here), Z = phi(A), times the dropout mask if MASKED.
template <class Act, bool MASKED>
__host__ __device__ inline void bias_act_at(long long i, int h, float* A, const float* b,
                                            const float* M, float* Z) {
  float a = A[i] + b[i % h];
  A[i] = a;
  float z = Act::phi(a);
  Z[i] = MASKED ? z * M[i] : z;
}

// dA = dZ (times the dropout mask if MASKED) * phi'(A), written over dZ.
template <class Act, bool MASKED>
__host__ __device__ inline void act_backward_at(long long i, float* dZ, const float* A,
                                                const float* M) {
  float dz = MASKED ? dZ[i] * M[i] : dZ[i];
  dZ[i] = dz * Act::phi_prime(A[i]);
}

// One row of the output layer, its c logits a[0..c): A2 += b2 (the bias is added here);
// log Z2 = A2 - max - log sum exp(A2 - max); dA2 = (Z2 - Y) / m; returns -sum_j Y_j log Z2_j.
// Y_j = y_on + y_off on the label, y_off elsewhere (label smoothing; 1 and 0 without it).
// *hit = 1 when the first maximum of A2 is the label. A label outside 0..c-1 gives a NaN loss.
__host__ __device__ inline double xent_row(float* a, const float* b, int c, int label,
                                           float y_on, float y_off, int m, float* da, int* hit) {
  for (int j = 0; j < c; ++j) a[j] = a[j] + b[j];
  int best = 0;
  for (int j = 1; j < c; ++j) if (a[j] > a[best]) best = j;
  float top = a[best];
  float sum = 0.0f;
  for (int j = 0; j < c; ++j) sum += expf(a[j] - top);
  float lse = logf(sum);
  double loss = 0.0;
  for (int j = 0; j < c; ++j) {
    float logp = (a[j] - top) - lse;                     // log Z2_j
    float yj = j == label ? y_on + y_off : y_off;        // Y_j
    da[j] = (expf(logp) - yj) / (float)m;                // dA2_j
    if (yj != 0.0f) loss -= (double)(yj * logp);       // 0 * -inf (a spread past float) is 0
  }
  *hit = best == label;
  return (label < 0 || label >= c) ? (double)nanf("") : loss;
}

// SGD: g += wd p; vel = mu vel + g; p -= lr (g + mu vel) with Nesterov, else lr vel.
// Momentum 0 is plain SGD, p -= lr g, and leaves vel alone (as optim.sgd_update does).
__host__ __device__ inline void sgd_at(long long i, float* p, const float* g, float* vel,
                                       float lr, float mu, float wd, int nesterov) {
  float gi = g[i];
  if (wd != 0.0f) gi = gi + wd * p[i];
  if (mu == 0.0f) { p[i] = p[i] - lr * gi; return; }
  float v = vel[i] * mu + gi;
  vel[i] = v;
  p[i] = p[i] - (nesterov ? lr * (gi + mu * v) : lr * v);
}

// Adam at step t: p *= decay (AdamW: 1 - lr wd, else 1); g += l2 p (Adam's L2 term, else 0);
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= step m / (sqrt(v vhs) + eps), with
// step = lr / (1 - b1^t) and vhs = 1 / (1 - b2^t) worked out on the host.
__host__ __device__ inline void adam_at(long long i, float* p, const float* g, float* m1,
                                        float* m2, float decay, float l2, float b1, float omb1,
                                        float b2, float omb2, float step, float vhs, float eps) {
  float pi = p[i] * decay;
  float gi = g[i];
  if (l2 != 0.0f) gi = gi + l2 * p[i];
  float mi = m1[i] * b1 + omb1 * gi;
  float vi = m2[i] * b2 + omb2 * (gi * gi);
  m1[i] = mi;
  m2[i] = vi;
  p[i] = pi - step * mi / (sqrtf(vi * vhs) + eps);
}
"""

KERNELS = r"""
KERNEL gather_inputs(long long total, int d, long long n, const unsigned char* images,
                     const long long* idx, const int* labels, float scale, int standard,
                     float mean, float inv_std, float* X, int* y) {
  FOR_EACH_INDEX(e, total)
    gather_at(e, d, n, images, idx, labels, scale, standard, mean, inv_std, X, y);
}

// One block of XENT_THREADS threads: thread t takes rows t, t + XENT_THREADS, ...; the partial
// sums are added in a fixed tree, so L and correct do not depend on scheduling.
KERNEL softmax_xent(int m, int c, float* A2, const float* b2, const int* y, float y_on,
                    float y_off, float* dA2, float* L, long long* correct) {
  __shared__ double loss_part[XENT_THREADS];
  __shared__ long long hits_part[XENT_THREADS];
  FOR_EACH_THREAD(t) {
    double loss = 0.0;
    long long hits = 0;
    for (int i = t; i < m; i += XENT_THREADS) {
      int hit = 0;
      loss += xent_row(A2 + (long long)i * c, b2, c, y[i], y_on, y_off, m,
                       dA2 + (long long)i * c, &hit);
      hits += hit;
    }
    loss_part[t] = loss;
    hits_part[t] = hits;
  }
  SYNC_THREADS();
  for (int half = XENT_THREADS / 2; half > 0; half /= 2) {
    FOR_EACH_THREAD(t) {
      if (t < half) {
        loss_part[t] += loss_part[t + half];
        hits_part[t] += hits_part[t + half];
      }
    }
    SYNC_THREADS();
  }
  FOR_EACH_THREAD(t) {
    if (t == 0) {
      *L = (float)(loss_part[0] / m);
      *correct = hits_part[0];
    }
  }
}

// The training loop's running sums: loss_sum += L * m (the product in float32, as the loop on
// the host computes it), correct += the step's count. One thread; kernels run in order.
KERNEL tally(long long n, const float* L, const long long* hits, float m, double* loss_sum,
             long long* correct) {
  FOR_EACH_INDEX(i, n) {
    *loss_sum += (double)(*L * m);
    *correct += *hits;
  }
}

// The optimizer over every parameter array in one launch. Element e of all n is element
// e - starts[j] of array j (starts: count + 1 ascending offsets, from 0 to n); the arrays are
// reached through tables of their addresses, one table per slot (p, g, vel or m1, m2).
__host__ __device__ inline int array_of(long long e, int count, const long long* starts) {
  int j = 0;
  while (j + 1 < count && e >= starts[j + 1]) ++j;
  return j;
}
#define AT(table, type) ((type*)(table)[j])

KERNEL sgd_update(long long n, int count, const long long* starts, const unsigned long long* p,
                  const unsigned long long* g, const unsigned long long* vel, float lr,
                  float mu, float wd, int nesterov) {
  FOR_EACH_INDEX(e, n) {
    int j = array_of(e, count, starts);
    sgd_at(e - starts[j], AT(p, float), AT(g, const float), AT(vel, float), lr, mu, wd, nesterov);
  }
}

KERNEL adam_update(long long n, int count, const long long* starts, const unsigned long long* p,
                   const unsigned long long* g, const unsigned long long* m1,
                   const unsigned long long* m2, float decay, float l2, float b1, float omb1,
                   float b2, float omb2, float step, float vhs, float eps) {
  FOR_EACH_INDEX(e, n) {
    int j = array_of(e, count, starts);
    adam_at(e - starts[j], AT(p, float), AT(g, const float), AT(m1, float), AT(m2, float),
            decay, l2, b1, omb1, b2, omb2, step, vhs, eps);
  }
}
"""

ACTIVATION_KERNELS = r"""
KERNEL bias_act_{name}(long long n, int h, float* A, const float* b, float* Z) {{
  FOR_EACH_INDEX(i, n) bias_act_at<{act}, false>(i, h, A, b, 0, Z);
}}
KERNEL bias_act_masked_{name}(long long n, int h, float* A, const float* b, const float* M,
                              float* Z) {{
  FOR_EACH_INDEX(i, n) bias_act_at<{act}, true>(i, h, A, b, M, Z);
}}
KERNEL act_backward_{name}(long long n, float* dZ, const float* A) {{
  FOR_EACH_INDEX(i, n) act_backward_at<{act}, false>(i, dZ, A, 0);
}}
KERNEL act_backward_masked_{name}(long long n, float* dZ, const float* A, const float* M) {{
  FOR_EACH_INDEX(i, n) act_backward_at<{act}, true>(i, dZ, A, M);
}}
"""


def c_float(value: float) -> str:
    """A float32 literal for CUDA: the exact value numpy.float32(value) holds."""
    return f"{float(np.float32(value))!r}f"


def cuda_source() -> str:
    """The whole CUDA module: every kernel, for every activation."""
    constants = {"XENT_THREADS": str(XENT_THREADS), "LEAKY_SLOPE": c_float(LEAKY_SLOPE),
                 "GELU_2K": c_float(2 * GELU_K), "GELU_C": c_float(GELU_C),
                 "GELU_3C": c_float(3 * GELU_C)}  # as activations.py rounds 2 * K and 3 * C
    defines = "".join(f"#define {name} {value}\n" for name, value in constants.items())
    per_activation = "".join(ACTIVATION_KERNELS.format(name=name, act=act)
                             for name, act in ACTIVATION_TYPES.items())
    return defines + PRELUDE + ELEMENTS + KERNELS + per_activation


def unsupported(config: Config) -> str | None:
    """Why the fused step cannot run `config` (the generic step then does), or None."""
    if config.train.dtype != "float32":
        return f"train.dtype is {config.train.dtype}; the fused kernels are float32 only"
    if config.model.activation not in ACTIVATION_TYPES:
        return f"no fused kernel for activation {config.model.activation}"
    return None


def gpu_step(config: Config, backend: Backend) -> Step:
    """The step of a GPU run: fused when `config` allows it, else the generic step (on the GPU).

    Sets TF32 for float32 matrix products as `train.tf32` says, for the whole process.
    """
    if unsupported(config) is not None:
        enable_tf32(backend, config.train.tf32)
        return generic_step(config)
    return FusedStep(config, backend)


class Kernels:
    """The compiled module: one launcher per kernel, the activation's kernels picked once."""

    def __init__(self, xp: Any, activation: str):
        try:
            module = xp.RawModule(code=cuda_source(), options=OPTIONS)
            get = module.get_function
            self.gather_inputs, self.softmax_xent = get("gather_inputs"), get("softmax_xent")
            self.sgd_update, self.adam_update = get("sgd_update"), get("adam_update")
            self.tally = get("tally")
            self.bias_act = get(f"bias_act_{activation}")
            self.bias_act_masked = get(f"bias_act_masked_{activation}")
            self.act_backward = get(f"act_backward_{activation}")
            self.act_backward_masked = get(f"act_backward_masked_{activation}")
        except Exception as e:  # CuPy's CompileException, or a CUDA error while loading
            whose = ("this is a gpumlp bug, please report it"
                     if type(e).__name__ == "CompileException"  # NVRTC refused our source
                     else "check the CUDA installation (nvidia-smi, gpumlp info)")
            raise DeviceError(f"the fused CUDA kernels did not build ({error_summary(e)}); "
                              f"{whose}") from None


def launch(kernel: Any, n: int, *args: Any) -> None:
    """Run an elementwise kernel over n elements: THREADS per block, a grid-stride loop."""
    blocks = min(max((n + THREADS - 1) // THREADS, 1), MAX_BLOCKS)
    kernel((blocks,), (THREADS,), args)


class Buffers(NamedTuple):
    """The device arrays of one step for one batch size m, written in place every step."""
    A: tuple   # (A1, ..., A_K): (m, fan_out) pre-activations; A_K are the logits (m, c)
    Z: tuple   # (Z1, ..., Z_{K-1}): (m, h_k) hidden activations, after dropout
    dZ: tuple  # (dZ1, ..., dZ_{K-1}): (m, h_k), overwritten by dA_k; dA_K has its own:
    dA: Any    # (m, c) dA_K = (Z_K - Y) / m
    ones: Any  # (1, m) of 1: db_k = ones @ dA_k, the column sums, as one more product


class UpdateTable(NamedTuple):
    """What the one-launch optimizer update reads: every parameter array with its gradient
    and optimizer state, by address, in optim.flat's order (device arrays)."""
    n: int          # elements in all the parameter arrays
    count: int      # parameter arrays
    starts: Any     # (count + 1,) int64: where each array starts among the n
    slots: tuple    # (p, g, m[, v]): (count,) uint64 addresses each


def update_table(xp: Any, params: Params, grads: Grads, state: OptState) -> UpdateTable:
    """The UpdateTable of these arrays. Plain SGD has no velocity: its slot holds p's
    addresses, which the kernel then never reads through."""
    ps, gs = flat(params), flat(grads)
    sizes = np.array([0, *(p.size for p in ps)], dtype=np.int64)
    slots = [ps, gs, state.m or ps, *((state.v,) if state.v else ())]
    tables = tuple(xp.asarray(np.array([address(a) for a in slot], dtype=np.uint64))
                   for slot in slots)
    return UpdateTable(int(sizes.sum()), len(ps), xp.asarray(np.cumsum(sizes)), tables)


class GradBuffers(NamedTuple):
    """The step's gradients, written in place: dW_k, db_k, and db_k as (1, fan_out) rows."""
    grads: Grads
    bias_rows: tuple


def buffer_shapes(widths: tuple[int, ...], m: int) -> dict[str, tuple]:
    """The shapes of a Buffers for layer widths (d, h1, ..., c) and batch size m."""
    hidden = widths[1:-1]
    return {"A": tuple((m, w) for w in widths[1:]), "Z": tuple((m, h) for h in hidden),
            "dZ": tuple((m, h) for h in hidden), "dA": (m, widths[-1])}


def widths_of(params: Params) -> tuple[int, ...]:
    return (int(params.W[0].shape[0]), *(int(W.shape[1]) for W in params.W))


class FusedStep:
    """step(params, state, X, y, lr, t, masks) -> (L, correct), as step.generic_step; plus
    `batch(split, idx)`, the loader of the training loop, gathering into reused buffers."""

    kind = "fused_cuda"

    def __init__(self, config: Config, backend: Backend):
        """Builds the kernels; sets TF32 for float32 products as `train.tf32` says (CuPy's,
        for the whole process, and this step's own cuBLAS calls)."""
        self.config, self.xp = config, backend.xp
        self.kernels = Kernels(backend.xp, config.model.activation)
        self.blas = Blas(backend.xp, enable_tf32(backend, config.train.tf32))
        self.buffers: dict[tuple, Buffers] = {}   # (m, widths) -> the step's arrays
        self.grads: dict[tuple, GradBuffers] = {}  # widths -> dW, db
        self.inputs: dict[tuple, tuple] = {}      # (m, d) -> the loader's X, y
        self.checked: tuple = ()                  # the parameter and state arrays last checked
        self.last: tuple = (None, None, ())       # and their Params, OptState and widths
        self.table: UpdateTable | None = None     # the optimizer's view of those arrays
        self.split: DeviceSplit | None = None     # the training split the loader last checked
        standard = config.data.normalize == "standard"
        self.gather_scalars = (np.float32(1.0 / 255.0), np.int32(standard),
                               np.float32(MNIST_MEAN), np.float32(1.0 / MNIST_STD))

    def step_buffers(self, m: int, widths: tuple[int, ...]) -> Buffers:
        key = (m, widths)
        if key not in self.buffers:
            shapes = buffer_shapes(widths, m)
            self.buffers[key] = Buffers(*(tuple(map(self.poisoned, shapes[name]))
                                          for name in ("A", "Z", "dZ")),
                                        self.poisoned(shapes["dA"]),
                                        self.xp.full((1, m), 1.0, dtype=np.float32))
        return self.buffers[key]

    def grad_buffers(self, params: Params, widths: tuple[int, ...]) -> GradBuffers:
        if widths not in self.grads:
            grads = Grads(tuple(self.poisoned(W.shape) for W in params.W),
                          tuple(self.poisoned(b.shape) for b in params.b))
            self.grads[widths] = GradBuffers(grads, tuple(db.reshape(1, -1) for db in grads.b))
        return self.grads[widths]

    def poisoned(self, shape: tuple, dtype: Any = np.float32) -> Any:
        """A new buffer full of NaN (-1 for integers): an element a kernel misses shows at once."""
        return self.xp.full(shape, -1 if np.dtype(dtype).kind == "i" else np.nan, dtype=dtype)

    def batch(self, split: DeviceSplit, idx: Any) -> tuple[Any, Any]:
        """(X (m, d), y (m,)) of the rows idx, as data.to_inputs(*data.gather(...)) gives them.

        X and y are overwritten by the next call with the same m; the training loop is done
        with them by then (the GPU runs the launches in order).
        """
        m, d = int(idx.shape[0]), int(split.images.shape[1])
        if (m, d) not in self.inputs:
            self.inputs[(m, d)] = (self.poisoned((m, d)), self.poisoned((m,), np.int32))
        X, y = self.inputs[(m, d)]
        self.on_device(idx, what="the batch's row indices")
        idx = contiguous(self.xp, idx, np.int64)
        if split is not self.split:
            self.on_device(split.images, split.labels, what="the training split")
            require(split.images, np.uint8, (len(split), d), "the training images")
            require(split.labels, np.int32, (len(split),), "the training labels")
            self.split = split
        launch(self.kernels.gather_inputs, m * d, np.int64(m * d), np.int32(d),
               np.int64(len(split)), split.images, idx, split.labels, *self.gather_scalars, X, y)
        return X, y

    def __call__(self, params: Params, state: OptState, X: Any, y: Any, lr: float, t: int,
                 masks: tuple = ()) -> tuple[Any, Any]:
        self.on_device(X, y, *masks, what="X, y and the dropout masks")
        if not X.flags.c_contiguous:                                      # cuBLAS gets X's pointer
            X = self.xp.ascontiguousarray(X)
        widths = self.check(params, state, X, y, masks)
        y = contiguous(self.xp, y, np.int32)                              # the loader's y as it is
        buf = self.step_buffers(int(X.shape[0]), widths)
        self.blas.begin()
        self.forward(params, X, masks, buf)
        L, correct = self.loss(params, y, buf)
        grads = self.backward(params, X, masks, buf, widths)
        self.update(params, grads, state, lr, t)
        apply_max_norm(params, self.config.model.max_norm)
        return L, correct

    def forward(self, params: Params, X: Any, masks: tuple, buf: Buffers) -> None:
        """A_k = Z_{k-1} @ W_k + b_k and Z_k = phi(A_k) [* M_k] for the hidden layers;
        A_K = Z @ W_K."""
        Z = X                                                             # (m, d)
        for k, (Wk, bk) in enumerate(zip(params.W[:-1], params.b[:-1])):
            self.blas.gemm(Z, Wk, buf.A[k])                               # (m, h_k)
            n, h = buf.A[k].size, buf.A[k].shape[1]
            if masks:
                launch(self.kernels.bias_act_masked, n, np.int64(n), np.int32(h), buf.A[k], bk,
                       masks[k], buf.Z[k])
            else:
                launch(self.kernels.bias_act, n, np.int64(n), np.int32(h), buf.A[k], bk, buf.Z[k])
            Z = buf.Z[k]                                                  # (m, h_k)
        self.blas.gemm(Z, params.W[-1], buf.A[-1])                        # (m, c), bias below

    def loss(self, params: Params, y: Any, buf: Buffers) -> tuple[Any, Any]:
        """A_K += b_K, dA_K = (Z_K - Y) / m, and the mean loss and correct count (0-d arrays)."""
        m, c = buf.A[-1].shape
        L = self.xp.empty((), dtype=np.float32)
        correct = self.xp.empty((), dtype=np.int64)
        self.kernels.softmax_xent((1,), (XENT_THREADS,),
                                  (np.int32(m), np.int32(c), buf.A[-1], params.b[-1], y,
                                   *target_scalars(self.config.train.label_smoothing, c),
                                   buf.dA, L, correct))
        return L, correct

    def backward(self, params: Params, X: Any, masks: tuple, buf: Buffers,
                 widths: tuple[int, ...]) -> Grads:
        """dW_k = Z_{k-1}.T @ dA_k, db_k = sum_rows dA_k, dA_{k-1} = (dA_k @ W_k.T) [* M] * phi'."""
        grads, bias_rows = self.grad_buffers(params, widths)
        dA = buf.dA                                                       # (m, c)
        for k in reversed(range(len(params.W))):
            Z_prev = X if k == 0 else buf.Z[k - 1]                        # (m, fan_in)
            self.blas.gemm(Z_prev, dA, grads.W[k], trans_a=True)          # (fan_in, fan_out)
            self.blas.gemm(buf.ones, dA, bias_rows[k], full=True)         # (1, fan_out)
            if k > 0:
                dZ = buf.dZ[k - 1]
                self.blas.gemm(dA, params.W[k], dZ, trans_b=True)         # (m, h_k)
                n = dZ.size
                if masks:
                    launch(self.kernels.act_backward_masked, n, np.int64(n), dZ, buf.A[k - 1],
                           masks[k - 1])
                else:
                    launch(self.kernels.act_backward, n, np.int64(n), dZ, buf.A[k - 1])
                dA = dZ                                                   # (m, h_k), now dA_k
        return grads

    def update(self, params: Params, grads: Grads, state: OptState, lr: float, t: int) -> None:
        """One optimizer step over every parameter array, as optim.update does it: one launch."""
        if self.table is None:                  # new arrays (check() saw them): their addresses
            self.table = update_table(self.xp, params, grads, state)
        n, count, starts, slots = self.table
        cfg = self.config.optim
        if cfg.name == "sgd":
            launch(self.kernels.sgd_update, n, np.int64(n), np.int32(count), starts, *slots,
                   *sgd_scalars(cfg, lr))
        else:
            launch(self.kernels.adam_update, n, np.int64(n), np.int32(count), starts, *slots,
                   *adam_scalars(cfg, lr, t))

    def tally(self, loss_sum: Any, correct: Any, L: Any, ok: Any, m: int) -> None:
        """loss_sum += L * m and correct += ok (0-d float64 and int64 device arrays), as
        `step.add_to_sums` does, in one launch instead of three. Host arrays are refused: CuPy
        passes a one-element NumPy array by value, which the kernel would take for a pointer."""
        self.on_device(loss_sum, correct, L, ok, what="the running sums")
        launch(self.kernels.tally, 1, np.int64(1), L, ok, np.float32(m), loss_sum, correct)

    def on_device(self, *arrays: Any, what: str) -> None:
        """A GpumlpError unless every array is a device array: the kernels and cuBLAS would
        take a host array's address as a device pointer."""
        if not all(isinstance(a, self.xp.ndarray) for a in arrays):
            raise GpumlpError(f"the fused GPU step needs {what} on the GPU (CuPy arrays); "
                              f"move them there with backend.asarray")

    def check(self, params: Params, state: OptState, X: Any, y: Any,
              masks: tuple) -> tuple[int, ...]:
        """The kernels index raw memory: every array they touch must be what they assume.
        Returns the layer widths. The parameter and state arrays are vetted when they change
        (the same Params and OptState, both immutable, hold the same arrays)."""
        if params is not self.last[0] or state is not self.last[1]:
            arrays = (*flat(params), *state.m, *state.v)
            if len(arrays) != len(self.checked) or \
                    any(a is not b for a, b in zip(arrays, self.checked)):
                self.on_device(*arrays, what="the parameters and optimizer state")
                for k, (W, b) in enumerate(zip(params.W, params.b), start=1):
                    require(W, np.float32, W.shape, f"W{k}")
                    require(b, np.float32, (W.shape[1],), f"b{k}")
                for slot, moments in (("m", state.m), ("v", state.v)):
                    for i, p in enumerate(flat(params) if moments else ()):
                        require(moments[i], np.float32, p.shape, f"optimizer state {slot}[{i}]")
                self.checked, self.table = arrays, None
            self.last = (params, state, widths_of(params))
        widths = self.last[2]
        if X.dtype != np.float32 or X.shape[1:] != (widths[0],):    # __call__ made X contiguous
            raise GpumlpError(f"the fused step takes C-contiguous float32 inputs of shape "
                              f"(m, {widths[0]}), got {X.dtype} {tuple(X.shape)}")
        if tuple(y.shape) != (X.shape[0],) or y.dtype.kind not in "iu":
            raise GpumlpError(f"the fused step takes one integer label per row of X "
                              f"({X.shape[0]}), got {y.dtype} {tuple(y.shape)}")
        for k, M in enumerate(masks):
            require(M, np.float32, (X.shape[0], widths[k + 1]), f"dropout mask {k + 1}")
        return widths


def contiguous(xp: Any, array: Any, dtype: Any) -> Any:
    """`array` as a C-contiguous array of `dtype`: itself when it is one already (every step's
    loader output), without the host time of a CuPy call that would return it unchanged."""
    if array.dtype == dtype and array.flags.c_contiguous:
        return array
    return xp.ascontiguousarray(array, dtype=dtype)


def require(array: Any, dtype: Any, shape: tuple, name: str) -> None:
    """A GpumlpError unless `array` is C-contiguous, of `dtype` and `shape`."""
    if array.dtype != dtype or tuple(array.shape) != tuple(shape) or not array.flags.c_contiguous:
        raise GpumlpError(f"the fused GPU step needs {name} as a C-contiguous {np.dtype(dtype)} "
                          f"array of shape {tuple(shape)}, got {array.dtype} {tuple(array.shape)}")


def sgd_scalars(cfg: Any, lr: float) -> tuple:
    """(lr, mu, wd, nesterov) as sgd_update declares them."""
    return (np.float32(lr), np.float32(cfg.momentum), np.float32(cfg.weight_decay),
            np.int32(cfg.nesterov))


def adam_scalars(cfg: Any, lr: float, t: int) -> tuple:
    """(decay, l2, b1, 1 - b1, b2, 1 - b2, step, vhs, eps) as adam_update declares them;
    each rounded to float32 from the same double that optim.adam_update computes."""
    decoupled = cfg.name == "adamw"
    decay = 1 - lr * cfg.weight_decay if decoupled and cfg.weight_decay else 1.0
    l2 = 0.0 if decoupled else cfg.weight_decay
    step = lr * (1 / (1 - cfg.beta1 ** t))
    vhs = 1 / (1 - cfg.beta2 ** t)
    values = (decay, l2, cfg.beta1, 1 - cfg.beta1, cfg.beta2, 1 - cfg.beta2, step, vhs, cfg.eps)
    return tuple(np.float32(v) for v in values)


def target_scalars(smoothing: float, c: int) -> tuple:
    """(y_on, y_off) of softmax_xent: Y = y_on + y_off on the label, y_off elsewhere, which is
    model.targets' (1 - e) onehot + e / c in float32 (and exactly 1 and 0 when e = 0)."""
    if not smoothing:
        return np.float32(1), np.float32(0)
    return np.float32(1 - smoothing), np.float32(smoothing / c)
