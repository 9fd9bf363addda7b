"""TokenGather on ONNX Runtime's CPU provider, through onnxruntime-extensions Python custom ops.

Exported models carry ``TokenGather`` nodes in domain ``trt.plugins`` (for the TensorRT parser). ONNX Runtime
only runs Python ops registered in domain ``ai.onnx.contrib``, with a fixed signature per op type, float16
not supported and a fixed number of outputs. make_session therefore rewrites a COPY of the model:

    tokens --Cast(float)--> TokenGather_1out / TokenGather_2out (ai.onnx.contrib) --CastLike(tokens)--> out
    scores --Cast(float)--^

The casts are exact (float16 -> float32 -> float16 round-trips; float16 scores keep their order and their
ties), so the result equals the TensorRT plugin bit for bit. CastLike needs ai.onnx opset >= 15.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import signal
import threading
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from trt_plugins import ATTR_KEEP, ATTR_WITH_INDICES, ONNX_DOMAIN, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

CONTRIB_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions serves Python ops from
CONTRIB_OP_TYPES = {False: f"{PLUGIN_NAME}_1out", True: f"{PLUGIN_NAME}_2out"}
MIN_OPSET = 15  # CastLike


def token_gather_numpy(tokens: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """TokenGather in numpy: tokens [B, N, C], scores [B, N-1] -> ([B, 1+K, C], int32 indices [B, K]).

    A stable sort of the negated scores orders by descending score with ties to the lower index; NaN is
    mapped to +inf first and then placed ahead of it, matching torch.sort (NaN largest) and the CUDA kernel.
    """
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"{ATTR_KEEP} = {k} must lie in [1, N - 1 = {scores.shape[1]}]")
    wide = scores.astype(np.float64)
    nan = np.isnan(wide)
    order = np.lexsort((-np.where(nan, np.inf, wide), ~nan), axis=-1)  # last key first: NaNs, then by score
    indices = order[:, :k]
    kept = np.take_along_axis(tokens[:, 1:], indices[:, :, None], axis=1)
    return np.concatenate([tokens[:, :1], kept], axis=1), indices.astype(np.int32)


_registered = False


def register_custom_ops() -> None:
    """Register the two Python custom ops with onnxruntime-extensions (once per process)."""
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    attrs = {ATTR_KEEP: PyCustomOpDef.dt_int64, ATTR_WITH_INDICES: PyCustomOpDef.dt_int64,
             "plugin_version": PyCustomOpDef.dt_string, "plugin_namespace": PyCustomOpDef.dt_string}
    inputs = [PyCustomOpDef.dt_float, PyCustomOpDef.dt_float]

    @onnx_op(op_type=CONTRIB_OP_TYPES[False], inputs=inputs, outputs=[PyCustomOpDef.dt_float], attrs=attrs)
    def token_gather_1out(tokens, scores, **attributes):
        return token_gather_numpy(tokens, scores, attributes[ATTR_KEEP])[0]

    @onnx_op(op_type=CONTRIB_OP_TYPES[True], inputs=inputs,
             outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32], attrs=attrs)
    def token_gather_2out(tokens, scores, **attributes):
        return token_gather_numpy(tokens, scores, attributes[ATTR_KEEP])

    _registered = True


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _rewrite_node(node: onnx.NodeProto, index: int) -> list[onnx.NodeProto]:
    """Cast + contrib op + CastLike nodes replacing one trt.plugins TokenGather node."""
    keep = _attribute(node, ATTR_KEEP, None)
    with_indices = int(_attribute(node, ATTR_WITH_INDICES, 0))
    if keep is None or len(node.input) != 2 or with_indices not in (0, 1) or len(node.output) != 1 + with_indices:
        raise ValueError(f"TokenGather node {node.name or index!r} needs attribute {ATTR_KEEP}, 2 inputs and "
                         f"1 + {ATTR_WITH_INDICES} outputs (got {ATTR_WITH_INDICES}={with_indices}, "
                         f"{len(node.output)} outputs)")
    tokens, scores = node.input
    prefix = f"{node.name or PLUGIN_NAME}_{index}_ort"
    tokens_f32, scores_f32, out_f32 = f"{prefix}_tokens_f32", f"{prefix}_scores_f32", f"{prefix}_out_f32"
    version = _attribute(node, "plugin_version", PLUGIN_VERSION.encode())
    namespace = _attribute(node, "plugin_namespace", PLUGIN_NAMESPACE.encode())
    gather = helper.make_node(
        CONTRIB_OP_TYPES[bool(with_indices)], [tokens_f32, scores_f32], [out_f32, *node.output[1:]],
        name=f"{prefix}_gather", domain=CONTRIB_DOMAIN,
        # Every declared attribute is set, so the Python op never sees a missing one.
        **{ATTR_KEEP: int(keep), ATTR_WITH_INDICES: with_indices,
           "plugin_version": version.decode() if isinstance(version, bytes) else version,
           "plugin_namespace": namespace.decode() if isinstance(namespace, bytes) else namespace})
    return [
        helper.make_node("Cast", [tokens], [tokens_f32], name=f"{prefix}_cast_tokens", to=TensorProto.FLOAT),
        helper.make_node("Cast", [scores], [scores_f32], name=f"{prefix}_cast_scores", to=TensorProto.FLOAT),
        gather,
        helper.make_node("CastLike", [out_f32, tokens], [node.output[0]], name=f"{prefix}_cast_back"),
    ]


def _rewrite_graph(graph: onnx.GraphProto, counter: list[int]) -> None:
    nodes = []
    for node in graph.node:
        for attribute in node.attribute:  # subgraphs (If/Loop/Scan bodies)
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rewrite_graph(subgraph, counter)
        if node.op_type == PLUGIN_NAME and node.domain == ONNX_DOMAIN:
            counter[0] += 1
            nodes.extend(_rewrite_node(node, counter[0]))
        else:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)


def to_onnxruntime_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of model whose trt.plugins TokenGather nodes run on onnxruntime-extensions (model is unchanged)."""
    rewritten = copy.deepcopy(model)
    counter = [0]
    _rewrite_graph(rewritten.graph, counter)
    if counter[0] == 0:
        return rewritten
    default_opset = next((o.version for o in rewritten.opset_import if o.domain in ("", "ai.onnx")), None)
    if default_opset is None or default_opset < MIN_OPSET:
        raise ValueError(f"TokenGather on ONNX Runtime needs ai.onnx opset >= {MIN_OPSET} (CastLike), "
                         f"the model imports {default_opset}")
    opsets = [o for o in rewritten.opset_import if o.domain not in (ONNX_DOMAIN, CONTRIB_DOMAIN)]
    opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    rewritten.ClearField("opset_import")
    rewritten.opset_import.extend(opsets)
    return rewritten


