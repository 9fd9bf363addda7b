"""TokenGather on ONNX Runtime (onnxruntime-extensions custom op) against the PyTorch reference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import TensorProto

from compress.models.token_select import select_tokens
from trt_plugins import ONNX_DOMAIN, PLUGIN_NAME, SPEC_PATH
from trt_plugins.ort_token_gather import (
    CONTRIB_DOMAIN,
    make_session,
    make_token_gather_model,
    to_onnxruntime_model,
    token_gather_numpy,
)

pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions not installed")

ONNX_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
# (B, N, C, K): a DeiT-S stage, large N with K = 1 and K = N - 1, the smallest op, odd C.
SHAPES = [(2, 197, 384, 98), (3, 1025, 16, 1), (2, 1025, 8, 1024), (1, 2, 5, 1), (4, 17, 3, 16)]


def random_inputs(shape, tokens_dtype, scores_dtype, ties: bool, seed: int = 0):
    batch, num_tokens, channels, _ = shape
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((batch, num_tokens, channels)).astype(tokens_dtype)
    scores = rng.standard_normal((batch, num_tokens - 1))
    if ties:  # a handful of distinct values: most comparisons are ties
        scores = np.round(scores * 2) / 2
    return tokens, scores.astype(scores_dtype)


def reference(tokens: np.ndarray, scores: np.ndarray, k: int):
    kept, indices = select_tokens(torch.from_numpy(tokens), torch.from_numpy(scores), k)
    return kept.numpy(), indices.numpy()


def run(model, tokens, scores):
    return make_session(model).run(None, {"tokens": tokens, "scores": scores})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_N{}_C{}_K{}".format(*s))
@pytest.mark.parametrize("tokens_dtype", [np.float32, np.float16], ids=["tok32", "tok16"])
@pytest.mark.parametrize("scores_dtype", [np.float32, np.float16], ids=["sc32", "sc16"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_ort_op_matches_reference(shape, tokens_dtype, scores_dtype, ties):
    tokens, scores = random_inputs(shape, tokens_dtype, scores_dtype, ties)
    k = shape[3]
    expected_kept, expected_indices = reference(tokens, scores, k)
    model = make_token_gather_model(k, with_indices=True, tokens_type=ONNX_TYPES[tokens_dtype],
                                    scores_type=ONNX_TYPES[scores_dtype])
    kept, indices = run(model, tokens, scores)
    assert kept.dtype == tokens_dtype and indices.dtype == np.int32
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(kept, expected_kept)


@pytest.mark.parametrize("tokens_dtype", [np.float32, np.float16], ids=["tok32", "tok16"])
def test_ort_op_without_indices_output(tokens_dtype):
    shape = (3, 197, 64, 70)
    tokens, scores = random_inputs(shape, tokens_dtype, np.float32, ties=True, seed=1)
    model = make_token_gather_model(shape[3], with_indices=False, tokens_type=ONNX_TYPES[tokens_dtype])
    outputs = run(model, tokens, scores)
    assert len(outputs) == 1
    np.testing.assert_array_equal(outputs[0], reference(tokens, scores, shape[3])[0])


def test_ort_op_nan_and_signed_zero_follow_the_reference():
    scores = np.array([[0.0, np.nan, -0.0, np.inf, 1.0, np.nan, -np.inf, 0.0]], dtype=np.float32)
    tokens = np.arange(9 * 2, dtype=np.float32).reshape(1, 9, 2)
    for k in (1, 3, 8):
        kept, indices = run(make_token_gather_model(k, with_indices=True), tokens, scores)
        expected_kept, expected_indices = reference(tokens, scores, k)
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_array_equal(kept, expected_kept)


def golden_cases():
    spec = json.loads(SPEC_PATH.read_text())
    return [pytest.param(case, id=case["name"]) for case in spec["golden"]]


@pytest.mark.parametrize("case", golden_cases())
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_golden_cases(case, dtype):
    tokens = np.array(case["tokens"], dtype=dtype)
    scores = np.array([[float(v) for v in row] for row in case["scores"]], dtype=dtype)
    # The golden data was made with the reference; both it and the ORT op must still reproduce it.
    ref_kept, ref_indices = reference(tokens, scores, case["K"])
    kept, indices = run(make_token_gather_model(case["K"], True, ONNX_TYPES[dtype], ONNX_TYPES[dtype]),
                        tokens, scores)
    for got_kept, got_indices in ((ref_kept, ref_indices), (kept, indices)):
        np.testing.assert_array_equal(got_indices, case["expected_indices"])
        np.testing.assert_array_equal(got_kept, np.array(case["expected_kept"], dtype=dtype))


def test_numpy_op_matches_reference_directly():
    tokens, scores = random_inputs((5, 300, 4, 150), np.float32, np.float32, ties=True, seed=3)
    kept, indices = token_gather_numpy(tokens, scores, 150)
    expected_kept, expected_indices = reference(tokens, scores, 150)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(kept, expected_kept)


def test_rewrite_works_on_a_copy_and_fixes_opsets():
    model = make_token_gather_model(4, with_indices=True)
    before = model.SerializeToString()
    rewritten = to_onnxruntime_model(model)
    assert model.SerializeToString() == before
    assert not [n for n in rewritten.graph.node if n.domain == ONNX_DOMAIN]
    assert [n.op_type for n in rewritten.graph.node if n.domain == CONTRIB_DOMAIN] == [f"{PLUGIN_NAME}_2out"]
    assert {o.domain for o in rewritten.opset_import} == {"", CONTRIB_DOMAIN}


def test_two_chained_stages_in_one_model():
    """Export graphs chain three TokenGather nodes; the second consumes the first's output."""
    from onnx import helper

    model = make_token_gather_model(10, with_indices=False)
    graph = model.graph
    graph.node.append(helper.make_node("Slice", ["kept", "starts", "ends", "axes"], ["kept_tail"]))
    graph.node.append(helper.make_node("ReduceMean", ["kept_tail"], ["scores2"], axes=[2], keepdims=0))
    graph.node.append(helper.make_node(PLUGIN_NAME, ["kept", "scores2"], ["kept2"], domain=ONNX_DOMAIN, K=4))
    graph.initializer.extend([helper.make_tensor(n, TensorProto.INT64, [1], [v])
                              for n, v in (("starts", 1), ("ends", 1 << 30), ("axes", 1))])
    graph.output.append(helper.make_tensor_value_info("kept2", TensorProto.FLOAT, None))
    tokens, scores = random_inputs((2, 33, 6, 10), np.float32, np.float32, ties=False, seed=4)
    kept, kept2 = run(model, tokens, scores)
    expected_kept = reference(tokens, scores, 10)[0]
    np.testing.assert_array_equal(kept, expected_kept)
    np.testing.assert_array_equal(kept2, reference(expected_kept, expected_kept[:, 1:].mean(axis=2), 4)[0])


def test_invalid_nodes_raise_clear_errors():
    with pytest.raises(ValueError, match="opset >= 15"):
        to_onnxruntime_model(make_token_gather_model(2, opset=13))
    model = make_token_gather_model(2, with_indices=False)
    model.graph.node[0].attribute[-1].i = 1  # with_indices=1 but one output
    assert model.graph.node[0].attribute[-1].name == "with_indices"
    with pytest.raises(ValueError, match="outputs"):
        to_onnxruntime_model(model)
    with pytest.raises(ValueError, match=r"\[1, N - 1"):
        token_gather_numpy(np.zeros((1, 3, 1), np.float32), np.zeros((1, 2), np.float32), 3)
