"""Will this ONNX graph parse on TensorRT 10.3 (JetPack 6), 11.x and TensorRT-RTX 1.x? Checked from the graph alone.

``tensorrt_support(graph, version) -> list[Problem]``: every node of the graph (subgraphs and local functions
included) against what the ONNX parser of that TensorRT release accepts; an empty list means nothing known stands
in the way. The facts are data, not code: ``tensorrt_support.json`` beside this module transcribes, per operator and
release, the parser's support matrix (onnx-tensorrt ``docs/operators.md``: supported or not, the supported types,
the restrictions as written) and the rules checked here, each with its source (the matrix of the release, the
parser's changelog, the importer source of the release, TensorRT's layer and plugin documentation). The ``rtx`` table (TensorRT-RTX) is measured: its
facts come from running TensorRT-RTX 1.7.1's own parser and CPU-only builder and from NVIDIA's TensorRT-RTX
documentation. What a node is checked for:

- the operator is in the matrix of that release and marked supported (a node with no importer is looked up as a
  plugin: it must be a plugin this project ships, checked against what ``trt_plugins`` registers; TensorRT-RTX
  has no plugins at all, so there every plugin node is refused);
- the types it computes in (read from the graph after ONNX shape inference) are supported types of the row;
- the rules of the row: inputs that must be initializers or build-time constants (a value that constant folding
  reaches counts: a K from a Constant, an axis through Cast/Unsqueeze, a Shape of a static tensor), attribute
  values, outputs that must stay unused, Q/DQ scales and zero points, ScatterElements reductions (TensorRT's
  plugin), value limits (TopK's K up to 3840), ranks and shapes the importers cannot handle;
- the graph's opset is in the range the release documents, and its inputs and outputs are tensors of network
  types; no float network input reaches an input the parser computes a shape from.

Needs onnx and numpy only (it runs on the target before any engine is built): no torch, no TensorRT.
``python -m export.on_target.tensorrt_support --against-parser CORPUS`` compares the check with a real parser
(``export.on_target.parser_agreement``).
"""
from __future__ import annotations

import functools
import json
import runpy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

import trt_plugins
from compress.plumbing.errors import PipelineError

SUPPORT_DATA = Path(__file__).with_name("tensorrt_support.json")
SUPPORT_TABLES = ("10.3", "11", "rtx")  # every runtime release the data describes
BOTH_TABLES = ("10.3", "11")  # what "both" targets: TensorRT on Jetson and desktop (TensorRT-RTX is opt-in)
DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_FOLDED_ELEMENTS = 1 << 16  # constants larger than this are known constant, but their values are not computed
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}
INT32_RANGE = (-(1 << 31), (1 << 31) - 1)


class SupportDataError(PipelineError):
    """A TensorRT version the support data does not describe, or a graph that cannot be read."""


@dataclass(frozen=True)
class Problem:
    """One reason a graph would not parse (or build) on a TensorRT release."""

    version: str  # the support table: "10.3", "11" or "rtx"
    node: str     # the node's name ("" for the graph itself)
    op: str       # its op_type ("" for the graph)
    reason: str
    source: str = ""  # the id of the fact in tensorrt_support.json's sources

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op})" if self.op else "graph"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- the data


@functools.lru_cache(maxsize=None)
def support_data() -> dict:
    return json.loads(SUPPORT_DATA.read_text())


def support_table(version: str) -> str:
    """The support table that describes TensorRT ``version``: '10.3.0.30' -> '10.3', '11.1' -> '11', and
    TensorRT-RTX's '1.7.1.116' -> 'rtx'.

    Every 10.x is checked against the 10.3 table and every 11.x against the 11 table (later releases of a major
    only add support, by the parser's changelog). TensorRT-RTX numbers its releases 1.x, and this project takes
    TensorRT 10 or later only, so a 1.x version is TensorRT-RTX's. Other majors are refused.
    """
    text = str(version).strip()
    if text in SUPPORT_TABLES:
        return text
    try:
        major = int(text.split(".")[0])
    except ValueError:
        raise SupportDataError(f"not a TensorRT version: {version!r}") from None
    if major == 10:
        return "10.3"
    if major == 11:
        return "11"
    if major == 1:
        return "rtx"
    raise SupportDataError(f"TensorRT {version}: the support data describes TensorRT 10.x (checked as 10.3), 11.x "
                           "and TensorRT-RTX 1.x (rtx) only")


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type) if elem_type else "undefined"


@functools.lru_cache(maxsize=None)
def _token_types() -> dict[str, int]:
    """Support-matrix type token -> ONNX element type."""
    return {token: getattr(TensorProto, name) for token, name in support_data()["type_tokens"].items()
            if hasattr(TensorProto, name)}


