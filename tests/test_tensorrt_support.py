"""export.on_target.tensorrt_support: will a graph parse on TensorRT 10.3, 11.x and TensorRT-RTX, decided from the
graph alone.

Real graphs are the project's own: every graph the export contracts write for the demo DynamicViT, a small LV-ViT
and the demo ViT with ToMe, and one export_model folder; the graphs that must fail are built with onnx.helper, one
problem each. `export.engine DIR --lint` runs in a
subprocess with torch and timm unimportable (it is a target-side tool).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, defs, helper, numpy_helper

import trt_plugins
from conftest import torch_free_env
from export.on_target.runtimes import TENSORRT_RTX, import_bindings
from export.on_target.tensorrt_support import (BOTH_TABLES, GRAPH_RULE_CHECKS, RULE_CHECKS, SUPPORT_TABLES, SupportDataError,
                                               rule_source, support_data, support_table, target_tables, tensorrt_support)

REPO = Path(__file__).resolve().parents[1]
FLOAT, HALF, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


# ----------------------------------------------------------------------------- graphs built by hand


def model_of(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, array):
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(np.asarray(array), name))


def topk_graph(k_nodes, k_name="k", k_init=()):
    """x [2, 16] -> TopK(x, K) -> values, indices; the nodes computing K are given."""
    topk = helper.make_node("TopK", ["x", k_name], ["v", "i"], name="select", axis=1)
    return model_of([*k_nodes, topk], [value("x", FLOAT, [2, 16])], [value("v", FLOAT, [2, None]), value("i", INT64, [2, None])],
                    k_init)


def token_gather_graph(**attributes):
    """tokens [2, 9, 4], scores [2, 8] -> TokenGather (K 3, with indices) -> kept [2, 4, 4], indices [2, 3]."""
    fields = {"K": 3, "with_indices": 1, "plugin_version": "1", "plugin_namespace": ""}
    fields.update(attributes)
    node = helper.make_node(trt_plugins.PLUGIN_NAME, ["tokens", "scores"], ["kept", "indices"], name="gather",
                            domain=trt_plugins.ONNX_DOMAIN, **{k: v for k, v in fields.items() if v is not None})
    return model_of([node], [value("tokens", FLOAT, [2, 9, 4]), value("scores", FLOAT, [2, 8])],
                    [value("kept", FLOAT, [2, 4, 4]), value("indices", TensorProto.INT32, [2, 3])],
                    extra_opsets=[helper.make_opsetid(trt_plugins.ONNX_DOMAIN, 1)])


def unsupported_operator():
    return model_of([helper.make_node("Unique", ["x"], ["y"], name="unique")], [value("x", FLOAT, [8])],
                    [value("y", FLOAT, [None])])


def custom_operator():
    return model_of([helper.make_node("FancyGather", ["x"], ["y"], name="fancy", domain="acme")],
                    [value("x", FLOAT, [8])], [value("y", FLOAT, [8])], extra_opsets=[helper.make_opsetid("acme", 1)])


def run_time_k():
    """K = ReduceMax(x) cast to int64: a value only known when the graph runs."""
    return topk_graph([helper.make_node("ReduceMax", ["x"], ["m"], name="peak", keepdims=0),
                       helper.make_node("Cast", ["m"], ["k0"], name="as_int", to=INT64),
                       helper.make_node("Reshape", ["k0", "one"], ["k"], name="k_shape")],
                      k_init=[numpy_helper.from_array(np.array([1], np.int64), "one")])


def folded_k():
    """K from a Constant through Cast and Unsqueeze: constant folding reaches it."""
    return topk_graph([const("k_value", np.array(4, np.int32)),
                       helper.make_node("Cast", ["k_value"], ["k64"], name="k_cast", to=INT64),
                       helper.make_node("Unsqueeze", ["k64", "axes"], ["k"], name="k_unsqueeze")],
                      k_init=[numpy_helper.from_array(np.array([0], np.int64), "axes")])


def k_from_static_shape():
    """K = dim 1 of x minus 12, through Shape, Gather and Sub (x has a dynamic batch, a static dim 1)."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             const("dim", np.array([1], np.int64)), const("twelve", np.array([12], np.int64)),
             helper.make_node("Gather", ["shape", "dim"], ["n"], name="n", axis=0),
             helper.make_node("Sub", ["n", "twelve"], ["k"], name="k_sub")]
    model = topk_graph(nodes)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def too_large_k():
    return topk_graph([const("k", np.array([4000], np.int64))])


