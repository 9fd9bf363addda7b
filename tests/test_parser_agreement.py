"""The parser-support check against a real parser (issue 26).

One test per rule the comparison with TensorRT-RTX 1.7.1's parser added or corrected, each on the ONNX backend node
test case it was added for (generated from the installed onnx package, by name): the rule's reason must appear on
the tables it holds for, and a corrected false refusal must be gone. Then the harness itself
(``python -m export.on_target.tensorrt_support --against-parser``) on a four-graph corpus with the real parser, where
TensorRT-RTX is installed.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_in_process
from export.on_target.parser_agreement import ParserWorker, against_parser, make_node_corpus
from export.on_target.runtimes import TENSORRT_RTX, import_bindings
from export.on_target.tensorrt_support import SUPPORT_TABLES, tensorrt_support

RTX_MISSING = None if import_bindings(TENSORRT_RTX) is not None else "TensorRT-RTX is not installed (pip install -e '.[rtx]')"
NEEDS_RTX = pytest.mark.skipif(RTX_MISSING is not None, reason=str(RTX_MISSING))


@pytest.fixture(scope="module")
def node_cases() -> dict:
    """ONNX's backend node test cases by name (about 3 s to generate)."""
    from onnx.backend.test.case.node import collect_testcases

    return {case.name: case.model for case in collect_testcases(None) if case.model is not None}


def refuses(fragment: str) -> tuple[str, str]:
    return ("refuses", fragment)


def takes(op: str) -> tuple[str, str]:
    """No problem on the nodes of ``op`` (the graph may have others: an opset outside a table's range)."""
    return ("takes", op)


SUPPORTED = ("supported", "")  # no problem at all


