"""INT8 with explicit Q/DQ nodes for TensorRT (strongly typed, 10.x and 11.x) and ONNX Runtime.

What is quantised: only the inputs of the matrix products that carry weights (MatMul with a constant B,
Gemm, Conv: qkv, attention projection, MLP, patch embedding, head), symmetric int8 (zero point 0), weights
per output channel, activations per tensor. What is known to break ViT accuracy is left alone: residual
Adds, LayerNorm, Softmax, GELU, the token selection (TopK/GatherND or TokenGather) and every node
under the method's ``float_scopes`` (DynamicViT: the prediction modules, whose scores decide which tokens
survive). The activation x activation products of attention (q.k^T, attn.v) stay float unless asked.

Where the Q/DQ go: onto the mixed float16 graph (``export.deploy.deploy_copy(model, keep, "fp16")``:
float16 weights and activations; LayerNorm, the attention softmax and the prediction modules float32).
TensorRT's explicit quantization is meant to be used with strong typing (TensorRT Developer Guide,
"Explicit Quantization"; 11.x builds every network strongly typed), where every tensor keeps the type the
graph gives it: Q/DQ on the float32 graph would run everything not quantised (softmax, LayerNorm, GELU, the
Adds) in float32, slower than the float16 engine. On the mixed graph the quantised products run in int8 and
the rest exactly as in the validated float16 graph. TensorRT's ONNX parser gives a DequantizeLinear the
type of its scale in a strongly typed network, so a float16 consumer gets float16 scales; QuantizeLinear
takes float16 input from ONNX opset 19 on, so such graphs are raised to opset 19.

Calibration measures ranges on the float32 native-selection graph on ONNX Runtime's CPU provider (full
precision ranges; float16 inference on the CPU would be slow), with NVIDIA ModelOpt
(``modelopt.onnx.quantization.quantize``, optional) or ONNX Runtime's ``quantize_static`` (QDQ format).
``transplant_qdq`` then puts the identical Q/DQ (scales, int8 weights) onto any other export of the same
model: the mixed float16 graph, its debug twin with kept-token outputs, the TokenGather plugin flavour.
Exported modules keep their node names across flavours and precisions.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import logging
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from calibration.data import array_hash
from calibration.onnx_graph import FLOAT_TYPES, default_opset, element_types, static_batch
from compress.plumbing.errors import PipelineError

METHODS = ("auto", "modelopt", "ort")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
WEIGHTED_OP_TYPES = ("MatMul", "Gemm", "Conv")
QDQ_OP_TYPES = ("QuantizeLinear", "DequantizeLinear")
# Ops that read only a tensor's shape: a quantiser may route them through a DQ output (ONNX Runtime does for the
# batch-size Shape nodes of a dynamic-batch graph), which is no quantised use of the values.
SHAPE_ONLY_OP_TYPES = ("Shape", "Size")
DYNAMICVIT_FLOAT_SCOPES = ("/score_predictor",)  # the exporter's scope of DynamicViT's prediction modules
FLOAT16_QDQ_MIN_OPSET = 19  # QuantizeLinear / DequantizeLinear accept float16 from opset 19 on
QUANTIZER_PACKAGES = ("onnxruntime.quantization", "modelopt")  # whose chatter ``quiet`` mutes
MODELOPT_INSTALL = "pip install 'nvidia-modelopt[onnx]'  (or pip install -e '.[quant]')"


class QuantizationError(PipelineError):
    """INT8 quantisation that cannot run (missing tool, unusable graph or calibration set)."""


@dataclass(frozen=True)
class Int8Options:
    """Where Q/DQ goes and how ranges are calibrated.

    calibration: "minmax" (max |x| over the set), "percentile" (ONNX Runtime only; ``percentile`` of |x|),
    "entropy" (KL divergence; slow). ``quantize_predictors``: also quantise the products under the float
    scopes (DynamicViT: the prediction modules, whose scores choose the tokens); ``quantize_attention``: also
    the q.k^T and attn.v products;
    ``quantize_head``: the classifier. ``quantize_outputs`` (method "ort" only): also quantise each product's
    output, which lets ONNX Runtime's CPU provider fuse it into an integer kernel (QLinearMatMul); TensorRT
    fuses input-only Q/DQ by itself, so the default leaves outputs float.
    """

    calibration: str = "percentile"
    percentile: float = 99.999
    quantize_predictors: bool = False
    quantize_attention: bool = False
    quantize_head: bool = True
    per_channel: bool = True
    quantize_outputs: bool = False  # ONNX Runtime only: Q/DQ on the products' outputs too (see docs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Placement:
    """The nodes whose inputs get Q/DQ, and the ones left float32 on purpose (with why)."""

    quantize: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)  # node name -> reason


def initializer_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {i.name for i in graph.initializer}
    return names | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def plan_placement(model: onnx.ModelProto, options: Int8Options = Int8Options(),
                   float_scopes: tuple[str, ...] = DYNAMICVIT_FLOAT_SCOPES) -> Placement:
    """Choose the nodes to quantise in an exported graph (pure: reads node names and inputs).

    Weighted products are MatMul whose second input is a constant, every Gemm and Conv. A node whose name
    contains one of ``float_scopes`` (exporter scopes such as ``"/score_predictor"``) stays float unless
    ``options.quantize_predictors``.
    """
    constants = initializer_names(model)
    placement = Placement()
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OP_TYPES:
            continue
        if not node.name:
            raise QuantizationError(f"unnamed {node.op_type} node: Q/DQ placement needs the exporter's node names")
        weighted = node.op_type != "MatMul" or node.input[1] in constants
        scope = next((scope for scope in float_scopes if scope in node.name), None)
        if scope is not None and not options.quantize_predictors:
            placement.kept_float[node.name] = f"in float scope {scope} (its outputs select the kept tokens)"
        elif not weighted and not options.quantize_attention:
            placement.kept_float[node.name] = "attention product of two activations"
        elif node.op_type == "Gemm" and "/head" in node.name and not options.quantize_head:
            placement.kept_float[node.name] = "classifier head"
        else:
            placement.quantize.append(node.name)
    if not placement.quantize:
        raise QuantizationError("no MatMul/Gemm/Conv node to quantise in this graph")
    return placement


def float_op_types(model: onnx.ModelProto, placement: Placement) -> list[str]:
    """Op types with no quantised node: everything that stays float32."""
    quantized = set(placement.quantize)
    quantized_types = {n.op_type for n in model.graph.node if n.name in quantized}
    return sorted({n.op_type for n in model.graph.node} - quantized_types - set(QDQ_OP_TYPES))


def calibration_batches(images: np.ndarray, batch: int | None, max_batch: int = 8) -> list[np.ndarray]:
    """Split the calibration set into feeds the graph accepts (a static batch drops the remainder)."""
    size = batch or min(max_batch, len(images))
    count = len(images) // size
    if count == 0:
        raise QuantizationError(f"{len(images)} calibration images are fewer than the graph's batch of {size}")
    return [np.ascontiguousarray(images[i * size:(i + 1) * size], dtype=np.float32) for i in range(count)]


def check_images(model: onnx.ModelProto, images: np.ndarray) -> None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    expected = tuple(d.dim_value for d in dims[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise QuantizationError(f"calibration images {tuple(images.shape)} do not fit the graph input [B, {expected}]")
    if not np.isfinite(images).all():
        raise QuantizationError("calibration images contain NaN or infinity")


def modelopt_available() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except Exception:  # an install that imports but breaks (wrong onnx pin) counts as absent
        return False
    return True


def resolve_method(method: str) -> str:
    if method not in METHODS:
        raise QuantizationError(f"int8 method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "modelopt" if modelopt_available() else "ort"
    if method == "modelopt" and not modelopt_available():
        raise QuantizationError(f"--int8 method 'modelopt' needs NVIDIA ModelOpt: {MODELOPT_INSTALL}")
    return method


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None. (calibration may not import export.on_target.environment, the
    home of the export manifest's tool versions; the INT8 report needs only these two.)"""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_dirs(packages: tuple[str, ...]) -> tuple[str, ...]:
    dirs = []
    for package in packages:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(spec.submodule_search_locations)
    return tuple(dirs)