def squeeze_axes_not_an_initializer():
    """Squeeze axes from a Cast of a Constant: a build-time constant, but not an initializer (10.3 wants one)."""
    nodes = [const("axes32", np.array([1], np.int32)),
             helper.make_node("Cast", ["axes32"], ["axes"], name="axes_cast", to=INT64),
             helper.make_node("Squeeze", ["x", "axes"], ["y"], name="squeeze")]
    return model_of(nodes, [value("x", FLOAT, [2, 1, 4])], [value("y", FLOAT, [2, 4])])


def integer_exponent():
    return model_of([helper.make_node("Pow", ["x", "e"], ["y"], name="power")], [value("x", FLOAT, [4])],
                    [value("y", FLOAT, [4])], [numpy_helper.from_array(np.array(2, np.int32), "e")])


def mixed_precision_batch_norm():
    params = [numpy_helper.from_array(np.ones(3, np.float32), n) for n in ("scale", "bias", "mean", "var")]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn")
    return model_of([node], [value("x", HALF, [1, 3, 4, 4])], [value("y", HALF, [1, 3, 4, 4])], params)


def opset_21():
    return model_of([helper.make_node("Relu", ["x"], ["y"], name="relu")], [value("x", FLOAT, [4])],
                    [value("y", FLOAT, [4])], opset=21)


def cast_to_int8():
    """INT8 comes only from quantization: a Cast to INT8 (dequantized after, so only the Cast is wrong)."""
    return model_of([helper.make_node("Cast", ["x"], ["q"], name="to_int8", to=TensorProto.INT8),
                     helper.make_node("DequantizeLinear", ["q", "scale"], ["y"], name="dequant")],
                    [value("x", FLOAT, [4])], [value("y", FLOAT, [4])],
                    [numpy_helper.from_array(np.array(0.1, np.float32), "scale")], opset=19)


def layer_norm_mean_used():
    params = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("gamma", "beta")]
    node = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y", "mean"], name="norm", axis=-1)
    return model_of([node], [value("x", FLOAT, [2, 4])], [value("y", FLOAT, [2, 4]), value("mean", FLOAT, [2, 1])], params)


def scatter_add(indices_type):
    node = helper.make_node("ScatterElements", ["data", "idx", "upd"], ["y"], name="merge", axis=1, reduction="add")
    return model_of([node], [value("data", FLOAT, [2, 5]), value("idx", indices_type, [2, 3]), value("upd", FLOAT, [2, 3])],
                    [value("y", FLOAT, [2, 5])], opset=18)


def quantize(zero_point, dequantize=True):
    """Q -> DQ with ``zero_point``'s type and value (the DQ takes a zero zero point of the same type); without the DQ
    the quantized tensor is the network output."""
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "scale"), numpy_helper.from_array(zero_point, "zp"),
             numpy_helper.from_array(np.zeros((), zero_point.dtype), "zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dequant")]
    if not dequantize:
        out = value("q", helper.np_dtype_to_tensor_dtype(zero_point.dtype), [4])
        return model_of(nodes[:1], [value("x", FLOAT, [4])], [out], inits[:2], opset=19)
    return model_of(nodes, [value("x", FLOAT, [4])], [value("y", FLOAT, [4])], inits, opset=19)


