"""Comparing a graph's or an engine's outputs with reference outputs: the one comparison every backend shares.

A *runner* is any callable ``run(feed) -> [logits, kept_stage1, ...]`` taking one float32 batch ``[B, C, H, W]``;
ONNX Runtime sessions and TensorRT engines both become runners, so export validation (ONNX Runtime against
PyTorch) and the target-side check (an engine against the golden data) use the same code and the same criteria.

Figures per input set: max absolute and relative error on the logits, top-1 agreement (a fraction in 0..1),
and the kept patch positions of every stage: as sets, which decide the result, and in exact order, which can
differ only between scores within float rounding of each other (the order of kept tokens changes the logits by
summation order alone). Needs numpy only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from calibration.onnx_graph import static_batch  # noqa: F401  (re-exported: export reads it from here)
from trt_plugins.ort_token_gather import make_session

RANDOM_INPUTS = "random"  # the seeded random image set: reported, never judged on top-1 agreement
FLOAT32_MAX_ABS_ERROR = 1e-4  # float32 ONNX Runtime vs PyTorch logits
# float32 TensorRT engines (TF32 off) vs PyTorch on the CPU: the same float32 arithmetic, but GPU kernels sum
# matrix products in another order (split-K, fused attention), an error that grows with width and depth. ONNX
# Runtime, which also sums differently, stays within 1e-4 on DeiT-S at 224; 1e-3 leaves an order of magnitude
# for the GPU's kernels while still catching a wrong operator or precision (those err by 1e-2 and more).
ENGINE_FLOAT32_MAX_ABS_ERROR = 1e-3
REDUCED_PRECISION_MIN_TOP1_AGREEMENT = 0.95  # fp16 / int8 vs float32 PyTorch, on real images

Runner = Callable[[np.ndarray], Sequence[np.ndarray]]
Reference = tuple[np.ndarray, list[np.ndarray]]  # (logits [N, classes], [kept positions [N, k_s] per stage])


@dataclass
class Comparison:
    inputs: str  # "random" or a data set's name
    images: int  # how many images were compared
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float  # fraction of images whose top-1 class equals the reference's, 0..1
    kept_sets_identical: bool
    kept_order_identical: bool
    finite: bool
    max_abs_tolerance: float | None  # None: reduced precision, no error bound on the logits
    min_top1_agreement: float | None  # reduced precision on real images: the decision must agree
    batch: int | None = None  # the batch size the graph or engine ran at (None: the whole set at once)
    kept_overlap: list[float] = field(default_factory=list)  # per stage: mean fraction of reference tokens kept

    @property
    def passed(self) -> bool:
        if not self.finite:
            return False
        if self.max_abs_tolerance is not None:  # float32: same numbers and the same tokens
            return self.max_abs_error <= self.max_abs_tolerance and self.kept_sets_identical
        return self.min_top1_agreement is None or self.top1_agreement >= self.min_top1_agreement

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def top1_agreement(logits: np.ndarray, reference_logits: np.ndarray) -> float:
    """Fraction (0..1) of rows whose arg-max class equals the reference's."""
    return float((np.asarray(logits).argmax(1) == np.asarray(reference_logits).argmax(1)).mean())


def kept_overlap(kept: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of |kept ∩ reference| / |reference|: 1.0 when every image keeps the same token set."""
    if kept.shape != reference.shape or reference.size == 0:
        return 0.0 if reference.size else 1.0
    rows = [len(np.intersect1d(a, b)) / len(b) for a, b in zip(kept.astype(np.int64), reference.astype(np.int64))]
    return float(np.mean(rows))


def compare(
    reference: Reference,
    outputs: Sequence[np.ndarray],
    inputs: str,
    max_abs_tolerance: float | None,
    min_top1_agreement: float | None = None,
    batch: int | None = None,
) -> Comparison:
    """Compare outputs (logits, kept_stage1, ...) with the reference outputs of the same images."""
    ref_logits, ref_kept = reference
    logits, kept = np.asarray(outputs[0], dtype=np.float64), list(outputs[1:])
    abs_error = np.abs(logits - ref_logits)
    scale = np.maximum(np.abs(ref_logits).max(), 1e-12)
    same_stages = len(kept) == len(ref_kept)
    overlaps = [kept_overlap(a, b) for a, b in zip(kept, ref_kept)] if same_stages else []
    order = same_stages and all(np.array_equal(a.astype(np.int64), b.astype(np.int64)) for a, b in zip(kept, ref_kept))
    with np.errstate(invalid="ignore"):  # NaN logits: reported through ``finite``
        max_abs = float(abs_error.max())
    return Comparison(
        inputs=inputs,
        images=int(logits.shape[0]),
        max_abs_error=max_abs,
        max_rel_error=float(max_abs / scale),
        top1_agreement=top1_agreement(logits, ref_logits),
        kept_sets_identical=bool(same_stages and all(o == 1.0 for o in overlaps)),
        kept_order_identical=bool(order),
        finite=bool(np.isfinite(logits).all()),
        max_abs_tolerance=max_abs_tolerance,
        min_top1_agreement=min_top1_agreement,
        batch=batch,
        kept_overlap=overlaps,
    )


def run_batched(run: Runner, images: np.ndarray, batch: int | None = None) -> list[np.ndarray]:
    """All outputs for ``images`` of any count, fed in chunks of exactly ``batch`` images (None: all at once).

    A short last chunk is padded with the set's own first images (cycling when the set is smaller than the
    batch), and the outputs of the padding are dropped: every row fed is a real input of the same set, so
    padding cannot produce values (NaN, overflow) the set itself would not.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    batch = batch or len(images)
    chunks = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        if len(chunk) < batch:
            padding = images[np.arange(batch - len(chunk)) % len(images)]
            chunk = np.concatenate([chunk, padding])
        real = min(batch, len(images) - start)
        chunks.append([np.asarray(out)[:real] for out in run(chunk)])
    return [np.concatenate(parts) for parts in zip(*chunks)]


def cpu_session_options(threads: int = 0):
    """ONNX Runtime session options for the CPU: ``threads`` intra-op threads (0 = ONNX Runtime's choice), quiet, and
    worker threads that sleep between operators instead of spinning (ONNX Runtime's default is to spin).

    Spinning costs most where cores are few or shared: on the project's 2-core VM a spinning worker took the time
    the working thread needed, and DeiT-S at batch 1 ran in 97 ms with spinning against 59 ms without (2 threads,
    interleaved rounds); the small operators of short, pruned sequences paid it most (keep 0.5: 0.68 of dense
    with spinning, 0.53 without, where the MACs say 0.48).
    """
    import onnxruntime as ort  # heavy: only the sessions need it, the comparison does not

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def onnxruntime_session(model):
    """A CPU ONNX Runtime session for an ONNX ModelProto; graphs with TokenGather nodes run through the custom op."""
    import onnxruntime as ort

    if any(node.op_type == "TokenGather" for node in model.graph.node):
        return make_session(model, session_options=cpu_session_options())
    return ort.InferenceSession(model.SerializeToString(), cpu_session_options(), providers=["CPUExecutionProvider"])


def session_runner(session) -> Runner:
    """An ONNX Runtime session as a runner: every output, in the graph's order."""
    name = session.get_inputs()[0].name
    return lambda feed: session.run(None, {name: feed})