class _FromPackages(logging.Filter):
    """Drops records emitted from source files under ``dirs`` (and keeps every other record)."""

    def __init__(self, dirs: tuple[str, ...]):
        super().__init__()
        self.dirs = dirs

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self.dirs)


def _silent_print(*args, **kwargs) -> None:
    """Stands in for ``print`` inside the quantiser's own modules while ``quiet`` is active."""


@contextlib.contextmanager
def quiet(packages: tuple[str, ...] = QUANTIZER_PACKAGES):
    """Mute the quantisers' chatter, and only theirs (stdout belongs to the build summary).

    ONNX Runtime's quantiser warns through the root logger (``logging.warning``) and its calibrators print
    progress with ``print``: records are dropped by the source file they come from (no logger level
    changes), the packages' own loggers are raised to ERROR, and ``print`` is shadowed in the packages'
    loaded modules only. Everything is restored on exit; nothing else in the process is affected.
    """
    dirs = _package_dirs(packages)
    if not dirs:
        yield
        return
    drop = _FromPackages(dirs)
    root = logging.getLogger()
    loggers = [logging.getLogger(package) for package in packages]
    levels = [logger.level for logger in loggers]
    modules = [module for name, module in list(sys.modules.items())
               if module is not None and any(name == package or name.startswith(package + ".") for package in packages)
               and not hasattr(module, "print")]
    root.addFilter(drop)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    for module in modules:
        module.print = _silent_print
    try:
        yield
    finally:
        for module in modules:
            del module.print
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        root.removeFilter(drop)


