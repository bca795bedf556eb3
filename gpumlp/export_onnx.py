"""The trained MLP as an ONNX graph: the same forward pass, runnable by any ONNX runtime.

    input  "pixels"         float32 (N, 784)  the image rows scaled to [0, 1]: pixel / 255
    [Sub mean, Mul 1/std]                     only for data.normalize: standard, as in training
    A_k = MatMul(Z_{k-1}, W_k) + b_k          every layer, Z_0 = the (normalised) input
    Z_k = phi(A_k)                            hidden layers
    output "logits"         float32 (N, 10)   A_K, the last layer's
    output "probabilities"  float32 (N, 10)   Softmax(A_K) over the classes

The scaling by 1/255 stays outside the graph (callers feed x/255); the standardisation of
`normalize: standard` is inside it as two ops with the constants training used, so the
input is the same for every model. The input is an MNIST-style digit: predict's preprocessing
of a photo or drawing (preprocess.load_digit) is not in the graph. Weights are stored as
float32 whatever the training dtype. GELU is written out with primitive ops in its tanh form,
0.5 A (1 + tanh(sqrt(2/pi) (A + 0.044715 A^3))), the formula gpumlp trains with, computed as
gpumlp does, A sigmoid(2 sqrt(2/pi) (A + 0.044715 A^3)), so the graph needs only opset 17
(ONNX's own Gelu op arrives in opset 20).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .activations import GELU_C, GELU_K, LEAKY_SLOPE
from .config import Config
from .data import MNIST_MEAN, MNIST_STD
from .errors import GpumlpError, target_problem
from .model import Params

OPSET = 17
IR_VERSION = 8  # the IR that opset 17 came with: loadable by runtimes from 2022 on
PRODUCER = "gpumlp"  # the model's producer_name: how train --overwrite knows an export
PRODUCER_MARK = b"\x12" + bytes([len(PRODUCER)]) + PRODUCER.encode()  # field 2, serialised
INPUT, LOGITS, PROBABILITIES = "pixels", "logits", "probabilities"


# protobuf serialises at most 2 GiB, and an .onnx file is one message: the weights, stored as
# float32, and the graph's few kilobytes must fit
ONNX_MAX_BYTES = 2**31 - 1
GRAPH_MARGIN = 1 << 20


class ExportError(GpumlpError):
    """The model cannot be written in the requested format."""


def check_size(params: Params, source: str) -> None:
    """An ExportError, before any work, for weights too large for one .onnx file (the
    serialiser fails on them after a minute and a few copies of them in memory)."""
    size = 4 * sum(int(a.size) for a in (*params.W, *params.b))
    if size + GRAPH_MARGIN > ONNX_MAX_BYTES:
        raise ExportError(f"{source}: {size / 2**30:.2f} GiB of weights as float32, more than "
                          "the 2 GiB an ONNX file can hold; export a smaller model (this one "
                          "is used as model.npz: gpumlp predict and evaluate take it)")


class GraphBuilder:
    """Nodes and constant tensors of one graph, with fresh names for intermediate values."""

    def __init__(self):
        self.nodes, self.constants = [], []

    def const(self, name: str, value: np.ndarray | float) -> str:
        from onnx import numpy_helper
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output


def gelu_tanh(g: GraphBuilder, A: str, name: str) -> str:
    """A sigmoid(2 K (A + C A^3)) = 0.5 A (1 + tanh(K (A + C A^3))), op by op, as
    activations.gelu computes it."""
    A3 = g.op("Mul", [g.op("Mul", [A, A], f"{name}_sq"), A], f"{name}_cube")
    inner = g.op("Add", [A, g.op("Mul", [g.const(f"{name}_c", GELU_C), A3], f"{name}_cA3")],
                 f"{name}_inner")
    two_u = g.op("Mul", [g.const(f"{name}_2k", 2 * GELU_K), inner], f"{name}_2u")
    return g.op("Mul", [A, g.op("Sigmoid", [two_u], f"{name}_sigmoid")], name)


# activation name -> adds Z = phi(A) to the graph and returns the name of Z
ONNX_ACTIVATIONS: dict[str, Callable[[GraphBuilder, str, str], str]] = {
    "relu": lambda g, A, name: g.op("Relu", [A], name),
    "leaky_relu": lambda g, A, name: g.op("LeakyRelu", [A], name, alpha=LEAKY_SLOPE),
    "sigmoid": lambda g, A, name: g.op("Sigmoid", [A], name),
    "tanh": lambda g, A, name: g.op("Tanh", [A], name),
    "gelu": gelu_tanh,
}


def onnx_model(params: Params, config: Config):
    """An onnx.ModelProto computing logits and probabilities from pixel/255 rows."""
    from onnx import TensorProto, checker, helper

    activation = config.model.activation
    if activation not in ONNX_ACTIVATIONS:
        raise ExportError(f"activation {activation!r} has no ONNX form in this version; "
                          f"exportable: {', '.join(ONNX_ACTIVATIONS)}")
    g = GraphBuilder()
    Z = INPUT
    if config.data.normalize == "standard":  # as data.to_inputs: X -= mean; X *= 1/std
        Z = g.op("Sub", [Z, g.const("mnist_mean", MNIST_MEAN)], "centred")
        Z = g.op("Mul", [Z, g.const("mnist_inv_std", 1.0 / MNIST_STD)], "standardised")
    last = len(params.W)
    for k, (Wk, bk) in enumerate(zip(params.W, params.b), start=1):
        product = g.op("MatMul", [Z, g.const(f"W{k}", Wk)], f"Z{k - 1}W{k}")
        A = g.op("Add", [product, g.const(f"b{k}", bk)], LOGITS if k == last else f"A{k}")
        Z = A if k == last else ONNX_ACTIVATIONS[activation](g, A, f"Z{k}")
    g.op("Softmax", [LOGITS], PROBABILITIES, axis=-1)
    c = int(params.b[-1].shape[0])
    graph = helper.make_graph(
        g.nodes, "gpumlp_mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", int(params.W[0].shape[0])])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", c])
         for name in (LOGITS, PROBABILITIES)],
        initializer=g.constants)
    model = helper.make_model(graph, producer_name=PRODUCER, producer_version=__version__,
                              opset_imports=[helper.make_operatorsetid("", OPSET)],
                              doc_string=f"input '{INPUT}': pixel/255 in [0, 1], rows of 784")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"hidden": str(list(config.model.hidden_widths)),
                                   "activation": activation,
                                   "normalize": config.data.normalize,
                                   "input_scaling": "pixel / 255"})
    checker.check_model(model, full_check=True)
    return model


def float32_params(params: Params, source: str) -> Params:
    """The weights as float32, the type the graph stores them in; a CheckpointError naming
    the first array with a value past float32's range (a float64 model's), which the cast
    would make infinite and the graph's outputs NaN."""
    from .checkpoint import as_finite
    fix = "; the ONNX graph stores float32 weights, so this model cannot be exported"
    W = tuple(as_finite(w, f"W{k}", "float32", source, fix) for k, w in enumerate(params.W, 1))
    b = tuple(as_finite(v, f"b{k}", "float32", source, fix) for k, v in enumerate(params.b, 1))
    return Params(W, b)