def _accepted(tokens: Iterable[str]) -> set[int]:
    """ONNX element types a list of matrix tokens accepts (DOUBLE is cast down to FLOAT wherever FLOAT is)."""
    types = {_token_types()[t] for t in tokens if t in _token_types()}
    if TensorProto.FLOAT in types:
        types.add(TensorProto.DOUBLE)
    return types


# ----------------------------------------------------------------------------- what the graph holds


class GraphFacts:
    """Types, shapes and build-time constants of every tensor of a model (after ONNX shape inference).

    A tensor is *initializer-like* when it is an initializer or a Constant node's output (what the parser imports
    as weights), and a *build-time constant* when constant folding reaches it: computed by deterministic nodes from
    constants only, or a Shape/Size of a tensor whose dimensions are static. Values are kept for small constants.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple | None] = {}
        self.values: dict[str, np.ndarray] = {}
        self.partial: dict[str, list[int | None]] = {}  # 1-D shape values with some entries known (dynamic dims)
        self.constant: set[str] = set()
        self.initializer_like: set[str] = set()
        self.consumed: set[str] = set()
        self.graph_outputs = {o.name for o in model.graph.output}
        self.functions = {(f.domain, f.name): f for f in model.functions}
        graph = model.graph
        for info in [*graph.input, *graph.output, *graph.value_info]:
            self._record_info(info)
        for graph_ in iter_graphs(graph):
            for init in graph_.initializer:
                self._record_initializer(init)
            for node in graph_.node:
                self.consumed.update(name for name in node.input if name)
        for graph_ in iter_graphs(graph):
            for node in graph_.node:
                self._fold(node)

    # -- types and shapes
    def _record_info(self, info: onnx.ValueInfoProto) -> None:
        tensor = info.type.tensor_type if info.type.HasField("tensor_type") else None
        if tensor is None:
            return
        if tensor.elem_type:
            self.types[info.name] = tensor.elem_type
        if tensor.HasField("shape"):
            self.shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)

    def _record_initializer(self, init: onnx.TensorProto) -> None:
        self.types[init.name] = init.data_type
        self.shapes[init.name] = tuple(init.dims)
        self.constant.add(init.name)
        self.initializer_like.add(init.name)
        if int(np.prod(init.dims)) <= MAX_FOLDED_ELEMENTS and not init.external_data:
            try:
                self.values[init.name] = numpy_helper.to_array(init)
            except Exception:  # an element type numpy cannot hold: known constant, value unknown
                pass

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.shapes.get(name)
        return shape if shape is not None and all(d is not None for d in shape) else None

    # -- constant folding
    def _fold(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            self._fold_constant(node)
            return
        if node.domain not in DEFAULT_DOMAINS or node.op_type in NONDETERMINISTIC or not node.output:
            return
        if node.op_type in ("Shape", "Size"):
            self._fold_shape(node)
            return
        if node.op_type in ("Gather", "Slice") and node.input[0] in self.partial:
            self._fold_partial(node)
            return
        inputs = [name for name in node.input if name]
        if not inputs or not all(name in self.constant for name in inputs):
            return
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return  # control flow: its body may read outer, non-constant tensors
        self.constant.update(name for name in node.output if name)
        if node.op_type == "Identity" and node.input[0] in self.initializer_like:
            self.initializer_like.add(node.output[0])
        if all(name in self.values for name in inputs) and sum(self.values[n].size for n in inputs) <= MAX_FOLDED_ELEMENTS:
            self._evaluate(node, inputs)

    def _fold_constant(self, node: onnx.NodeProto) -> None:
        name = node.output[0]
        self.constant.add(name)
        self.initializer_like.add(name)
        for attribute in node.attribute:
            try:
                if attribute.name == "value":
                    value = numpy_helper.to_array(attribute.t)
                elif attribute.name in ("value_float", "value_int"):
                    value = np.asarray(helper.get_attribute_value(attribute),
                                       dtype=np.float32 if attribute.name == "value_float" else np.int64)
                elif attribute.name in ("value_floats", "value_ints"):
                    value = np.asarray(helper.get_attribute_value(attribute),
                                       dtype=np.float32 if attribute.name == "value_floats" else np.int64)
                else:
                    continue
            except Exception:
                continue
            if value.size <= MAX_FOLDED_ELEMENTS:
                self.values[name] = value
            self.shapes.setdefault(name, tuple(value.shape))
            if name not in self.types:
                self.types[name] = helper.np_dtype_to_tensor_dtype(value.dtype)

    def _fold_shape(self, node: onnx.NodeProto) -> None:
        shape = self.shapes.get(node.input[0])
        if shape is None:
            return
        if node.op_type == "Size":
            if all(d is not None for d in shape):
                self._known(node.output[0], np.asarray(int(np.prod(shape)), dtype=np.int64))
            return
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dims = list(shape[attrs.get("start", 0):attrs.get("end", len(shape))])
        if all(d is not None for d in dims):
            self._known(node.output[0], np.asarray(dims, dtype=np.int64))
        else:
            self.partial[node.output[0]] = dims

    def _fold_partial(self, node: onnx.NodeProto) -> None:
        """Gather or Slice of a shape whose dynamic entries are not the ones taken: a constant (K = N - 1 of a
        dynamic-batch graph)."""
        dims = self.partial[node.input[0]]
        try:
            if node.op_type == "Gather":
                indices = self.values[node.input[1]]
                taken = [dims[int(i)] for i in indices.reshape(-1)]
                shape = indices.shape
            else:
                starts, ends = (int(self.values[n][0]) for n in node.input[1:3])
                steps = int(self.values[node.input[4]][0]) if len(node.input) > 4 and node.input[4] else 1
                taken, shape = dims[starts:ends:steps], None
        except (KeyError, IndexError, ValueError):
            return
        if all(d is not None for d in taken):
            value = np.asarray(taken, dtype=np.int64)
            self._known(node.output[0], value.reshape(shape) if shape is not None else value)
        elif node.op_type == "Slice":
            self.partial[node.output[0]] = taken

    def _known(self, name: str, value: np.ndarray) -> None:
        self.constant.add(name)
        self.values[name] = value

    def _evaluate(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        try:
            from onnx.reference import ReferenceEvaluator

            opset = [o for o in self.model.opset_import if o.domain in DEFAULT_DOMAINS][:1] or [helper.make_opsetid("", 17)]
            graph = helper.make_graph(
                [node], "fold", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(self.values[n].dtype),
                                                               self.values[n].shape) for n in inputs],
                [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in node.output if n])
            evaluator = ReferenceEvaluator(helper.make_model(graph, opset_imports=opset))
            results = evaluator.run(None, {n: self.values[n] for n in inputs})
        except Exception:  # an op the reference evaluator lacks: constant, value unknown
            return
        for name, result in zip([n for n in node.output if n], results):
            array = np.asarray(result)
            if array.size <= MAX_FOLDED_ELEMENTS:
                self.values[name] = array


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph of its control-flow nodes, depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from iter_graphs(sub)


def load_graph(graph: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(graph, onnx.ModelProto):
        return graph
    try:
        return onnx.load(str(graph))
    except Exception as exc:
        raise SupportDataError(f"cannot read the ONNX graph {graph}: {exc}") from None


def inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with ONNX shape inference run (types and shapes of every tensor it can reach)."""
    try:
        return shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # a graph shape inference cannot follow: check it with the types it declares
        return model


