"""Validation of exported graphs against PyTorch: the check that runs before anything is final.

Figures per input set: max absolute and relative error on the logits, top-1 agreement, and the kept
patch positions of every stage (as sets, which decide the result, and in exact order, which can differ
only between scores within float rounding of each other: the order of kept tokens changes outputs by
summation order alone).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch

from compress.dynamicvit import DynamicViT


@dataclass
class Comparison:
    inputs: str  # "random" or a data set's name
    batch: int
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float
    kept_sets_identical: bool
    kept_order_identical: bool
    max_abs_tolerance: float | None  # None: no error bound (reduced precision), top-1 reported instead

    @property
    def passed(self) -> bool:
        within = self.max_abs_tolerance is None or self.max_abs_error <= self.max_abs_tolerance
        return within and (self.kept_sets_identical or self.max_abs_tolerance is None)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def onnxruntime_session(model: onnx.ModelProto):
    """A CPU ONNX Runtime session; graphs with TokenGather nodes run through the custom op."""
    import onnxruntime as ort

    if any(node.op_type == "TokenGather" for node in model.graph.node):
        from trt_plugins.ort_token_gather import make_session

        return make_session(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def pytorch_reference(model: DynamicViT, images: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """Float32 eager logits and kept positions (the project's tie rule) of the original model."""
    with torch.no_grad():
        logits, kept = model.eval().forward_pruned(images, return_indices=True)
    return logits.numpy(), [k.numpy() for k in kept]


def compare(
    reference: tuple[np.ndarray, list[np.ndarray]],
    outputs: list[np.ndarray],
    inputs: str,
    max_abs_tolerance: float | None,
) -> Comparison:
    """Compare a debug graph's outputs (logits, kept_stage1..) with the PyTorch reference."""
    ref_logits, ref_kept = reference
    logits, kept = outputs[0].astype(np.float64), outputs[1:]
    abs_error = np.abs(logits - ref_logits)
    scale = np.maximum(np.abs(ref_logits).max(), 1e-12)
    sets = all(
        set(map(int, a_row)) == set(map(int, b_row)) for a, b in zip(kept, ref_kept) for a_row, b_row in zip(a, b)
    ) and len(kept) == len(ref_kept)
    order = len(kept) == len(ref_kept) and all(np.array_equal(a, b) for a, b in zip(kept, ref_kept))
    return Comparison(
        inputs=inputs,
        batch=int(logits.shape[0]),
        max_abs_error=float(abs_error.max()),
        max_rel_error=float(abs_error.max() / scale),
        top1_agreement=float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
        kept_sets_identical=bool(sets),
        kept_order_identical=bool(order),
        max_abs_tolerance=max_abs_tolerance,
    )


def validate_graph(
    debug_graph: onnx.ModelProto,
    model: DynamicViT,
    input_sets: dict[str, torch.Tensor],
    max_abs_tolerance: float | None,
) -> list[Comparison]:
    """Run ``debug_graph`` (exported with kept indices) on every input set and compare with PyTorch."""
    session = onnxruntime_session(debug_graph)
    results = []
    for name, images in input_sets.items():
        outputs = session.run(None, {"images": images.numpy()})
        results.append(compare(pytorch_reference(model, images), outputs, name, max_abs_tolerance))
    return results


def shipped_vs_debug(graph: onnx.ModelProto, debug_graph: onnx.ModelProto, input_sets: dict[str, torch.Tensor]) -> float:
    """Max abs logit difference between a shipped graph and its debug twin over every input set."""
    shipped, debug = onnxruntime_session(graph), onnxruntime_session(debug_graph)
    worst = 0.0
    for images in input_sets.values():
        feed = {"images": images.numpy()}
        worst = max(worst, float(np.abs(shipped.run(None, feed)[0] - debug.run(None, feed)[0]).max()))
    return worst