# (graph, versions on which it fails (one problem each), what the problem line says)
MUST_FAIL = {
    "unsupported operator": (unsupported_operator, ("10.3", "11", "rtx"), "node 'unique' (Unique): not supported by the"),
    "custom operator without a plugin": (custom_operator, ("10.3", "11", "rtx"), "no plugin this project ships registers"),
    "TopK with a run-time K": (run_time_k, ("10.3", "11", "rtx"), "node 'select' (TopK): K must be a build-time constant"),
    "TopK with K over 3840": (too_large_k, ("10.3", "11", "rtx"), "K up to 3840 (the parser table"),
    "Squeeze axes not an initializer (10.3)": (squeeze_axes_not_an_initializer, ("10.3",), "`axes` must be an initializer"),
    "integer exponent (10.3)": (integer_exponent, ("10.3",), "input 1 ('e') is INT32; the parser supports FP32, FP16, BF16"),
    "mixed-precision BatchNormalization (10.3)": (mixed_precision_batch_norm, ("10.3",), "from TensorRT 10.7"),
    "opset 21 (10.3)": (opset_21, ("10.3",), "graph: opset 21 is outside the opset range 9-20"),
    "Cast to INT8": (cast_to_int8, ("10.3", "11", "rtx"), "to is INT8; the parser casts to"),
    "LayerNormalization Mean output used": (layer_norm_mean_used, ("10.3", "11", "rtx"), "only the first output `Y`"),
    "ScatterElements add with INT32 indices": (lambda: scatter_add(TensorProto.INT32), ("10.3", "11", "rtx"), "INT64 indices only"),
    "QuantizeLinear with a zero point": (lambda: quantize(np.array(3, np.int8)), ("10.3", "11", "rtx"), "must be 0"),
    "QuantizeLinear to UINT8": (lambda: quantize(np.array(0, np.uint8), dequantize=False), ("10.3", "11", "rtx"), "signed INT8 only"),
    "TokenGather of another version": (lambda: token_gather_graph(plugin_version="2"), ("10.3", "11", "rtx"),
                                       "plugin_version '2' is not the version the TokenGather plugin registers ('1')"),
    "TokenGather with a float K": (lambda: token_gather_graph(K=3.0), ("10.3", "11", "rtx"),
                                   "attribute 'K' is FLOAT, the plugin reads it as INT"),
    "TokenGather with an unknown attribute": (lambda: token_gather_graph(keep=3), ("10.3", "11", "rtx"),
                                              "attribute 'keep' is not a field of the TokenGather creator"),
    "TokenGather without plugin_namespace (11)": (lambda: token_gather_graph(plugin_namespace=None), ("11", "rtx"),
                                                  "read from the node's domain"),
    "TokenGather K beyond the patch tokens": (lambda: token_gather_graph(K=9), ("10.3", "11", "rtx"), "K 9 is outside 1..8"),
}


@pytest.mark.parametrize("case", list(MUST_FAIL))
def test_graphs_that_must_fail_fail_with_one_line_naming_node_and_reason(case):
    build, failing, fragment = MUST_FAIL[case]
    model = build()
    for table in SUPPORT_TABLES:
        problems = tensorrt_support(model, table)
        if table in failing:
            assert len(problems) == 1, (table, [str(p) for p in problems])
            line = str(problems[0])
            plugin_node = model.graph.node[-1].op_type in (trt_plugins.PLUGIN_NAME, "FancyGather", "ScatterElements")
            expected = "TensorRT-RTX ships no plugin library" if table == "rtx" and plugin_node else fragment
            assert "\n" not in line and expected in line, (table, line)
            assert line.startswith("graph: ") or line.startswith(f"node '{model.graph.node[-1].name}'") or "node '" in line
            assert problems[0].source in support_data()["sources"]
        else:
            assert problems == [], (table, [str(p) for p in problems])


@pytest.mark.parametrize("build", [folded_k, k_from_static_shape, lambda: scatter_add(INT64), token_gather_graph,
                                   lambda: quantize(np.array(0, np.int8))],
                         ids=["K folded from a Constant", "K from a static dimension", "ScatterElements add, INT64",
                              "TokenGather as exported", "symmetric INT8 quantize"])
def test_graphs_that_must_pass_pass_on_both_versions(build):
    for table in BOTH_TABLES:
        assert tensorrt_support(build(), table) == []


RTX_REFUSALS = {  # TensorRT-RTX ships no plugin library: what TensorRT runs as a plugin, it refuses
    "TokenGather (its parser aborts the process on it)": (token_gather_graph, "ships no plugin library"),
    "ScatterElements with a reduction": (lambda: scatter_add(INT64), "reduction is 'add'"),
}


@pytest.mark.parametrize("case", list(RTX_REFUSALS))
def test_rtx_refuses_what_tensorrt_runs_as_a_plugin(case):
    build, fragment = RTX_REFUSALS[case]
    problems = tensorrt_support(build(), "rtx")
    assert len(problems) == 1 and fragment in str(problems[0]), [str(p) for p in problems]
    assert tensorrt_support(build(), "1.7.1.116") == problems


def test_versions_map_to_the_tables_of_their_major():
    assert [support_table(v) for v in ("10.3.0.30", "10.7", "10.3", "11", "11.1.0.7")] == ["10.3"] * 3 + ["11"] * 2
    assert [support_table(v) for v in ("rtx", "1.7.1.116", "1.8")] == ["rtx"] * 3
    assert target_tables("both") == BOTH_TABLES == ("10.3", "11") and target_tables("rtx") == ("rtx",)
    assert target_tables(["11", "1.7.1.116"]) == ("11", "rtx")
    for bad in ("8.6.1", "12.0", "jetpack"):
        with pytest.raises(SupportDataError):
            support_table(bad)


