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

RANDOM_INPUTS = "random"  # the name of the seeded random image set


@dataclass
class Comparison:
    inputs: str  # "random" or a data set's name
    batch: int
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float
    kept_sets_identical: bool
    kept_order_identical: bool
    finite: bool
    max_abs_tolerance: float | None  # None: reduced precision, no error bound on the logits
    min_top1_agreement: float | None  # reduced precision on real images: the decision must agree

    @property
    def passed(self) -> bool:
        if not self.finite:
            return False
        if self.max_abs_tolerance is not None:  # float32: same numbers and the same tokens
            return self.max_abs_error <= self.max_abs_tolerance and self.kept_sets_identical
        return self.min_top1_agreement is None or self.top1_agreement >= self.min_top1_agreement

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


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch size of the graph's first input, or None when the batch axis is dynamic."""
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def run_batched(session, model: onnx.ModelProto, images: torch.Tensor) -> list[np.ndarray]:
    """All outputs for ``images`` of any count, in chunks of the graph's static batch (the last one padded)."""
    batch = static_batch(model) or len(images)
    chunks = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padded = torch.cat([chunk, images[: batch - len(chunk)]]) if len(chunk) < batch else chunk
        chunks.append([out[: len(chunk)] for out in session.run(None, {"images": padded.numpy()})])
    return [np.concatenate(parts) for parts in zip(*chunks)]


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
    min_top1_agreement: float | None = None,
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
        finite=bool(np.isfinite(logits).all()),
        max_abs_tolerance=max_abs_tolerance,
        min_top1_agreement=min_top1_agreement,
    )


def validate_graph(
    debug_graph: onnx.ModelProto,
    model: DynamicViT,
    input_sets: dict[str, torch.Tensor],
    max_abs_tolerance: float | None,
    min_top1_agreement_real: float | None = None,
) -> list[Comparison]:
    """Run ``debug_graph`` (exported with kept indices) on every input set and compare with PyTorch.

    ``min_top1_agreement_real`` applies to real image sets only: on random images a reduced-precision
    graph's top-1 is a coin toss between near-equal logits and proves nothing.
    """
    session = onnxruntime_session(debug_graph)
    results = []
    for name, images in input_sets.items():
        outputs = run_batched(session, debug_graph, images)
        agreement = None if name == RANDOM_INPUTS else min_top1_agreement_real
        results.append(compare(pytorch_reference(model, images), outputs, name, max_abs_tolerance, agreement))
    return results


def shipped_vs_debug(graph: onnx.ModelProto, debug_graph: onnx.ModelProto, input_sets: dict[str, torch.Tensor]) -> float:
    """Max abs logit difference between a shipped graph and its debug twin over every input set."""
    shipped, debug = onnxruntime_session(graph), onnxruntime_session(debug_graph)
    worst = 0.0
    for images in input_sets.values():
        difference = run_batched(shipped, graph, images)[0] - run_batched(debug, debug_graph, images)[0]
        worst = max(worst, float(np.abs(difference).max()))
    return worst