# ----------------------------------------------------------------------------- the check


def tensorrt_support(graph: onnx.ModelProto | str | Path, version: str) -> list[Problem]:
    """Everything known to stop ``graph`` from parsing on TensorRT ``version`` ("10.3", "11", "rtx", "10.3.0.30",
    "1.7.1.116", ...).

    Pure: reads the graph (a ModelProto or a path) and the support data; runs ONNX shape inference on a copy.
    """
    return _problems(GraphFacts(inferred(load_graph(graph))), support_table(version))


def _problems(facts: GraphFacts, table: str) -> list[Problem]:
    problems = _graph_problems(facts.model, facts, table)
    for graph_ in iter_graphs(facts.model.graph):
        for node in graph_.node:
            problems.extend(_node_problems(node, facts, table))
    return problems


def _graph_problems(model: onnx.ModelProto, facts: GraphFacts, table: str) -> list[Problem]:
    version = support_data()["versions"][table]
    problems = []
    opsets = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    low, high = version["opset"]["min"], version["opset"]["max"]
    for opset in opsets:
        if not low <= opset <= high:
            problems.append(Problem(table, "", "", f"opset {opset} is outside the opset range {low}-{high} that "
                                    f"{version['title']} documents", version["sources"][0]))
    io_types = _accepted(version.get("network_io_types", support_data()["network_io_types"]))
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            elem = facts.types.get(value.name)
            if elem and elem not in io_types:
                problems.append(Problem(table, "", "", f"network {kind} {value.name!r} is {type_name(elem)}, not a "
                                        "TensorRT network input/output type", version["sources"][0]))
    for rule in support_data()["graph_rules"]:
        if table in rule["versions"]:
            problems += [Problem(table, node, op, f"{rule['reason']} ({detail})", rule_source(rule, table))
                         for node, op, detail in GRAPH_RULE_CHECKS[rule["kind"]](rule, model, facts)]
    return problems


def rule_source(rule: dict, table: str) -> str:
    """The id of the source a rule cites for ``table``: one source for all its tables, or one per table."""
    source = rule["source"]
    return source if isinstance(source, str) else source[table]