def calibration_stride(num_batches: int, batch: int, max_images: int = 32) -> int:
    """The largest divisor of ``num_batches`` whose batches hold at most ``max_images`` images (at least 1)."""
    limit = max(1, max_images // batch)
    return max(d for d in range(1, min(limit, num_batches) + 1) if num_batches % d == 0)


def quantize_with_ort(model: onnx.ModelProto, batches: list[np.ndarray], placement: Placement,
                      options: Int8Options, workdir: Path) -> onnx.ModelProto:
    """ONNX Runtime ``quantize_static``: QDQ, symmetric int8 activations and weights, weights per channel."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Feeds(CalibrationDataReader):
        """The calibration batches; ONNX Runtime reads them one stride at a time (bounded memory)."""

        def __init__(self):
            self.feeds, self.position, self.end = [{"images": b} for b in batches], 0, len(batches)

        def __len__(self):
            return len(self.feeds)

        def set_range(self, start_index: int, end_index: int):
            self.position, self.end = start_index, end_index

        def get_next(self):
            if self.position >= min(self.end, len(self.feeds)):
                return None
            self.position += 1
            return self.feeds[self.position - 1]

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[options.calibration]
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True,
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "DedicatedQDQPair": True,
             # Every calibrated tensor of a stride is held in memory at once (DeiT-S: ~85 MB per image), so
             # calibrate in strides of at most STRIDE_IMAGES images. (Not CalibMaxIntermediateOutputs: in
             # onnxruntime 1.31 the MinMax calibrator drops the data it clears.)
             "CalibStridedMinMax": calibration_stride(len(batches), len(batches[0])),
             # biases stay float: TensorRT's DequantizeLinear takes int8/fp8/int4, not int32
             "QuantizeBias": False,
             # inputs only: a Q/DQ on a product's output adds a rounding before the bias and residual Adds
             "OpTypesToExcludeOutputQuantization": [] if options.quantize_outputs else list(WEIGHTED_OP_TYPES)}
    if options.calibration == "percentile":
        extra["CalibPercentile"] = options.percentile
    source, target = workdir / "fp32.onnx", workdir / "int8.onnx"
    onnx.save(model, str(source))
    with quiet():  # the calibrators print progress on stdout and warn about pre-processing on the root logger
        quantize_static(str(source), str(target), Feeds(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(WEIGHTED_OP_TYPES), nodes_to_quantize=placement.quantize,
                        per_channel=options.per_channel, reduce_range=False, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method, extra_options=extra)
    return onnx.load(str(target))


def quantize_with_modelopt(model: onnx.ModelProto, images: np.ndarray, batch: int | None, placement: Placement,
                           options: Int8Options, workdir: Path) -> onnx.ModelProto:
    """NVIDIA ModelOpt's ONNX PTQ (TensorRT's Q/DQ rules), calibrated on ONNX Runtime's CPU provider."""
    from modelopt.onnx.quantization import quantize

    if options.calibration not in ("minmax", "entropy"):
        raise QuantizationError(f"ModelOpt calibrates with 'minmax' or 'entropy', not {options.calibration!r}")
    if options.quantize_outputs:
        raise QuantizationError("quantize_outputs is an ONNX Runtime CPU option: use method 'ort'")
    source, target = workdir / "fp32.onnx", workdir / "int8.onnx"
    onnx.save(model, str(source))
    count = len(images) if batch is None else (len(images) // batch) * batch
    with quiet():
        quantize(str(source), quantize_mode="int8", calibration_data={"images": images[:count]},
                 calibration_method="max" if options.calibration == "minmax" else "entropy",
                 calibration_eps=["cpu"], op_types_to_quantize=list(WEIGHTED_OP_TYPES),
                 nodes_to_exclude=[re.escape(name) for name in placement.kept_float], high_precision_dtype="fp32",
                 output_path=str(target), log_level="WARNING")
    return onnx.load(str(target))


def count_qdq(model: onnx.ModelProto) -> dict:
    """Q/DQ statistics: quantised tensors (one DequantizeLinear each), activation pairs (Q + DQ), nodes fed."""
    nodes = model.graph.node
    fed = {chain.consumer for chain in qdq_chains(model)}
    return {"dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in nodes),
            "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in nodes),
            "quantized_nodes": len(fed)}


def check_float32_weights(model: onnx.ModelProto) -> None:
    """Calibration runs on the float32 export: refuse a graph whose weighted products take another type."""
    types = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        weight = node.input[1] if node.op_type in WEIGHTED_OP_TYPES and len(node.input) > 1 else None
        if weight in types and types[weight] != onnx.TensorProto.FLOAT:
            raise QuantizationError(
                f"node {node.name!r} has {onnx.TensorProto.DataType.Name(types[weight]).lower()} weights: calibrate "
                "the float32 export, then transplant_qdq places the result on the mixed float16 graph")


def quantize_for_export(
    fp32_native: onnx.ModelProto,
    calibration_images: np.ndarray,
    method: str = "auto",
    options: Int8Options = Int8Options(),
    calibration_info: dict | None = None,
    float_scopes: tuple[str, ...] = DYNAMICVIT_FLOAT_SCOPES,
) -> tuple[onnx.ModelProto, dict]:
    """Calibrate the float32 native-selection export and give it explicit INT8 Q/DQ.

    fp32_native: ``export.onnx_export.export_onnx(deploy_copy(model, keep, "fp32"), "native", ...)``
    (input ``images`` [B, C, H, W] float32, static or dynamic B; with or without kept-index outputs).
    calibration_images: [N, C, H, W] float32, preprocessed like the model's eval inputs (N >= the static B).
    method: "auto" (ModelOpt when it imports, else ONNX Runtime), "modelopt" or "ort".
    float_scopes: exporter scopes whose products stay float (the method's token-choice modules; the default
    is DynamicViT's prediction modules).

    Returns (the float32 graph with Q/DQ, a report dict) where the report holds: method, calibration (method
    name and options), tool versions, calibration set hash/size/source (from ``calibration_info`` or hashed
    here), quantised node names, float node names with reasons, float op types, and Q/DQ counts. The input
    graph is left unchanged. The graph to deploy on TensorRT is the mixed float16 export with these Q/DQ:
    ``transplant_qdq(quantized, export_onnx(deploy_copy(model, keep, "fp16"), flavour, ...))`` (likewise its
    debug twin and the plugin flavour). Raises ``QuantizationError`` (a PipelineError).
    """
    if options.calibration not in CALIBRATION_METHODS:
        raise QuantizationError(f"calibration must be one of {CALIBRATION_METHODS}, got {options.calibration!r}")
    if any(n.op_type == "TokenGather" for n in fp32_native.graph.node):
        raise QuantizationError("quantise the native-selection export, then transplant_qdq onto the plugin flavour")
    check_float32_weights(fp32_native)
    images = np.asarray(calibration_images, dtype=np.float32)
    check_images(fp32_native, images)
    chosen = resolve_method(method)
    if chosen == "modelopt" and options.calibration == "percentile":
        options = Int8Options(**{**options.to_dict(), "calibration": "minmax"})
    placement = plan_placement(fp32_native, options, float_scopes)
    batch = static_batch(fp32_native)
    with tempfile.TemporaryDirectory(prefix="vpd-int8-") as folder:
        if chosen == "ort":
            quantized = quantize_with_ort(fp32_native, calibration_batches(images, batch), placement, options,
                                          Path(folder))
        else:
            quantized = quantize_with_modelopt(fp32_native, images, batch, placement, options, Path(folder))
    info = calibration_info or {"hash": array_hash(images), "size": int(len(images)), "source": "array"}
    quantized.producer_name = fp32_native.producer_name
    # What the quantiser actually did (ModelOpt's heuristics may leave more float than planned).
    done = {chain.consumer for chain in qdq_chains(quantized)}
    placement = Placement([n for n in placement.quantize if n in done],
                          {**placement.kept_float, **{n: f"left float by {chosen}" for n in placement.quantize
                                                      if n not in done}})
    report = {
        "method": chosen,
        "calibration": options.to_dict() | {"images_used": len(images) if batch is None
                                            else len(images) // batch * batch},
        "tools": {"onnxruntime": package_version("onnxruntime-gpu") or package_version("onnxruntime"),
                  "onnx": onnx.__version__, "nvidia-modelopt": package_version("nvidia-modelopt")},
        "calibration_set": {k: info.get(k) for k in ("hash", "size", "source")},
        "quantized_nodes": placement.quantize,
        "float_nodes": placement.kept_float,
        "float_op_types": float_op_types(fp32_native, placement),
        "qdq": count_qdq(quantized),
    }
    return quantized, report


# ----------------------------------------------------------------------------- Q/DQ transplant


@dataclass(frozen=True)
class QdqChain:
    """The Q/DQ feeding input ``index`` of node ``consumer``: DQ(Q(x)) or DQ(int8 constant)."""

    consumer: str
    op_type: str
    index: int
    dequantize: onnx.NodeProto
    quantize: onnx.NodeProto | None


def qdq_chains(model: onnx.ModelProto) -> list[QdqChain]:
    """Every (consumer node, input) whose values come through a DequantizeLinear, in graph order.

    Shape-only consumers (``SHAPE_ONLY_OP_TYPES``) are no quantised use and are left out: a transplant leaves
    them reading the float tensor, whose shape is the same.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    chains = []
    for node in model.graph.node:
        if node.op_type in QDQ_OP_TYPES or node.op_type in SHAPE_ONLY_OP_TYPES:
            continue
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            q = q if q is not None and q.op_type == "QuantizeLinear" else None
            chains.append(QdqChain(node.name, node.op_type, index, dq, q))
    return chains


def consumer_float_type(node: onnx.NodeProto, types: dict[str, int]) -> int:
    """The float type of a MatMul/Gemm/Conv: ONNX gives all their float inputs one type, so any known one says it."""
    known = [types[name] for name in node.input if types.get(name) in FLOAT_TYPES]
    if not known:
        raise QuantizationError(f"cannot tell the float type of node {node.name!r}'s inputs for its Q/DQ scales")
    return known[0]


def scale_as(tensor: onnx.TensorProto, float_type: int, name: str) -> onnx.TensorProto:
    """A Q/DQ scale in the consumer's float type (the DequantizeLinear output type is the scale's type)."""
    values = numpy_helper.to_array(tensor)
    converted = values.astype(onnx.helper.tensor_dtype_to_np_dtype(float_type))
    if not (np.isfinite(converted).all() and (converted > 0).all()):
        type_name = onnx.TensorProto.DataType.Name(float_type).lower()
        raise QuantizationError(f"Q/DQ scale {tensor.name!r} ({float(values.min()):.3g} .. "
                                f"{float(values.max()):.3g}) is not a positive finite {type_name}")
    return numpy_helper.from_array(converted, name)


def transplant_qdq(quantized: onnx.ModelProto, other: onnx.ModelProto, suffix: str = "") -> onnx.ModelProto:
    """``other`` with exactly the Q/DQ nodes (scales, int8 weights) of ``quantized``.

    ``quantized``: the result of ``quantize_for_export``; ``other``: another export of the same model and keep
    ratio: the mixed float16 graph (what TensorRT should run), a debug twin with ``with_indices=True``, the
    ``plugin`` flavour, or the float32 graph itself. Nodes are matched by name; a quantised node missing from
    ``other`` is an error. Scales take the float type of the node they feed (float16 in the mixed graph's
    blocks, float32 in its float32 islands); a graph with float16 Q/DQ is converted to opset >= 19. Q/DQ
    shared between consumers stays shared. Float weights that only fed a replaced input are dropped.
    """
    chains = qdq_chains(quantized)
    consumers = {n.name: n for n in other.graph.node if n.name}
    types = element_types(other)
    float_types = {}  # consumer name -> its float type in ``other``
    for chain in chains:
        consumer = consumers.get(chain.consumer)
        if consumer is None:
            raise QuantizationError(f"cannot transplant Q/DQ: node {chain.consumer!r} is not in the other graph "
                                    "(was it exported from the same model?)")
        if consumer.op_type != chain.op_type:
            raise QuantizationError(f"cannot transplant Q/DQ: node {chain.consumer!r} is a {consumer.op_type} here "
                                    f"but a {chain.op_type} in the quantised graph")
        if chain.index >= len(consumer.input):
            raise QuantizationError(f"cannot transplant Q/DQ: node {chain.consumer!r} has fewer inputs than expected")
        float_types[chain.consumer] = consumer_float_type(consumer, types)
    needs_float16_qdq = any(t != onnx.TensorProto.FLOAT for t in float_types.values())
    opset = max(default_opset(quantized), FLOAT16_QDQ_MIN_OPSET if needs_float16_qdq else 0)
    target = with_opset(other, opset)
    graph = target.graph
    constants = {i.name: i for i in quantized.graph.initializer}
    by_name = {n.name: n for n in graph.node if n.name}
    taken = ({o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}
             | {i.name for i in graph.input})
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # consumer name -> Q/DQ nodes to insert before it
    made_constants: dict[tuple, str] = {}  # (constant name, scale type or None) -> its name in the target
    made_dq: dict[tuple, str] = {}  # (DQ name, float type) -> its output's name in the target

    def fresh(name: str) -> str:
        candidate = name + suffix
        while candidate in taken:
            candidate += "_t"
        taken.add(candidate)
        return candidate

    def copy_constant(name: str, float_type: int | None = None) -> str:
        """The target's copy of a constant of ``quantized``; a float scale is converted to ``float_type``."""
        if name == "" or name not in constants:
            return name
        source = constants[name]
        is_scale = source.data_type in FLOAT_TYPES and float_type is not None and source.data_type != float_type
        key = (name, float_type if is_scale else None)
        if key not in made_constants:
            renamed = fresh(name) if name in taken else name
            taken.add(renamed)
            if is_scale:
                tensor = scale_as(source, float_type, renamed)
            else:
                tensor = copy.deepcopy(source)
                tensor.name = renamed
            graph.initializer.append(tensor)
            made_constants[key] = renamed
        return made_constants[key]

    for chain in chains:
        consumer = by_name[chain.consumer]
        float_type = float_types[chain.consumer]
        key = (chain.dequantize.name or chain.dequantize.output[0], float_type)
        if key not in made_dq:
            inserted = []
            if chain.quantize is not None:
                q = copy.deepcopy(chain.quantize)
                q.name = fresh(q.name or "QuantizeLinear")
                q.input[0] = consumer.input[chain.index]
                for i in range(1, len(q.input)):
                    q.input[i] = copy_constant(q.input[i], float_type)
                q.output[0] = fresh(q.output[0])
                inserted.append(q)
            dq = copy.deepcopy(chain.dequantize)
            dq.name = fresh(dq.name or "DequantizeLinear")
            dq.input[0] = inserted[0].output[0] if inserted else copy_constant(dq.input[0])
            for i in range(1, len(dq.input)):
                dq.input[i] = copy_constant(dq.input[i], float_type)
            dq.output[0] = fresh(dq.output[0])
            inserted.append(dq)
            new_nodes.setdefault(chain.consumer, []).extend(inserted)
            made_dq[key] = dq.output[0]
        consumer.input[chain.index] = made_dq[key]

    ordered = []
    for node in graph.node:
        ordered.extend(new_nodes.get(node.name, []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    drop_unused_initializers(target)
    return target


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """A copy of ``model`` at default-domain opset >= ``version`` (ModelOpt writes opset 19 graphs), converted
    by onnx's version converter so every node keeps its meaning; node names are preserved."""
    if default_opset(model) >= version:
        return copy.deepcopy(model)
    try:
        return version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises its own error types
        raise QuantizationError(f"cannot convert the graph to opset {version} for the Q/DQ transplant: {exc}") from None


def qdq_signature(model: onnx.ModelProto) -> list[tuple]:
    """(consumer, input index, scale values, zero point, axis) of every Q/DQ chain: equal placement check."""
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    signature = []
    for chain in qdq_chains(model):
        scale = constants.get(chain.dequantize.input[1])
        axis = next((a.i for a in chain.dequantize.attribute if a.name == "axis"), None)
        zero = constants.get(chain.dequantize.input[2]) if len(chain.dequantize.input) > 2 else None
        signature.append((chain.consumer, chain.index, None if scale is None else tuple(np.ravel(scale).tolist()),
                          None if zero is None else tuple(np.ravel(zero).tolist()), axis, chain.quantize is not None))
    return sorted(signature)