# ----------------------------------------------------------------------------- the data


def test_data_has_a_row_for_every_onnx_operator_up_to_the_documented_opset():
    data = support_data()
    operators = {s.name for s in defs.get_all_schemas_with_history() if s.domain == ""}
    since = {name: min(s.since_version for s in defs.get_all_schemas_with_history() if s.domain == "" and s.name == name)
             for name in operators}
    for table in SUPPORT_TABLES:
        highest = data["versions"][table]["opset"]["max"]
        # A matrix lists every operator of its opset range; TensorRT-RTX's rows are measured, and "listed": false
        # there records that its parser has no importer for the operator.
        unlisted = [n for n in operators if data["operators"].get(n, {}).get(table, {}).get("listed") is False]
        missing = [n for n in operators if since[n] <= highest and (n not in data["operators"] or
                                                                    table != "rtx" and n in unlisted)]
        assert missing == [], (table, missing)


def test_every_row_and_rule_is_well_formed_and_names_its_source():
    data = support_data()
    assert set(data["versions"]) == set(SUPPORT_TABLES)
    for version in data["versions"].values():
        assert all(source in data["sources"] for source in version["sources"])
    for name, entry in data["operators"].items():
        for table in SUPPORT_TABLES:
            row = entry[table]
            assert isinstance(row["supported"], bool), name
            assert all(token in data["type_tokens"] for token in row.get("types", [])), (name, row)
        for rule in entry.get("rules", []):
            assert rule["kind"] in RULE_CHECKS, (name, rule)
            assert_cites_its_sources(rule, data)
    for rule in data["graph_rules"]:
        assert rule["kind"] in GRAPH_RULE_CHECKS, rule
        assert_cites_its_sources(rule, data)
    operators = data["operators"]  # a few rows checked against the matrices as published
    assert operators["TopK"]["10.3"]["restrictions"] == "`sorted` must be 1. `K` input must be less than 3840."
    assert not operators["Swish"]["10.3"]["supported"] and operators["Swish"]["11"]["supported"]
    assert "restrictions" not in operators["Slice"]["10.3"]  # tensor axes arrived in 10.3 GA
    assert operators["Pad"]["10.3"]["restrictions"] == "`axes` must be an initializer" and "restrictions" not in operators["Pad"]["11"]
    assert operators["Pow"]["11"]["types"][-2:] == ["INT32", "INT64"] and "INT32" not in operators["Pow"]["10.3"]["types"]


def assert_cites_its_sources(rule: dict, data: dict) -> None:
    """A rule names the tables it holds for, a reason, and for each table a source the data describes."""
    assert set(rule["versions"]) <= set(SUPPORT_TABLES) and rule["reason"], rule
    assert all(rule_source(rule, table) in data["sources"] for table in rule["versions"]), rule


# ----------------------------------------------------------------------------- every graph the tool exports


def contract_graphs(method, model, images, label: str, flavours=None) -> dict[str, onnx.ModelProto]:
    """The graphs the export writes for ``model``, through the method's own export contract (what export_model calls,
    without its validation): the float32 shipped graph (dynamic batch), and per flavour the float32 debug twin
    (static batch), the mixed float16 debug twin (dynamic batch) and the INT8 one (explicit Q/DQ calibrated on
    ``images`` on the float32 graph, moved onto the float16 twin). Debug twins are the shipped graphs plus outputs."""
    from calibration.int8 import quantize_for_export, transplant_qdq

    def graph(flavour, precision, dynamic, debug):
        return method.export_onnx(method.deploy_copy(model, precision), flavour, 2, dynamic, 17, debug)

    base = graph(method.flavours[0], "fp32", True, False)
    quantized, _ = quantize_for_export(base, images, method="ort", float_scopes=method.float_scopes)
    graphs = {f"{label} {method.flavours[0]} fp32 dynamic": base}
    for flavour in flavours or method.flavours:
        graphs[f"{label} {flavour} fp32 static debug"] = graph(flavour, "fp32", False, True)
        half = graphs[f"{label} {flavour} fp16 dynamic debug"] = graph(flavour, "fp16", True, True)
        graphs[f"{label} {flavour} int8 dynamic debug"] = transplant_qdq(quantized, half)
    return graphs