@contextlib.contextmanager
def sigint_held():
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it to the handler that was in place.

    The TokenGather op is Python code that ONNX Runtime calls from C++. Python raises KeyboardInterrupt at the
    next bytecode its main thread runs, which during ``session.run`` is inside that op: the exception then has
    to cross pybind11 and ONNX Runtime's C++ frames, and can end in std::terminate (exit 134) instead of an
    orderly unwind. Holding the signal for the length of one run (milliseconds to seconds) keeps Ctrl-C a
    plain KeyboardInterrupt raised from Python. Signal handlers can only be changed on the main thread; other
    threads never receive KeyboardInterrupt and run unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, received[0])
    elif received and previous != signal.SIG_IGN:
        raise KeyboardInterrupt


def make_session(model: onnx.ModelProto, providers: Sequence[str] = ("CPUExecutionProvider",),
                 session_options=None):
    """An onnxruntime.InferenceSession running model, TokenGather nodes included (on the CPU, in Python).

    Its ``run`` holds Ctrl-C until ONNX Runtime returns (see ``sigint_held``).
    """
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    register_custom_ops()
    options = session_options if session_options is not None else ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(to_onnxruntime_model(model).SerializeToString(), options,
                                   providers=list(providers))
    run = session.run

    @functools.wraps(run)
    def run_holding_sigint(*args, **kwargs):
        with sigint_held():
            return run(*args, **kwargs)

    session.run = run_holding_sigint
    return session


def make_token_gather_model(k: int, with_indices: bool = False, tokens_type: int = TensorProto.FLOAT,
                            scores_type: int = TensorProto.FLOAT, num_tokens: int | str = "N",
                            channels: int | str = "C", opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """A one-node model, inputs ``tokens`` [B, N, C] and ``scores`` [B, N-1], outputs ``kept`` (+ ``indices``).

    The node is exactly what the export stage emits; tests use it to drive every backend.
    """
    patches = num_tokens - 1 if isinstance(num_tokens, int) else f"{num_tokens}-1"
    outputs = [helper.make_tensor_value_info("kept", tokens_type, ["B", k + 1, channels])]
    if with_indices:
        outputs.append(helper.make_tensor_value_info("indices", TensorProto.INT32, ["B", k]))
    node = helper.make_node(PLUGIN_NAME, ["tokens", "scores"], [o.name for o in outputs], name="token_gather",
                            domain=ONNX_DOMAIN, plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE,
                            **{ATTR_KEEP: k, ATTR_WITH_INDICES: int(with_indices)})
    graph = helper.make_graph(
        [node], "token_gather",
        [helper.make_tensor_value_info("tokens", tokens_type, ["B", num_tokens, channels]),
         helper.make_tensor_value_info("scores", scores_type, ["B", patches])],
        outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid(ONNX_DOMAIN, 1)], ir_version=ir_version)