def _node_problems(node: onnx.NodeProto, facts: GraphFacts, table: str) -> list[Problem]:
    operators = support_data()["operators"]
    name = node.name or (node.output[0] if node.output else node.op_type)
    if (node.domain, node.op_type) in facts.functions:
        function = facts.functions[(node.domain, node.op_type)]
        return [p for inner in function.node for p in _node_problems(inner, facts, table)]
    entry = operators.get(node.op_type)
    # The parser picks an importer by op_type alone; an op_type without one is looked up as a plugin.
    if entry is None or not entry[table].get("listed", True):
        version = support_data()["versions"][table]
        if not version["plugins"]:
            return [Problem(table, name, node.op_type, f"not an operator of the {version['title']} parser, and it has "
                            "no plugins to look one up in (TensorRT-RTX ships no plugin library; its 1.7.1 parser "
                            "aborts the process on a plugin node)", "trt-rtx-docs")]
        if node.op_type == trt_plugins.PLUGIN_NAME:
            return [Problem(table, name, node.op_type, reason, "token-gather")
                    for reason in token_gather_problems(node, facts, table)]
        plugin_version, namespace = _plugin_lookup(node, table)
        return [Problem(table, name, node.op_type,
                        f"not an operator of the {version['title']} parser: it would be looked up as a plugin (name "
                        f"{node.op_type!r}, version {plugin_version!r}, namespace {namespace!r}), and no plugin this "
                        f"project ships registers that", version["sources"][0])]
    row = entry[table]
    source = support_data()["versions"][table]["sources"][0]
    if not row.get("supported"):
        note = f" ({row['restrictions']})" if row.get("restrictions") else ""
        return [Problem(table, name, node.op_type, f"not supported by the {support_data()['versions'][table]['title']} "
                        f"parser{note}", source)]
    problems = [Problem(table, name, node.op_type, reason, source) for reason in _type_problems(node, entry, row, facts)]
    for rule in entry.get("rules", []):
        if table not in rule["versions"] or not _applies(rule, node):
            continue
        for detail in RULE_CHECKS[rule["kind"]](rule, node, facts, row):
            problems.append(Problem(table, name, node.op_type, f"{rule['reason']} ({detail})" if detail else rule["reason"],
                                    rule_source(rule, table)))
    return problems


def _type_problems(node: onnx.NodeProto, entry: dict, row: dict, facts: GraphFacts) -> list[str]:
    accepted = _accepted(row.get("types", []))
    if not accepted:
        return []
    typed = entry.get("typed_inputs", [0])
    if typed == "outputs":
        names = [("output", i, n) for i, n in enumerate(node.output[:1]) if n]
    elif typed == "all":
        names = [("input", i, n) for i, n in enumerate(node.input) if n]
    else:
        names = [("input", i, node.input[i]) for i in typed if i < len(node.input) and node.input[i]]
    problems = []
    for kind, index, tensor in names:
        elem = facts.types.get(tensor)
        if elem and elem not in accepted:
            problems.append(f"{kind} {index} ({tensor!r}) is {type_name(elem)}; the parser supports "
                            f"{', '.join(row['types'])} for {node.op_type}")
    return problems


def _applies(rule: dict, node: onnx.NodeProto) -> bool:
    when = rule.get("when")
    if not when:
        return True
    value = _attribute(node, when["attribute"], when.get("default"))
    if "not_in" in when:
        return value not in when["not_in"]
    return value in when.get("in", [])


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node: onnx.NodeProto, index: int) -> str | None:
    return node.input[index] if index < len(node.input) and node.input[index] else None


# ----------------------------------------------------------------------------- the rules (kinds in the data)


def _constant_input(rule, node, facts, row):
    name = _input(node, rule["input"])
    if name is None:
        return []
    if rule["level"] == "initializer":
        return [] if name in facts.initializer_like else [f"{rule['name']} {name!r} is computed in the graph, not an initializer"]
    return [] if name in facts.constant else [f"{rule['name']} {name!r} is computed at run time"]


def _value_at_most(rule, node, facts, row):
    value = facts.values.get(_input(node, rule["input"]) or "")
    if value is None or value.size == 0 or np.max(value) <= rule["limit"]:
        return []
    return [f"{rule['name']} is {int(np.max(value))}"]


def _attribute_in(rule, node, facts, row):
    value = _attribute(node, rule["attribute"], rule.get("default"))
    return [] if value in rule["allowed"] else [f"{rule['attribute']} is {value!r}"]


def _attribute_absent(rule, node, facts, row):
    present = [a.name for a in node.attribute if a.name in rule["attributes"]]
    return [f"has {', '.join(present)}"] if present else []


def _attribute_all_ones(rule, node, facts, row):
    value = _attribute(node, rule["attribute"], [])
    return [] if all(v == 1 for v in value) else [f"{rule['attribute']} is {list(value)}"]


def _attribute_type_in_row(rule, node, facts, row):
    target = _attribute(node, rule["attribute"])
    if target is None or target in _accepted(row.get("types", [])):
        return []
    return [f"{rule['attribute']} is {type_name(target)}; the parser casts to {', '.join(row['types'])}"]


