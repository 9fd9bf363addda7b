"""Accuracy of exported graphs on ONNX Runtime: logits over a whole image set, top-1 accuracy, agreement.

Accuracy and agreement are fractions in [0, 1], as everywhere in this project's outputs.
"""
from __future__ import annotations

import numpy as np
import onnx

from export.on_target.compare import onnxruntime_session, run_batched, static_batch, top1_agreement

__all__ = ["int8_vs_float", "onnx_logits", "top1_accuracy", "top1_agreement"]


def onnx_logits(model: onnx.ModelProto, images: np.ndarray, batch_size: int = 32, session=None) -> np.ndarray:
    """Logits [N, classes] of ``model`` (CPU ONNX Runtime, TokenGather through its custom op).

    A static-batch graph is fed in chunks of its batch (the last one padded with the set's own images), a
    dynamic-batch graph in chunks of ``batch_size``.
    """
    session = session or onnxruntime_session(model)
    name = session.get_inputs()[0].name
    (logits,) = run_batched(lambda chunk: session.run(["logits"], {name: chunk}), images,
                            static_batch(model) or batch_size)
    return logits


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose highest logit is the label."""
    return float((logits.argmax(1) == labels).mean())


def int8_vs_float(fp32: onnx.ModelProto, int8: onnx.ModelProto, images: np.ndarray,
                  labels: np.ndarray | None = None) -> dict:
    """Top-1 agreement of the INT8 graph with float32, logit error, and both accuracies when labels are known
    (fractions; ``top1_drop`` is float32's accuracy minus INT8's)."""
    reference, quantized = onnx_logits(fp32, images), onnx_logits(int8, images)
    result = {"images": int(len(images)), "top1_agreement": top1_agreement(quantized, reference),
              "max_abs_error": float(np.abs(quantized - reference).max())}
    if labels is not None:
        result["fp32_top1"] = top1_accuracy(reference, labels)
        result["int8_top1"] = top1_accuracy(quantized, labels)
        result["top1_drop"] = result["fp32_top1"] - result["int8_top1"]
    return result