@pytest.fixture(scope="module")
def exported_graphs() -> dict[str, onnx.ModelProto]:
    """DynamicViT (the demo model: native and plugin flavours), LV-ViT (small, random weights) and ToMe (the demo
    ViT: one-hot and scatter flavours; LV-ViT's selection is DynamicViT's), each in every precision, in both kinds
    of batch."""
    from compress.models import create_model
    from export.subject import demo_subject
    from export.tome_export import load_tome_subject
    from export.methods import DynamicViTExport
    from export.tome_export import ToMeExport

    demo = demo_subject(8)
    images = demo.real_images["demo-test"].numpy()
    torch.manual_seed(0)
    lvvit = create_model("dynamicvit_lvvit_s", 0.7, (1, 2, 3), img_size=64, embed_dim=64, depth=4, num_heads=2,
                         num_classes=10).eval()
    tome = load_tome_subject(None, None, 4).model
    return {**contract_graphs(DynamicViTExport(0.6), demo.model, images, "dynamicvit"),
            **contract_graphs(DynamicViTExport(0.7), lvvit, np.random.default_rng(0).standard_normal(
                (8, *lvvit.image_shape)).astype(np.float32), "lvvit", ["native"]),
            **contract_graphs(ToMeExport(4), tome, images, "tome")}


def test_every_graph_the_tool_exports_parses_on_both_versions(exported_graphs):
    problems = {name: [f"{table}: {p}" for table in BOTH_TABLES for p in tensorrt_support(model, table)]
                for name, model in exported_graphs.items()}
    assert {name: found for name, found in problems.items() if found} == {}
    refused_on_rtx = {name for name, model in exported_graphs.items() if tensorrt_support(model, "rtx")}
    assert refused_on_rtx == {name for name in exported_graphs if " plugin " in name or " scatter " in name}
    seen = {n.op_type for model in exported_graphs.values() for n in model.graph.node}
    assert {"TokenGather", "ScatterElements", "QuantizeLinear", "DequantizeLinear", "BatchNormalization"} <= seen
    assert len(exported_graphs) == 7 + 4 + 7


@pytest.mark.skipif(import_bindings(TENSORRT_RTX) is None, reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')")
def test_the_rtx_table_takes_exactly_the_exported_graphs_tensorrt_rtx_parses_and_builds(exported_graphs, tmp_path):
    """Every graph the export contracts write goes through TensorRT-RTX's real parser and CPU build (in child
    processes: its parser ends the process on a plugin node once the plugin is registered) and through the rtx
    table: the same verdict for each. Both refuse the plugin flavour and ToMe's scatter flavour."""
    from export.on_target.parser_agreement import parser_outcome, probe_corpus

    paths = {}
    for name, model in exported_graphs.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.onnx"
        onnx.save(model, str(paths[name]))
    parsed = probe_corpus(paths, "rtx", tmp_path, jobs=2, timeout=300, progress=lambda line: None)
    built = {name for name, record in parsed.items() if parser_outcome(record) == "builds"}
    assert {name for name, model in exported_graphs.items() if not tensorrt_support(model, "rtx")} == built
    assert set(exported_graphs) - built == {name for name in exported_graphs if " plugin " in name or " scatter " in name}


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory) -> Path:
    """export.build's own output (export_model): a small LV-ViT, plugin flavour, mixed float16."""
    from compress.models.checkpoint import save_dynamicvit
    from compress.models import create_model
    from export.api import ExportRequest, export_model
    from export.methods import DynamicViTOptions

    root = tmp_path_factory.mktemp("support")
    torch.manual_seed(0)
    save_dynamicvit(create_model("dynamicvit_lvvit_s", 0.7, (1, 2, 3), img_size=64, embed_dim=64, depth=4,
                                 num_heads=2, num_classes=10).eval(), root / "lvvit.pth")
    request = ExportRequest(checkpoint=root / "lvvit.pth", method=DynamicViTOptions(gather="plugin"), fp16=True,
                            backend="ort", out=root / "out")
    return export_model(request).out


def test_the_manifest_records_the_verdict_per_version(export_folder):
    manifest = json.loads((export_folder / "manifest.json").read_text())
    graphs = sorted(a["path"] for a in manifest["artifacts"] if a["role"].startswith("onnx"))
    support = manifest["tensorrt_support"]
    assert support["targets"] == ["10.3", "11"] and sorted(support["graphs"]) == graphs
    assert all(support["versions"][table]["supported"] and support["versions"][table]["target"] for table in BOTH_TABLES)
    assert support["versions"]["rtx"] == {**support["versions"]["rtx"], "supported": False, "target": False}
    assert all(per["10.3"] == per["11"] == [] for per in support["graphs"].values())
    assert {graph for graph, per in support["graphs"].items() if per["rtx"]} == {g for g in graphs if "plugin" in g}