def _axis_in_last(rule, node, facts, row):
    rank = facts.rank(node.input[0]) if node.input else None
    if not rank:
        return []
    axis = _attribute(node, rule["attribute"], rule["default"])
    axis = axis + rank if axis < 0 else axis
    return [] if axis >= rank - rule["last"] else [f"axis {axis} of a rank-{rank} input"]


def _outputs_unused(rule, node, facts, row):
    used = [o for o in node.output[rule["start"]:] if o and (o in facts.consumed or o in facts.graph_outputs)]
    return [f"output {', '.join(map(repr, used))} is used"] if used else []


def _inputs_absent(rule, node, facts, row):
    present = [str(i) for i in rule["inputs"] if _input(node, i)]
    return [f"input {', '.join(present)} given"] if present else []


def _positive_input(rule, node, facts, row):
    value = facts.values.get(_input(node, rule["input"]) or "")
    if value is None or np.all(value.astype(np.float64) > 0):
        return []
    return [f"{rule['name']} has coefficients <= 0"]


def _all_zero_input(rule, node, facts, row):
    name = _input(node, rule["input"])
    if name is None:
        return []
    if name not in facts.constant:
        return [f"{rule['name']} {name!r} is computed at run time"]
    value = facts.values.get(name)
    if value is None or not np.any(value.astype(np.float64)):
        return []
    return [f"{rule['name']} is not all zeros"]


def _not_input_types(rule, node, facts, row):
    name = _input(node, rule["input"])
    elem = facts.types.get(name or "")
    banned = _accepted(rule["types"])
    return [f"{rule['name']} is {type_name(elem)}"] if elem and elem in banned else []


def _input_types(rule, node, facts, row):
    name = _input(node, rule["input"])
    elem = facts.types.get(name or "")
    return [] if not elem or elem in _accepted(rule["types"]) else [f"{rule['name']} is {type_name(elem)}"]


def _quantization_scale(rule, node, facts, row):
    scale, data = _input(node, rule["input"]), _input(node, 0)
    scale_shape = facts.shapes.get(scale or "")
    if scale_shape is None:
        return []
    size = int(np.prod([d or 0 for d in scale_shape])) if scale_shape else 1
    if size == 1:
        return []
    if len(scale_shape) != 1:
        return [f"the scale has shape {list(scale_shape)}"]
    data_shape = facts.shapes.get(data or "")
    if data_shape is None:
        return []
    axis = _attribute(node, "axis", 1)
    axis = axis + len(data_shape) if axis < 0 else axis
    channels = data_shape[axis] if axis < len(data_shape) else None
    if channels is not None and channels != size:
        return [f"{size} scale coefficients for {channels} channels on axis {axis}"]
    return []


def _same_types(rule, node, facts, row):
    types = {type_name(facts.types[n]) for n in (_input(node, i) for i in rule["inputs"]) if n and n in facts.types}
    return [f"inputs are {' and '.join(sorted(types))}"] if len(types) > 1 else []


def _rank_in(rule, node, facts, row):
    problems = []
    for index in rule["inputs"]:
        rank = facts.rank(_input(node, index) or "")
        if rank is not None and rank not in rule["ranks"]:
            problems.append(f"input {index} has rank {rank}")
    return problems


def _spatial_rank_in(rule, node, facts, row):
    rank = facts.rank(_input(node, rule["input"]) or "")
    return [] if rank is None or rank - 2 in rule["ranks"] else [f"{rank - 2} spatial dimensions"]


def _static_dims(rule, node, facts, row):
    name = _input(node, rule["input"]) or ""
    return [] if name not in facts.shapes or facts.static_shape(name) else [f"{name!r} has a dynamic dimension"]


def _static_axis_dim(rule, node, facts, row):
    shape = facts.shapes.get(_input(node, rule["input"]) or "")
    if shape is None:
        return []
    axis = _attribute(node, rule["attribute"], rule["default"])
    return [] if shape[axis] is not None else [f"dimension {axis} is dynamic"]


def _constant_false_input(rule, node, facts, row):
    name = _input(node, rule["input"])
    if name is None:
        return []
    if name not in facts.initializer_like:
        return [f"{rule['name']} {name!r} is computed in the graph"]
    value = facts.values.get(name)
    return [f"{rule['name']} is true"] if value is not None and bool(np.any(value)) else []


def _axes_iota_or_initializer(rule, node, facts, row):
    """Resize: an ``axes`` attribute that is not 0..rank-1 needs ``scales`` as weights (the parser cannot interlace
    a scales tensor into the input's rank)."""
    axes, rank = _attribute(node, rule["attribute"]), facts.rank(node.input[0]) if node.input else None
    name = _input(node, rule["input"])
    if not axes or rank is None or name is None or name in facts.initializer_like:
        return []
    if [a + rank if a < 0 else a for a in axes] == list(range(rank)):
        return []
    return [f"axes {list(axes)} of a rank-{rank} input with {rule['name']} {name!r} computed in the graph"]


