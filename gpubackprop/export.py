"""A trained MLP as an ONNX graph, for serving stacks (onnxruntime, Triton, ...).

One Gemm per layer (y = x W^T + b, W as stored: transB=1) and the hidden
activation after each but the last; the model's input transform and regression
target scaling are folded into the first and last Gemm, so the graph costs no more
than the network:

    (x - shift) / divide, then W x + b   =   (W / divide) x + (b - W (shift / divide))
    (W x + b) * std + mean               =   (std W) x + (std b + mean)

Missing numbers are filled as the model was trained to fill them (Where(IsNaN(x),
fill, x)) before the first Gemm. Outputs are named as scikit-learn's converted
models name them (skl2onnx with zipmap=False): a classifier gives ``label`` (the
original class values: int64, float or string) and ``probabilities`` (softmax,
columns in ``model.target.classes`` order, or 0..K-1); a binary_cross_entropy
model (binary or multilabel) gives ``label`` (n, outputs) of 0 / 1 and
``probabilities`` (a sigmoid per output); a regressor gives ``variable`` (n,
outputs): e^z for poisson, the mean count. The batch dimension is dynamic; float32 models export
float32, float64 models float64.

Text (category) columns are not exported: their one-hot encoding would need a
string input per column. Needs the ``onnx`` extra (``pip install 'gpubackprop[onnx]'``).
"""

import numpy as np

from . import tabular
from .nn.activations import GELU_C, GELU_K, LEAKY_SLOPE
from .state import atomic_write

OPSET = 17  # onnxruntime 1.14 and later; everything below is in it
HIDDEN = {  # activation name -> ONNX nodes (input name, output name, prefix) -> [NodeProto]
    "identity": lambda h, x, y, p: [h.make_node("Identity", [x], [y])],
    "relu": lambda h, x, y, p: [h.make_node("Relu", [x], [y])],
    # PRelu with the slope as a tensor of the model's dtype: LeakyRelu's alpha is a float32
    # attribute, 0.01 off by 2e-10 in a float64 model
    "leaky_relu": lambda h, x, y, p: [h.make_node("PRelu", [x, "slope"], [y])],
    "tanh": lambda h, x, y, p: [h.make_node("Tanh", [x], [y])],
    "sigmoid": lambda h, x, y, p: [h.make_node("Sigmoid", [x], [y])],
    "silu": lambda h, x, y, p: [h.make_node("Sigmoid", [x], [f"{p}_s"]), h.make_node("Mul", [x, f"{p}_s"], [y])],
}


def _gelu(h, x, y, p):
    """0.5 z (1 + tanh(c z (1 + k z^2))), the tanh form gpubackprop trains with (opset 17 has no Gelu)."""
    return [h.make_node("Mul", [x, x], [f"{p}_z2"]), h.make_node("Mul", [f"{p}_z2", "gelu_k"], [f"{p}_kz2"]),
            h.make_node("Add", [f"{p}_kz2", "one"], [f"{p}_u"]), h.make_node("Mul", [f"{p}_u", x], [f"{p}_zu"]),
            h.make_node("Mul", [f"{p}_zu", "gelu_c"], [f"{p}_v"]), h.make_node("Tanh", [f"{p}_v"], [f"{p}_t"]),
            h.make_node("Add", [f"{p}_t", "one"], [f"{p}_w"]), h.make_node("Mul", [f"{p}_w", x], [f"{p}_xw"]),
            h.make_node("Mul", [f"{p}_xw", "half"], [y])]


HIDDEN["gelu"] = _gelu