def lint(folder: Path, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.engine", str(folder), "--lint", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env=torch_free_env(tmp_path))


def test_lint_passes_the_export_without_torch_and_fails_a_graph_it_cannot_parse(export_folder, tmp_path):
    folder = export_folder
    passed = lint(folder, tmp_path)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    graphs = [a["path"] for a in json.loads((folder / "manifest.json").read_text())["artifacts"] if a["role"].startswith("onnx")]
    verdicts = [line for line in passed.stdout.splitlines() if "TensorRT 10.3" in line or "TensorRT 11" in line]
    assert len([v for v in verdicts if v.strip().split()[0] in graphs]) == 2 * len(graphs) and "PASSED" in passed.stdout
    assert lint(folder, tmp_path, "--trt-version", "11").stdout.count("TensorRT 11 ") == len(graphs)

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in folder.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    onnx.save(token_gather_graph(plugin_version="2"), str(broken / "model_plugin.debug.onnx"))
    manifest = json.loads((broken / "manifest.json").read_text())
    from export.on_target.golden import sha256_of
    for entry in manifest["artifacts"]:
        if entry["path"] == "model_plugin.debug.onnx":
            entry["sha256"] = sha256_of(broken / entry["path"])
    (broken / "manifest.json").write_text(json.dumps(manifest))
    failed = lint(broken, tmp_path)
    assert failed.returncode == 1 and "FAILED" in failed.stdout, failed.stdout + failed.stderr
    problem_lines = [line for line in failed.stdout.splitlines() if "node 'gather' (TokenGather)" in line]
    assert len(problem_lines) == 2 and all("plugin_version '2'" in line for line in problem_lines), failed.stdout

    (broken / "manifest.json").unlink()
    no_manifest = lint(broken, tmp_path)
    assert no_manifest.returncode == 2 and no_manifest.stderr.count("error:") == 1 and "manifest" in no_manifest.stderr
    missing = lint(tmp_path / "nowhere", tmp_path)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_the_export_refuses_a_graph_a_target_cannot_parse_and_warns_for_another_version(export_folder, tmp_path):
    from export.api import ExportRequest, Manifest, ValidationFailed, tensorrt_support_step
    from export.build import tensorrt_support_lines

    staging = tmp_path / "staging"
    staging.mkdir()
    onnx.save(mixed_precision_batch_norm(), str(staging / "model.onnx"))  # refused by 10.3 only
    recorded = json.loads((export_folder / "manifest.json").read_text())
    manifest = Manifest.from_dict({**recorded, "artifacts": [{"path": "model.onnx", "role": "onnx"}]})
    with pytest.raises(ValidationFailed, match=r"model.onnx would not parse on TensorRT 10.3: node 'bn' "
                                               r"\(BatchNormalization\): mixed-precision BatchNormalization"):
        tensorrt_support_step(ExportRequest(backend="ort"), staging, manifest, lambda text: None)
    checked = tensorrt_support_step(ExportRequest(backend="ort", tensorrt_versions="11"), staging, manifest,
                                    lambda text: None).tensorrt_support
    assert checked["versions"]["10.3"] == {**checked["versions"]["10.3"], "supported": False, "target": False}
    assert checked["versions"]["11"]["supported"] and checked["versions"]["11"]["target"]
    lines = tensorrt_support_lines({"tensorrt_support": checked}, Path("out"))
    assert "10.3 NOT supported" in lines[0] and "11 supported (target)" in lines[0]
    assert lines[1].startswith("  warning: 1 problem(s) on TensorRT 10.3 (not a --trt-version target)")


def test_no_engine_build_starts_on_a_graph_the_installed_tensorrt_would_refuse(tmp_path):
    from export.on_target.engine import UnsupportedGraph, require_supported

    onnx.save(run_time_k(), str(tmp_path / "model.debug.onnx"))
    with pytest.raises(UnsupportedGraph, match=r"would not parse on TensorRT 10.3.0.30 .*node 'select' \(TopK\)"):
        require_supported([tmp_path / "model.debug.onnx"], "10.3.0.30")
    onnx.save(folded_k(), str(tmp_path / "fine.onnx"))
    require_supported([tmp_path / "fine.onnx"], "11.1.0")