def _scales_leading_ones(rule, node, facts, row):
    """Resize with constant scales: a mode resizes at most its innermost ``dims`` dimensions."""
    dims = rule["innermost"].get(_attribute(node, "mode", "nearest"))
    scales = facts.values.get(_input(node, rule["input"]) or "")
    if dims is None or scales is None or scales.size <= dims:
        return []
    leading = [float(v) for v in scales.reshape(-1)[:-dims]]
    return [] if all(v == 1.0 for v in leading) else [f"scales {[float(v) for v in scales.reshape(-1)]}"]


def _split_last_chunk(rule, node, facts, row):
    """Split into equal parts (no split sizes): ceil(d / n) per part must leave a last part >= 0."""
    if _input(node, 1) or _attribute(node, "split") is not None:
        return []
    shape = facts.shapes.get(node.input[0]) if node.input else None
    parts = _attribute(node, "num_outputs", len(node.output))
    if not shape or not parts:
        return []
    axis = _attribute(node, "axis", 0)
    length = shape[axis] if -len(shape) <= axis < len(shape) else None
    if length is None:
        return []
    chunk = -(-length // parts)
    last = length - chunk * (parts - 1)
    return [] if last >= 0 else [f"{parts} parts of a dimension of {length}: chunks of {chunk} leave {last}"]


def _vector_times_batch(rule, node, facts, row):
    first, second = facts.rank(_input(node, 0) or ""), facts.rank(_input(node, 1) or "")
    if first == 1 and second is not None and second >= 3:
        return [f"a 1-D input times a rank-{second} input"]
    return []


def _same_shapes(rule, node, facts, row):
    shapes = [facts.shapes.get(_input(node, i) or "") for i in rule["inputs"]]
    if any(shape is None for shape in shapes) or len({len(shape) for shape in shapes}) > 1:
        return []
    differing = [axis for axis, dims in enumerate(zip(*shapes))
                 if None not in dims and len(set(dims)) > 1]
    return [f"shapes {' and '.join(str(list(shape)) for shape in shapes)}"] if differing else []


def _branch_ranks_equal(rule, node, facts, row):
    """If: with a condition known only at run time, each output must have the same rank in both branches."""
    if node.input and node.input[0] in facts.constant:
        return []
    branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    then_graph, else_graph = branches.get("then_branch"), branches.get("else_branch")
    if then_graph is None or else_graph is None:
        return []
    problems = []
    for index, (left, right) in enumerate(zip(then_graph.output, else_graph.output)):
        ranks = [_declared_rank(left, facts), _declared_rank(right, facts)]
        if None not in ranks and ranks[0] != ranks[1]:
            problems.append(f"output {index} has rank {ranks[0]} in then_branch and {ranks[1]} in else_branch")
    return problems


def _declared_rank(value: onnx.ValueInfoProto, facts: GraphFacts) -> int | None:
    if facts.rank(value.name) is not None:
        return facts.rank(value.name)
    tensor = value.type.tensor_type
    return len(tensor.shape.dim) if value.type.HasField("tensor_type") and tensor.HasField("shape") else None


RULE_CHECKS = {
    "constant_input": _constant_input, "value_at_most": _value_at_most, "attribute_in": _attribute_in,
    "attribute_absent": _attribute_absent, "attribute_all_ones": _attribute_all_ones,
    "attribute_type_in_row": _attribute_type_in_row, "axis_in_last": _axis_in_last, "outputs_unused": _outputs_unused,
    "inputs_absent": _inputs_absent, "positive_input": _positive_input, "all_zero_input": _all_zero_input,
    "not_input_types": _not_input_types, "input_types": _input_types, "quantization_scale": _quantization_scale,
    "same_types": _same_types, "rank_in": _rank_in, "spatial_rank_in": _spatial_rank_in, "static_dims": _static_dims,
    "static_axis_dim": _static_axis_dim, "constant_false_input": _constant_false_input,
    "axes_iota_or_initializer": _axes_iota_or_initializer, "scales_leading_ones": _scales_leading_ones,
    "split_last_chunk": _split_last_chunk, "vector_times_batch": _vector_times_batch, "same_shapes": _same_shapes,
    "branch_ranks_equal": _branch_ranks_equal,
}


# ----------------------------------------------------------------------------- the rules over the whole graph


def _tensor_io(rule, model, facts):
    """Graph inputs and outputs must be tensors: the parser has no network input of sequence, map or optional type."""
    found = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            held = value.type.WhichOneof("value")
            if held not in (None, "tensor_type"):
                found.append(("", "", f"network {kind} {value.name!r} is a {held.removesuffix('_type')}"))
    return found


def _float_shape_inputs(rule, model, facts):
    """Float network inputs whose values reach a shape-tensor input (Range's bounds, Resize's scales, ...): a
    network input that is a shape tensor must be INT32 or INT64. Followed back through the nodes that compute
    shape values; a Shape or Size only reads dimensions, so the search stops there."""
    shape_inputs, carriers = rule["shape_inputs"], set(rule["value_carriers"])
    producers = {output: node for graph in iter_graphs(model.graph) for node in graph.node for output in node.output}
    floats = {v.name for v in model.graph.input
              if facts.types.get(v.name) in _accepted(rule["float_types"]) and v.name not in facts.constant}
    found = []
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            for index in shape_inputs.get(node.op_type, []):
                reached = _graph_inputs_behind(_input(node, index), producers, carriers, floats)
                found += [(node.name or node.output[0], node.op_type, f"input {index} comes from the float network "
                           f"input {name!r}") for name in sorted(reached)]
    return found


def _graph_inputs_behind(start: str | None, producers: dict, carriers: set, wanted: set) -> set[str]:
    seen, stack, found = set(), [start] if start else [], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in wanted:
            found.add(name)
        producer = producers.get(name)
        if producer is not None and producer.op_type in carriers:
            stack.extend(n for n in producer.input if n)
    return found


GRAPH_RULE_CHECKS = {"tensor_io": _tensor_io, "float_shape_inputs": _float_shape_inputs}


# ----------------------------------------------------------------------------- plugin nodes


def _plugin_lookup(node: onnx.NodeProto, table: str) -> tuple[str, str]:
    """(version, namespace) the parser of ``table`` looks a plugin node up by."""
    version = _attribute(node, "plugin_version", "1")
    namespace = _attribute(node, "plugin_namespace")
    if namespace is None:
        from_domain = support_data()["versions"][table]["plugin_namespace_from_domain"]
        namespace = node.domain if from_domain and node.domain not in DEFAULT_DOMAINS else ""
    return str(version), str(namespace)


@functools.lru_cache(maxsize=None)
def token_gather_spec() -> dict:
    return json.loads(Path(trt_plugins.SPEC_PATH).read_text())


def token_gather_problems(node: onnx.NodeProto, facts: GraphFacts, table: str) -> list[str]:
    """A TokenGather node against what trt_plugins registers: lookup keys, fields and their types, inputs, outputs."""
    spec = token_gather_spec()
    fields = {name: a for name, a in spec["attributes"].items() if "trt_field_type" in a}
    problems = []
    version, namespace = _plugin_lookup(node, table)
    if version != trt_plugins.PLUGIN_VERSION:
        problems.append(f"plugin_version {version!r} is not the version the TokenGather plugin registers "
                        f"({trt_plugins.PLUGIN_VERSION!r})")
    if namespace != trt_plugins.PLUGIN_NAMESPACE:
        origin = "" if _attribute(node, "plugin_namespace") is not None else " (read from the node's domain: no plugin_namespace attribute)"
        problems.append(f"plugin namespace {namespace!r}{origin} is not the namespace the TokenGather plugin registers "
                        f"({trt_plugins.PLUGIN_NAMESPACE!r})")
    attributes = {a.name: a for a in node.attribute}
    for name, attribute in attributes.items():
        expected = spec["attributes"].get(name, {}).get("onnx_type")
        if expected is None:
            problems.append(f"attribute {name!r} is not a field of the TokenGather creator (fields: "
                            f"{', '.join(fields)}): the parser drops it")
        elif onnx.AttributeProto.AttributeType.Name(attribute.type) != expected:
            problems.append(f"attribute {name!r} is {onnx.AttributeProto.AttributeType.Name(attribute.type)}, the "
                            f"plugin reads it as {expected}")
    for name, field in fields.items():
        if field.get("required") and name not in attributes:
            problems.append(f"the required field {name!r} is missing")
    keep = _attribute(node, trt_plugins.ATTR_KEEP)
    with_indices = _attribute(node, trt_plugins.ATTR_WITH_INDICES, 0)
    if isinstance(keep, int) and not INT32_RANGE[0] <= keep <= INT32_RANGE[1]:
        problems.append(f"{trt_plugins.ATTR_KEEP} {keep} does not fit the plugin's kINT32 field")
    if with_indices not in (0, 1):
        problems.append(f"{trt_plugins.ATTR_WITH_INDICES} is {with_indices!r}, must be 0 or 1")
    inputs = [n for n in node.input if n]
    if len(inputs) != len(spec["inputs"]):
        problems.append(f"{len(inputs)} inputs; the plugin takes {len(spec['inputs'])} (tokens, scores)")
    expected_outputs = 1 + (with_indices == 1)
    outputs = [n for n in node.output if n]
    if len(outputs) != expected_outputs:
        problems.append(f"{len(outputs)} outputs; with with_indices={with_indices} the plugin gives {expected_outputs}")
    for index, (name, described) in enumerate(zip(inputs, spec["inputs"])):
        elem = facts.types.get(name)
        allowed = {helper.np_dtype_to_tensor_dtype(np.dtype(t)) for t in described["types"]}
        if elem and elem not in allowed:
            problems.append(f"input {index} ({described['name']}) is {type_name(elem)}; the plugin takes "
                            f"{', '.join(described['types'])}")
        rank = facts.rank(name)
        if rank is not None and rank != len(described["shape"]):
            problems.append(f"input {index} ({described['name']}) has rank {rank}, the plugin takes "
                            f"[{', '.join(described['shape'])}]")
    if len(inputs) == 2:
        problems += _token_gather_shapes(inputs, outputs, keep, facts, spec)
    return problems


def _token_gather_shapes(inputs, outputs, keep, facts: GraphFacts, spec: dict) -> list[str]:
    problems = []
    tokens, scores = facts.shapes.get(inputs[0]), facts.shapes.get(inputs[1])
    patches = tokens[1] - 1 if tokens and len(tokens) == 3 and tokens[1] is not None else None
    if scores and len(scores) == 2 and scores[1] is not None and patches is not None and scores[1] != patches:
        problems.append(f"scores has {scores[1]} entries per row for {patches} patch tokens")
    if isinstance(keep, int) and patches is not None and not 1 <= keep <= patches:
        problems.append(f"K {keep} is outside 1..{patches} (the patch tokens)")
    limit = spec["limits"].get("N-1+K")
    if isinstance(keep, int) and patches is not None and isinstance(limit, int) and patches + keep > limit:
        problems.append(f"N-1+K = {patches + keep} exceeds the plugin's limit {limit}")
    token_type = facts.types.get(inputs[0])
    if outputs and token_type and facts.types.get(outputs[0]) not in (None, token_type):
        problems.append(f"output 0 is declared {type_name(facts.types[outputs[0]])}, the plugin gives the tokens' "
                        f"{type_name(token_type)}")
    if len(outputs) > 1 and facts.types.get(outputs[1]) not in (None, TensorProto.INT32):
        problems.append(f"output 1 is declared {type_name(facts.types[outputs[1]])}, the plugin gives INT32 indices")
    return problems


# ----------------------------------------------------------------------------- many graphs, many versions


def target_tables(versions: str | Sequence[str]) -> tuple[str, ...]:
    """'both' -> ('10.3', '11'); '10.3' -> ('10.3',); 'rtx' -> ('rtx',); a sequence of versions -> their tables, in
    order. TensorRT-RTX is never in 'both': it is a target only when asked for."""
    if isinstance(versions, str):
        versions = BOTH_TABLES if versions == "both" else (versions,)
    return tuple(dict.fromkeys(support_table(v) for v in versions))


def check_graph(graph: onnx.ModelProto | str | Path, versions: Sequence[str] = SUPPORT_TABLES) -> dict[str, list[Problem]]:
    """{table: problems} for one graph (shape inference and folding run once, for every table)."""
    facts = GraphFacts(inferred(load_graph(graph)))
    return {table: _problems(facts, table) for table in target_tables(versions)}


def check_graphs(paths: Sequence[Path], versions: Sequence[str] = SUPPORT_TABLES) -> dict[str, dict[str, list[Problem]]]:
    """{graph file name: {table: problems}} for every graph and support table."""
    return {Path(path).name: check_graph(path, versions) for path in paths}


def manifest_entry(results: dict[str, dict[str, list[Problem]]], targets: Sequence[str]) -> dict:
    """The manifest's record of the check: per support table a verdict, per graph the problems (as lines)."""
    tables = sorted({table for per_graph in results.values() for table in per_graph}, key=SUPPORT_TABLES.index)
    data = support_data()
    return {
        "targets": list(targets),
        "data": {"file": SUPPORT_DATA.name, "schema": data["schema"],
                 "sources": {table: data["versions"][table]["sources"] for table in tables}},
        "versions": {table: {"title": data["versions"][table]["title"],
                             "supported": not any(per_graph.get(table) for per_graph in results.values()),
                             "target": table in targets}
                     for table in tables},
        "graphs": {graph: {table: [str(p) for p in problems] for table, problems in per_graph.items()}
                   for graph, per_graph in results.items()},
    }


def report_lines(results: dict[str, dict[str, list[Problem]]]) -> list[str]:
    """One line per graph and support table (and one indented line per problem)."""
    width = max((len(graph) for graph in results), default=0)
    lines = []
    for graph, per_graph in results.items():
        for table, problems in per_graph.items():
            title = support_data()["versions"][table]["title"]
            verdict = "supported" if not problems else f"NOT SUPPORTED ({len(problems)} problem{'s' * (len(problems) > 1)})"
            lines.append(f"{graph:<{width}}  TensorRT {table:<4}  {verdict}  [{title}]")
            lines += [f"    {graph}: {p}" for p in problems]
    return lines


if __name__ == "__main__":  # the harness that compares this check with a real parser: export.on_target.parser_agreement
    runpy.run_module("export.on_target.parser_agreement", run_name="__main__")  # it imports this module: no cycle here