def to_onnx(model, path=None, opset=None, classes=None):
    """The ONNX ModelProto of ``model`` (an MLP), written to ``path`` where given;
    ``classes``: a classifier's labels where the model has no target (the scikit-learn
    estimators' ``classes_``)."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'gpubackprop[onnx]'") from None
    dtype = np.dtype(model.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"ONNX export takes float32 and float64 models, not {model.dtype}")
    if model.inputs is not None and any(c["kind"] != "number" for c in model.inputs.columns):
        text = [c["name"] for c in model.inputs.columns if c["kind"] != "number"]
        raise ValueError(f"the model's text columns {text} cannot be exported to ONNX yet (their one-hot encoding "
                         "would need a string input each); train without them, or one-hot them yourself")
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    state = {k: np.asarray(v, np.float64) for k, v in model.state_dict().items()}
    layers = len(model.sizes) - 1
    weights = [state[f"layers.{l}.weight"] for l in range(layers)]
    biases = [state[f"layers.{l}.bias"] for l in range(layers)]
    inits, nodes, x = [], [], "X"
    if model.inputs is not None:  # fold (x - shift) / divide into the first layer
        shift, divide = model.inputs.shift, model.inputs.divide
        biases[0] = biases[0] - weights[0] @ (shift / divide)
        weights[0] = weights[0] / divide
        fills = np.array([np.nan if c["fill"] is None else c["fill"] for c in model.inputs.columns])
        if not np.isnan(fills).all():
            inits.append(numpy_helper.from_array(np.where(np.isnan(fills), 0.0, fills).astype(dtype), "fill"))
            nodes += [helper.make_node("IsNaN", ["X"], ["missing"]),
                      helper.make_node("Where", ["missing", "fill", "X"], ["X_filled"])]
            x = "X_filled"
    _fold_target(model, weights, biases)
    constants = {"gelu": (("one", 1.0), ("half", 0.5), ("gelu_c", GELU_C), ("gelu_k", GELU_K)),
                 "leaky_relu": (("slope", LEAKY_SLOPE),)}.get(model.activation, ()) if layers > 1 else ()
    for name, value in constants:
        inits.append(numpy_helper.from_array(np.array(value, dtype), name))
    for l in range(layers):
        inits += [numpy_helper.from_array(weights[l].astype(dtype), f"W{l}"),
                  numpy_helper.from_array(biases[l].astype(dtype), f"b{l}")]
        z = f"z{l}"
        nodes.append(helper.make_node("Gemm", [x, f"W{l}", f"b{l}"], [z], transB=1))
        if l < layers - 1:
            x = f"a{l}"
            nodes += HIDDEN[model.activation](helper, z, x, f"g{l}")
        else:
            x = z
    outputs = _outputs(helper, numpy_helper, model, x, elem, nodes, inits, classes)
    graph = helper.make_graph(nodes, "gpubackprop_mlp", [helper.make_tensor_value_info("X", elem, ["N", model.sizes[0]])],
                              outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset or OPSET)],
                              producer_name="gpubackprop")
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        atomic_write(path, proto.SerializeToString())
    return proto


def _fold_target(model, weights, biases):
    """A regression target's y * std + mean, folded into the last layer (in place)."""
    target = model.target
    if target is None or target.task != "regression":
        return
    if model.criterion.output != "identity" and (np.any(target.mean != 0) or np.any(target.std != 1)):
        raise ValueError(f"a {model.loss} model's outputs pass through {model.criterion.output}, so a scaled "
                         "target cannot be folded into its last layer; train it on unscaled targets")
    weights[-1], biases[-1] = weights[-1] * target.std, biases[-1] * target.std + target.mean


def _outputs(helper, numpy_helper, model, logits, elem, nodes, inits, classes):
    """The graph's outputs from the last layer's ``logits``: label and probabilities, or variable."""
    output, width = model.criterion.output, model.sizes[-1]
    if output in ("identity", "exp"):
        nodes.append(helper.make_node("Identity" if output == "identity" else "Exp", [logits], ["variable"]))
        return [helper.make_tensor_value_info("variable", elem, ["N", width])]
    int64 = helper.np_dtype_to_tensor_dtype(np.dtype(np.int64))
    if output == "sigmoid":
        inits.append(numpy_helper.from_array(np.zeros((), helper.tensor_dtype_to_np_dtype(elem)), "zero"))
        nodes += [helper.make_node("Sigmoid", [logits], ["p"]), helper.make_node("Greater", [logits, "zero"], ["positive"])]
        if not model.binary_unit:  # per output: label [z > 0] (int64, as predict gives it) and sigmoid(z)
            nodes += [helper.make_node("Identity", ["p"], ["probabilities"]),
                      helper.make_node("Cast", ["positive"], ["label"], to=int64)]
            return [helper.make_tensor_value_info("label", int64, ["N", width]),
                    helper.make_tensor_value_info("probabilities", elem, ["N", width])]
        # one logistic unit of a two-class target: [1 - p, p] and the class [z > 0] names
        inits += [numpy_helper.from_array(np.ones((), helper.tensor_dtype_to_np_dtype(elem)), "unit"),
                  numpy_helper.from_array(np.array([-1], np.int64), "flat")]
        nodes += [helper.make_node("Sub", ["unit", "p"], ["q"]),
                  helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
                  helper.make_node("Cast", ["positive"], ["positive_id"], to=int64),
                  helper.make_node("Reshape", ["positive_id", "flat"], ["label_id"])]
        width = 2
    else:
        nodes += [helper.make_node("Softmax", [logits], ["probabilities"], axis=1),
                  helper.make_node("ArgMax", [logits], ["label_id"], axis=1, keepdims=0)]
    if classes is None:
        classes = list(range(model.sizes[-1])) if model.target is None else model.target.classes
    classes = [tabular.label_value(c) for c in classes]
    if all(isinstance(c, int) for c in classes):
        table, label_elem = np.array(classes, np.int64), int64
    elif all(isinstance(c, (int, float)) for c in classes):
        table, label_elem = np.array(classes, np.float64), helper.np_dtype_to_tensor_dtype(np.dtype(np.float64))
    else:
        table, label_elem = np.array([str(c) for c in classes], dtype=object), 8  # onnx.TensorProto.STRING
    inits.append(numpy_helper.from_array(table, "classes"))
    nodes.append(helper.make_node("Gather", ["classes", "label_id"], ["label"], axis=0))
    return [helper.make_tensor_value_info("label", label_elem, ["N"]),
            helper.make_tensor_value_info("probabilities", elem, ["N", width])]