ALL = SUPPORT_TABLES
# rule -> (the node test case it was added for, {table: what the check must say})
RULE_CASES = {
    "LpPool p is 1 or 2": ("test_lppool_2d_default", {t: refuses("`p` must be 1 or 2") for t in ALL}),
    "BatchNormalization training_mode 0": ("test_batchnorm_example_training_mode",
                                           {t: refuses("`training_mode` must be 0") for t in ALL}),
    "RandomUniformLike dtype FLOAT or FLOAT16": ("test_bernoulli_expanded",
                                                 {t: refuses("must be FLOAT or FLOAT16") for t in ALL}),
    "Celu FP32 only": ("test_celu_float16", {t: refuses("builds Celu from FP32 constants") for t in ALL}),
    "MatMul 1-D by rank 3": ("test_matmul_1d_3d", {t: refuses("a 1-D first input times") for t in ALL}),
    "Mod fmod 0 integers": ("test_mod_float32_mixed_sign_fmod_0",
                            {t: refuses("with `fmod` 0 the inputs must be integers") for t in ALL}),
    "Range INT32, INT64, FP32": ("test_range_float16_type_positive_delta",
                                 {t: refuses("INT32, INT64 and FP32 bounds only") for t in ALL}),
    "Split last chunk": ("test_affine_grid_3d_expanded", {t: refuses("last chunk would be negative") for t in ALL}),
    "Resize axes with a scales tensor": ("test_resize_upsample_scales_nearest_axes_2_3",
                                         {t: refuses("cannot interlace a scales tensor") for t in ALL}),
    "float network input as Resize scales": ("test_resize_upsample_scales_nearest",
                                             {t: refuses("used as a shape tensor") for t in ALL}),
    "float network input as a Loop trip count": ("test_range_float_type_positive_delta_expanded",
                                                 {t: refuses("used as a shape tensor") for t in ALL}),
    "inputs are tensors": ("test_identity_opt", {t: refuses("must be a tensor") for t in ALL}),
    "If branch ranks": ("test_affine_grid_2d_expanded",
                        {t: refuses("must have the same rank when the condition") for t in ALL}),
    "TensorScatter linear (11, rtx)": ("test_tensorscatter_circular",
                                       {t: refuses("only the `linear` mode") for t in ("11", "rtx")}),
    "Attention mask with is_causal (11)": ("test_attention_4d_attn_mask_3d_causal",
                                           {"11": refuses("a causal mask or a mask, not both")}),
    "Attention K and V shapes (11)": ("test_attention_4d_diff_heads_sizes",
                                      {"11": refuses("`K` and `V` must have the same shape")}),
    # TensorRT-RTX, measured
    "Attention refused on rtx": ("test_attention_4d", {"rtx": refuses("no fused kernel"), "11": takes("Attention")}),
    "NonMaxSuppression refused on rtx": ("test_nonmaxsuppression_single_box",
                                         {"rtx": refuses("has no implementation of its layer"),
                                          "11": takes("NonMaxSuppression")}),
    "RoiAlign refused on rtx": ("test_roialign_aligned_false",
                                {"rtx": refuses("ships no plugin library"), "11": takes("RoiAlign")}),
    "DeformConv refused on rtx": ("test_basic_deform_conv_without_padding",
                                  {"rtx": refuses("ships no plugin library"), "11": takes("DeformConv")}),
    "ScatterElements reduction refused on rtx": ("test_scatter_elements_with_reduction_max",
                                                 {"rtx": refuses("ships no plugin library"),
                                                  "11": takes("ScatterElements")}),
    "INT8 arithmetic on rtx": ("test_add_int8", {"rtx": SUPPORTED, "11": refuses("is INT8")}),
    **{f"INT8 in {op} on rtx": (case, {"rtx": SUPPORTED, "11": refuses("is INT8")}) for op, case in (
        ("Sub", "test_sub_int8"), ("Mul", "test_mul_int8"), ("Div", "test_div_int8"), ("Max", "test_max_int8"),
        ("Min", "test_min_int8"), ("Equal", "test_equal_int8"), ("Greater", "test_greater_int8"),
        ("GreaterOrEqual", "test_greater_equal_int8"), ("Less", "test_less_int8"),
        ("LessOrEqual", "test_less_equal_int8"), ("Identity", "test_clip_default_int8_inbounds_expanded"),
        ("Where", "test_clip_default_int8_max_expanded"))},
    "UINT8 in Equal on rtx": ("test_equal_uint8", {"rtx": SUPPORTED, "11": refuses("is UINT8")}),
    "GridSample 5-D on rtx": ("test_gridsample_volumetric_nearest_align_corners_0",
                              {"rtx": takes("GridSample"), "11": refuses("must be 4D")}),
    "LSTM layout 1 on rtx": ("test_lstm_batchwise", {"rtx": takes("LSTM"), "11": refuses("`layout`")}),
    # false refusals the importer source shows wrong
    "Resize cubic": ("test_resize_upsample_sizes_cubic", {t: takes("Resize") for t in ALL}),
    "1-D pooling": ("test_averagepool_1d_default", {t: takes("AveragePool") for t in ALL}),
    "window operators typed by their output": ("test_hannwindow", {t: takes("HannWindow") for t in ("11", "rtx")}),
}


@pytest.mark.parametrize("rule", list(RULE_CASES))
def test_each_rule_on_the_node_test_it_was_added_for(rule, node_cases):
    case, expected = RULE_CASES[rule]
    model = node_cases[case]
    for table, (verdict, what) in expected.items():
        problems = tensorrt_support(model, table)
        if verdict == "refuses":
            assert any(what in str(p) for p in problems), (table, [str(p) for p in problems])
        elif verdict == "takes":
            assert [str(p) for p in problems if p.op == what] == [], table
        else:
            assert [str(p) for p in problems] == [], table


