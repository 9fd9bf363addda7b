"""Accuracy of exported graphs on ONNX Runtime: logits over a whole image set, top-1, agreement."""
from __future__ import annotations

import numpy as np
import onnx

from calibration.int8 import static_batch


def onnx_logits(model: onnx.ModelProto, images: np.ndarray, batch_size: int = 32, session=None) -> np.ndarray:
    """Logits [N, classes] of ``model`` (CPU ONNX Runtime, TokenGather through its custom op).

    A static-batch graph is fed in chunks of its batch, the last chunk padded by repeating its final image.
    """
    from export.validate import onnxruntime_session

    session = session or onnxruntime_session(model)
    size = static_batch(model) or batch_size
    outputs = []
    for start in range(0, len(images), size):
        chunk = np.ascontiguousarray(images[start:start + size], dtype=np.float32)
        real = len(chunk)
        if real < size and static_batch(model):
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
        outputs.append(session.run(["logits"], {"images": chunk})[0][:real])
    return np.concatenate(outputs)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Percent of images whose highest logit is the label."""
    return float((logits.argmax(1) == labels).mean() * 100.0)


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Percent of images where two models predict the same class."""
    return float((logits.argmax(1) == reference.argmax(1)).mean() * 100.0)


def int8_vs_float(fp32: onnx.ModelProto, int8: onnx.ModelProto, images: np.ndarray,
                  labels: np.ndarray | None = None) -> dict:
    """Top-1 agreement of the INT8 graph with float32, logit error, and both accuracies when labels are known."""
    reference, quantized = onnx_logits(fp32, images), onnx_logits(int8, images)
    result = {"images": int(len(images)), "top1_agreement": top1_agreement(quantized, reference),
              "max_abs_error": float(np.abs(quantized - reference).max())}
    if labels is not None:
        result["fp32_top1"] = top1_accuracy(reference, labels)
        result["int8_top1"] = top1_accuracy(quantized, labels)
        result["top1_drop"] = result["fp32_top1"] - result["int8_top1"]
    return result
