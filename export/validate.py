"""Validation of exported graphs against PyTorch: the check that runs before anything is final.

This is the torch side: the PyTorch reference and the ONNX Runtime runs that are compared with it. The
comparison itself (figures, criteria, batching) lives in ``export.on_target.compare`` so the target-side engine check,
which has no torch, judges with the same code.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
import torch

from compress.models.dynamicvit import DynamicViT
from export.on_target.compare import (RANDOM_INPUTS, Comparison, Reference, compare, onnxruntime_session, run_batched,
                                      session_runner, static_batch)

__all__ = ["RANDOM_INPUTS", "Comparison", "compare", "onnxruntime_session", "pytorch_reference", "run_batched",
           "shipped_vs_debug", "static_batch", "validate_graph"]


def pytorch_reference(model: DynamicViT, images: torch.Tensor) -> Reference:
    """Float32 eager logits and kept positions (the project's tie rule) of the original model."""
    with torch.no_grad():
        logits, kept = model.eval().forward_pruned(images, return_indices=True)
    return logits.numpy(), [k.numpy() for k in kept]


def validate_graph(
    debug_graph: onnx.ModelProto,
    reference: Callable[[torch.Tensor], Reference],
    input_sets: dict[str, torch.Tensor],
    max_abs_tolerance: float | None,
    min_top1_agreement_real: float | None = None,
    batch_sizes: Sequence[int | None] | None = None,
) -> list[Comparison]:
    """Run ``debug_graph`` (exported with kept indices) on every input set and compare with ``reference``.

    ``reference(images)`` gives the method's float32 logits and kept positions per stage (for DynamicViT:
    ``lambda images: pytorch_reference(model, images)``). ``batch_sizes``: the batch sizes to feed (e.g. a
    dynamic profile's MIN, OPT, MAX; default: the graph's static batch, or each whole set at once).
    ``min_top1_agreement_real`` applies to real image sets only: on random images a reduced-precision
    graph's top-1 is a coin toss between near-equal logits and proves nothing.
    """
    run = session_runner(onnxruntime_session(debug_graph))
    sizes = list(batch_sizes or [static_batch(debug_graph)])
    results = []
    for name, images in input_sets.items():
        expected = reference(images)
        agreement = None if name == RANDOM_INPUTS else min_top1_agreement_real
        for batch in sizes:
            outputs = run_batched(run, images.numpy(), batch)
            results.append(compare(expected, outputs, name, max_abs_tolerance, agreement, batch))
    return results


def shipped_vs_debug(graph: onnx.ModelProto, debug_graph: onnx.ModelProto, input_sets: dict[str, torch.Tensor]) -> float:
    """Max abs logit difference between a shipped graph and its debug twin over every input set."""
    shipped, debug = session_runner(onnxruntime_session(graph)), session_runner(onnxruntime_session(debug_graph))
    shipped_batch, debug_batch = static_batch(graph), static_batch(debug_graph)
    worst = 0.0
    for images in input_sets.values():
        array = images.numpy()
        difference = run_batched(shipped, array, shipped_batch)[0] - run_batched(debug, array, debug_batch)[0]
        worst = max(worst, float(np.abs(difference).max()))
    return worst