@pytest.mark.parametrize("op", ["RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike"])
def test_a_random_operator_may_be_asked_for_float_or_float16_only(op):
    """The importer's static check, shared by the four random operators (RandomUniformLike is the node test case)."""
    inputs = ["x"] if op.endswith("Like") else []
    extra = {} if op.endswith("Like") else {"shape": [2, 3]}

    def model(dtype):
        node = helper.make_node(op, inputs, ["y"], name="random", dtype=dtype, **extra)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])][:len(inputs)],
                                  [helper.make_tensor_value_info("y", dtype, [2, 3])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    for table in SUPPORT_TABLES:
        assert tensorrt_support(model(TensorProto.FLOAT16), table) == []
        refused = tensorrt_support(model(TensorProto.DOUBLE), table)
        assert len(refused) == 1 and "must be FLOAT or FLOAT16" in str(refused[0]), table


def resize_with_constant_scales(mode: str, scales: list[float]):
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode=mode)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(scales, np.float32), "scales")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_resize_with_constant_scales_resizes_only_the_innermost_dimensions_its_mode_allows():
    for table in SUPPORT_TABLES:
        assert tensorrt_support(resize_with_constant_scales("cubic", [1, 1, 2, 2]), table) == []
        refused = tensorrt_support(resize_with_constant_scales("cubic", [1, 2, 2, 2]), table)
        assert len(refused) == 1 and "cubic the innermost 2" in str(refused[0]), table
        assert tensorrt_support(resize_with_constant_scales("linear", [1, 2, 2, 2]), table) == []


# ----------------------------------------------------------------------------- the harness, with the real parser


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Four node test cases written by --make-node-corpus: one the check and the parser both take, one that needs a
    shape-tensor value in the profile (Tile's repeats), one refused at parse (LpPool p 3) and one refused at build
    (Attention on the CPU)."""
    root = tmp_path_factory.mktemp("corpus")
    assert make_node_corpus(root / "all") > 1500
    corpus = root / "node"
    corpus.mkdir()
    for name in ("test_abs", "test_tile", "test_lppool_2d_default", "test_attention_4d"):
        for suffix in (".onnx", ".npz"):
            (corpus / f"{name}{suffix}").write_bytes((root / "all" / f"{name}{suffix}").read_bytes())
    return corpus


@NEEDS_RTX
def test_the_harness_counts_parse_and_build_apart_and_resumes(small_corpus, tmp_path):
    out = tmp_path / "out"
    lines = []
    report = against_parser([small_corpus], out, "rtx", jobs=2, timeout=120, progress=lines.append)
    outcomes = {graph.split("/")[-1]: facts["parser"] for graph, facts in report["graph_results"].items()}
    assert outcomes["test_abs.onnx"]["built"] and outcomes["test_tile.onnx"]["built"]
    assert outcomes["test_lppool_2d_default.onnx"]["parsed"] is False
    assert outcomes["test_attention_4d.onnx"]["parsed"] and outcomes["test_attention_4d.onnx"]["built"] is False
    rtx = report["tables"]["rtx"]
    assert rtx["cells"]["supported"]["builds"] == 2 and rtx["agree"] == 4 and rtx["false_accepts_parse"] == 0
    assert report["tables"]["11"]["false_accepts_build"] == 1  # the 11.x table takes this Attention node
    assert any(line.startswith("table rtx") for line in lines) and json.loads((out / "agreement.json").read_text())
    assert len((out / "parser.rtx.jsonl").read_text().splitlines()) == 4

    again = []
    against_parser([small_corpus], out, "rtx", jobs=1, timeout=120, progress=again.append)
    assert "4 graph(s) recorded" in again[2] and "0 to probe" in again[2]
    assert len((out / "parser.rtx.jsonl").read_text().splitlines()) == 4


@NEEDS_RTX
def test_a_graph_that_outlasts_its_time_is_recorded_and_the_next_one_gets_a_fresh_process(small_corpus, tmp_path):
    worker = ParserWorker("rtx", tmp_path / "parser.log")
    try:
        late = worker.probe(small_corpus / "test_abs.onnx", timeout=0.01)  # the child is still importing
        assert late["timed_out"] and worker.process is None
        assert worker.probe(small_corpus / "test_abs.onnx", timeout=120)["built"]
    finally:
        worker.close()


def test_a_corpus_that_is_not_there_is_one_error_line(tmp_path):
    missing = run_in_process("export.on_target.parser_agreement", "--against-parser", tmp_path / "nowhere",
                             "--out", tmp_path / "out")
    assert missing.returncode == 2 and missing.stderr.count("error:") == 1 and "corpus not found" in missing.stderr