def check_usable(params: Params, config: Config, source: str) -> None:
    """A CheckpointError (predict's "too large to use") when float32 weights give non-finite
    probabilities on probe images (blank, full, a ramp), as the graph would on real ones."""
    from .backend import CPU
    from .config import config_from_dict, config_to_dict
    from .predict import probabilities

    as_graph = config_to_dict(config)
    as_graph["train"]["dtype"] = "float32"                              # as the graph computes
    probes = np.stack([np.zeros(784), np.full(784, 255.0), np.linspace(0, 255, 784)])
    probabilities(params, config_from_dict(as_graph), probes, CPU, source)


def model_bytes(params: Params, config: Config) -> bytes:
    """The serialised ONNX model, ready to write to a .onnx file."""
    return onnx_model(params, config).SerializeToString()


def made_by_export(path: Path) -> bool:
    """Whether `path` is a plain file (not a link) that `gpumlp export` wrote: a serialised
    ONNX model whose producer_name is "gpumlp". Read from its first bytes, as protobuf writes
    fields in order: 0x08 and ir_version's varint (field 1), then PRODUCER_MARK (field 2)."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(11 + len(PRODUCER_MARK))
    except OSError:  # unreadable: not known to be gpumlp's, so kept
        return False
    end = next((i for i in range(1, min(len(head), 11)) if head[i] < 0x80), None)
    return head[:1] == b"\x08" and end is not None and head[end + 1:].startswith(PRODUCER_MARK)


def is_npz(path: Path) -> bool:
    """Whether `path` is named .npz or holds one (a zip with .npy members): a model or
    checkpoint."""
    if path.suffix.lower() == ".npz":
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(name.endswith(".npy") for name in names)


def check_target(target: Path, model_path: Path, overwrite: bool, named: bool) -> None:
    """Refuse to write the export over the model, over any .npz, over what is not a plain file,
    or over an existing file unless `overwrite`; `named`: the user gave `target` with --out."""
    where = f"--out {target}" if named else f"{target} (the default --out)"
    if target.exists() and os.path.samefile(target, model_path):
        raise ExportError(f"{where}: is the model being exported; give --out a new name "
                          "ending in .onnx")
    if target.exists() and not target.is_file():
        raise ExportError(f"{where}: {target_problem(target, overwrite)}; give --out another "
                          "name")
    if is_npz(target):  # only a plain file is opened (a FIFO would block)
        raise ExportError(f"{where}: gpumlp never writes an export over or as a .npz file "
                          "(models and checkpoints), even with --overwrite, whatever its name; "
                          "give --out another name ending in .onnx")
    problem = target_problem(target, overwrite)
    if problem is not None:
        raise ExportError(f"{where}: {problem}, or give --out another name")
