"""``python -m export.build``: a DynamicViT checkpoint -> validated ONNX (and a TensorRT engine where possible).

Every artefact is written into a temporary folder beside ``--out`` and moved into place only after
validation passed, so a failed or interrupted run never leaves partial files in ``--out``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx
import torch

from compress.checkpoint import current_umask, load_dynamicvit
from compress.cli import run_cli
from compress.dynamicvit import DynamicViT, create_dynamicvit
from compress.errors import InvalidKeepRatio, PipelineError
from compress.token_select import TIE_RULE
from export.deploy import deploy_copy
from export.onnx_export import MIN_OPSET, export_onnx
from export.selection import SELECTION_FLAVOURS
from export.validate import RANDOM_INPUTS, pytorch_reference, shipped_vs_debug, validate_graph

MANIFEST_SCHEMA = 1
FLOAT32_MAX_ABS_ERROR = 1e-4  # ONNX Runtime vs PyTorch logits, float32 graphs
REDUCED_PRECISION_MIN_TOP1_AGREEMENT = 0.95  # fp16 / int8 vs float32 PyTorch, on real images
VALIDATION_SEED = 0
RANDOM_MODEL_NAME = "dynamicvit_deit_small"


def parse_batch_profile(text: str) -> tuple[int, int, int]:
    try:
        low, opt, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (three integers), got {text!r}") from None
    if not 1 <= low <= opt <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= OPT <= MAX, got {text!r}")
    return low, opt, high


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.build",
        description="Export a DynamicViT to validated ONNX and, where TensorRT is present, a TensorRT engine.",
    )
    parser.add_argument("--checkpoint", "-c", type=Path, default=None,
                        help="DynamicViT checkpoint (default: the built-in demo model; without it, "
                             f"a randomly initialised {RANDOM_MODEL_NAME}, labelled as such)")
    parser.add_argument("--model", "-m", default=None,
                        help="architecture, only when the checkpoint does not record it (default: read from it); "
                             "without --checkpoint: export that architecture with random weights, labelled as such")
    parser.add_argument("--keep", "-k", type=float, default=None,
                        help="keep ratio rho in (0, 1]; 1.0 exports the dense model (default: the checkpoint's "
                             "training keep ratio)")
    parser.add_argument("--tocom", type=Path, default=None, help="ToCom plugin to merge for (rho_train -> keep)")
    parser.add_argument("--tocom-scale", type=float, default=None, help="ToCom scale s (default: the plugin's)")
    parser.add_argument("--fp16", action="store_true", help="also write a mixed-precision float16 ONNX (and engine)")
    parser.add_argument("--int8", action="store_true", help="INT8 with explicit Q/DQ (needs --calib-data)")
    parser.add_argument("--calib-data", default=None,
                        help="calibration images for --int8: an image folder, a .npy/.npz file, or 'demo' (default: none)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", "-b", type=positive_int, default=1, help="static batch size (default: 1)")
    batch.add_argument("--dynamic-batch", type=parse_batch_profile, default=None, metavar="MIN,OPT,MAX",
                       help="dynamic batch axis and the engine's optimisation profile (default: static batch)")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, >= {MIN_OPSET} (default: {MIN_OPSET})")
    parser.add_argument("--gather", choices=SELECTION_FLAVOURS, default="native",
                        help="token selection in the graph: native TopK+GatherElements, or the TokenGather "
                             "TensorRT plugin (default: native)")
    parser.add_argument("--backend", choices=("auto", "trt", "ort"), default="auto",
                        help="auto: TensorRT engine where TensorRT and a GPU are present, else ONNX Runtime "
                             "artefacts only; trt: require an engine; ort: ONNX only (default: auto)")
    parser.add_argument("--out", "-o", type=Path, default=None,
                        help="output folder (default: exports/<model>_keep<rho>_<precision>)")
    return parser


@dataclass
class ExportSubject:
    """What is exported: the model at the deploy keep ratio, and where it came from."""

    model: DynamicViT
    label: str
    random_weights: bool
    notes: list[str]
    rho_train: float | None  # the keep ratio the model was trained at, when known (ToCom needs it)
    real_images: dict[str, torch.Tensor]  # named real image sets to validate on (may be empty)
    metadata: dict | None = None  # the checkpoint's entries besides weights (training config: data spec)


def load_subject(args: argparse.Namespace) -> ExportSubject:
    """The checkpoint; else the demo model (unless --model names an architecture); else seeded random weights."""
    if args.checkpoint is not None:
        subject = subject_from_checkpoint(args.checkpoint, args.checkpoint.stem, args.model, {})
    elif args.model is None and (demo := demo_subject()) is not None:
        subject = demo
    else:
        torch.manual_seed(VALIDATION_SEED)  # the same random weights on every run: byte-identical re-exports
        name = args.model or RANDOM_MODEL_NAME
        model = create_dynamicvit(name, keep_ratio=0.7)
        subject = ExportSubject(model, f"{name}-random", True, [], None, {})
    if args.keep is not None:
        subject.model.keep_ratio = args.keep  # the config keeps the training keep ratio
        subject.notes = [n for n in subject.notes if "no training keep ratio" not in n]
    return subject


def subject_from_checkpoint(path: Path, label: str, model_name: str | None, real_images: dict) -> ExportSubject:
    loaded = load_dynamicvit(path, model_name=model_name)
    rho_train = loaded.model.keep_ratio if loaded.keep_ratio_known else None
    return ExportSubject(loaded.model, label, False, loaded.notes, rho_train, real_images, loaded.metadata)


def demo_subject(num_images: int = 32) -> ExportSubject | None:
    """The shipped demo checkpoint with the first images of its test split, once the demo model exists."""
    try:
        from compress.data import demo_dataset
        from compress.demo import demo_checkpoint_path
    except ImportError:
        return None
    path = Path(demo_checkpoint_path())
    if not path.is_file():
        return None
    test = demo_dataset("test", random_placement=False)
    images = torch.stack([test[i][0] for i in range(min(num_images, len(test)))])
    return subject_from_checkpoint(path, "demo", None, {"demo-test": images})


def merge_tocom(subject: ExportSubject, plugin: Path, scale: float | None) -> dict:
    """Fold ToCom(rho_train -> keep) into the model's qkv weights; returns the manifest entry."""
    if subject.rho_train is None:
        raise PipelineError("--tocom needs the keep ratio the model was trained at, and this checkpoint does not "
                            "record it (use a checkpoint written by compress.train)")
    try:
        from compress.tocom import merge_plugin_file
    except ImportError:
        raise PipelineError("--tocom is not available: compress.tocom is not installed in this version") from None
    return merge_plugin_file(subject.model, plugin, subject.model.keep_ratio, scale)


def staging_folder_for(out: Path) -> Path:
    """A fresh temporary folder beside ``out``; one clear error when it cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and not out.is_dir():
            raise PipelineError(f"--out {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
            # The finished export replaces --out as a whole: never do that to a folder we did not write.
            raise PipelineError(f"--out {out} is a folder with other content (no manifest.json): "
                                "choose a new or empty folder, or a previous export folder to replace")
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; published, it reads like any other
        return staging
    except OSError as exc:
        raise PipelineError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def publish(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished staging folder in (nearly) one rename."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tool_versions() -> dict:
    import onnxruntime
    import timm

    versions = {"torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    try:
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    except ImportError:
        versions["tensorrt"] = None
    return versions


def device_description() -> dict:
    description = {"machine": platform.machine(), "system": platform.system(), "processor": platform.processor()}
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
        description["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return description


class Progress:
    """Numbered steps with their durations, on stderr so stdout keeps only the summary."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def step(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total} {time.perf_counter() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)


def write_onnx(proto: onnx.ModelProto, path: Path) -> None:
    path.write_bytes(proto.SerializeToString())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    if args.int8 and args.calib_data is None:
        raise PipelineError("--int8 needs --calib-data (an image folder, a .npy/.npz file, or 'demo')")
    if args.opset < MIN_OPSET:
        raise PipelineError(f"--opset {args.opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    if args.keep is not None and not 0.0 < args.keep <= 1.0:  # token counts are checked once the model is known
        raise InvalidKeepRatio(f"--keep must be in (0, 1], got {args.keep}")
    if args.backend == "trt":
        from export.tensorrt_engine import INSTALL_HINT, tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason:
            raise PipelineError(f"--backend trt: {reason}; {INSTALL_HINT}")

    steps = 2 + (args.gather == "plugin") + args.fp16 + args.int8 + (args.backend != "ort")
    progress = Progress(steps)
    progress.step("loading the model")
    subject = load_subject(args)
    tocom = merge_tocom(subject, args.tocom, args.tocom_scale) if args.tocom else None
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    out = args.out or Path("exports") / f"{subject.label}_keep{subject.model.keep_ratio:g}_{precision}"
    staging = staging_folder_for(out)
    try:
        manifest = export_all(args, subject, tocom, staging, progress)
        manifest["build_seconds"] = round(time.perf_counter() - started, 2)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print_summary(manifest, out)
    return 0


def export_all(args, subject: ExportSubject, tocom: dict | None, staging: Path, progress: Progress) -> dict:
    """Export, validate and (where possible) build every artefact into ``staging``; returns the manifest."""
    model = subject.model
    counts = model.stage_keep_counts() if model.keep_ratio < 1.0 else []
    low, opt, high = args.dynamic_batch or (args.batch_size,) * 3
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    image_shape = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    input_sets = {RANDOM_INPUTS: torch.randn(opt, *image_shape, generator=generator), **subject.real_images}
    graph_options = dict(batch_size=opt, dynamic_batch=args.dynamic_batch is not None, opset=args.opset)
    artifacts, validation = [], {}

    def export_and_validate(flavour: str, precision: str, role: str, file_name: str) -> None:
        graph = export_onnx(deploy_copy(model, model.keep_ratio, precision), flavour, **graph_options)
        debug = export_onnx(deploy_copy(model, model.keep_ratio, precision), flavour, with_indices=True, **graph_options)
        publish_graph(graph, debug, precision, role, file_name)

    def publish_graph(graph, debug, precision: str, role: str, file_name: str, **extra) -> None:
        """Validate ``debug`` against PyTorch, check ``graph`` against ``debug``, then write ``graph``."""
        tolerance = FLOAT32_MAX_ABS_ERROR if precision == "fp32" else None
        agreement = None if precision == "fp32" else REDUCED_PRECISION_MIN_TOP1_AGREEMENT
        results = validate_graph(debug, lambda images: pytorch_reference(model, images), input_sets, tolerance, agreement)
        failed = [r for r in results if not r.passed]
        if failed:
            r = failed[0]
            raise PipelineError(
                f"validation of the {role} graph failed on {r.inputs} inputs: max abs error {r.max_abs_error:.3g} "
                f"(limit {tolerance}), top-1 agreement {r.top1_agreement:.3f} (minimum {agreement}), "
                f"kept token sets identical: {r.kept_sets_identical}, finite: {r.finite}"
            )
        # The shipped graph is the debug twin minus the index outputs: check it computes the same logits.
        twin_error = shipped_vs_debug(graph, debug, input_sets)
        if precision == "fp32" and twin_error > FLOAT32_MAX_ABS_ERROR:
            raise PipelineError(f"the shipped {role} graph disagrees with its validated debug twin ({twin_error:.3g})")
        validation[role] = {"comparisons": [r.to_dict() for r in results], "shipped_vs_debug_max_abs": twin_error,
                            **extra}
        write_onnx(graph, staging / file_name)
        artifacts.append({"path": file_name, "role": role, "sha256": sha256(staging / file_name)})

    progress.step("exporting and validating the float32 ONNX (native TopK + GatherElements)")
    export_and_validate("native", "fp32", "onnx", "model.onnx")
    if args.gather == "plugin":
        progress.step("exporting and validating the TokenGather plugin ONNX (ONNX Runtime custom op)")
        export_and_validate("plugin", "fp32", "onnx_plugin", "model_plugin.onnx")
    if args.fp16:
        progress.step(f"exporting and validating the mixed float16 ONNX ({args.gather} selection)")
        export_and_validate(args.gather, "fp16", "onnx_fp16", f"model_{args.gather}_fp16.onnx")

    if args.int8:
        progress.step("calibrating and validating the INT8 ONNX (explicit Q/DQ)")
        from calibration.data import load_calibration_data
        from calibration.int8 import quantize_for_export, transplant_qdq

        def float_graph(flavour: str, with_indices: bool = False) -> onnx.ModelProto:
            return export_onnx(deploy_copy(model, model.keep_ratio), flavour, with_indices=with_indices, **graph_options)

        images, calibration = load_calibration_data(args.calib_data, model, subject.metadata)
        int8_native, report = quantize_for_export(float_graph("native"), images, method="auto", calibration_info=calibration)
        # The same Q/DQ (scales included) onto the chosen flavour and its debug twin.
        graph = int8_native if args.gather == "native" else transplant_qdq(int8_native, float_graph(args.gather))
        debug = transplant_qdq(int8_native, float_graph(args.gather, with_indices=True))
        publish_graph(graph, debug, "int8", "onnx_int8", f"model_{args.gather}_int8.onnx", int8=report)

    engine = None
    if args.backend != "ort":
        from export.tensorrt_engine import build_engine, plan_engine, tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason is None:
            progress.step("building the TensorRT engine")
            fp32_name = "model_plugin.onnx" if args.gather == "plugin" else "model.onnx"
            fp16_name = f"model_{args.gather}_fp16.onnx" if args.fp16 else None
            plan = plan_engine(staging / fp32_name, staging / fp16_name if fp16_name else None, args.fp16)
            engine = build_engine(plan, staging / "model.engine", (low, opt, high), image_shape,
                                  staging.parent / ".tensorrt_timing.cache", args.gather == "plugin")
            artifacts.append({"path": "model.engine", "role": "engine", "sha256": sha256(staging / "model.engine")})
        else:
            progress.step(f"no TensorRT engine built: {reason} (ONNX Runtime artefacts only)")
            engine = {"built": False, "reason": reason}

    return {
        "schema_version": MANIFEST_SCHEMA,
        "artifacts": artifacts,
        "model": {
            "label": subject.label,
            "source": str(args.checkpoint) if args.checkpoint else subject.label,
            "random_weights": subject.random_weights,
            "architecture": model.config.to_dict(),
            "rho_train": subject.rho_train,
            "loader_notes": subject.notes,
        },
        "keep_ratio": model.keep_ratio,
        "tokens": {"patches": model.num_patches, "kept_per_stage": counts,
                   "stages_before_blocks": list(model.config.pruning_locations)},
        "tie_rule": TIE_RULE,
        "tocom": tocom,
        "precision": ["fp32"] + ["fp16"] * args.fp16 + ["int8"] * args.int8,
        "gather": args.gather,
        "input": {"name": "images", "shape": ["batch", *image_shape], "dtype": "float32"},
        "batch": {"dynamic": args.dynamic_batch is not None, "min": low, "opt": opt, "max": high},
        "opset": args.opset,
        "validation": validation,
        "engine": engine,
        "tools": tool_versions(),
        "device": device_description(),
    }


def print_summary(manifest: dict, out: Path) -> None:
    print(f"\nexported {manifest['model']['label']} at keep {manifest['keep_ratio']:g} "
          f"(patch tokens {manifest['tokens']['patches']} -> {manifest['tokens']['kept_per_stage'] or 'dense'})"
          f" into {out}/")
    if manifest["model"]["random_weights"]:
        print("  note: RANDOM WEIGHTS (no checkpoint given and no demo model): for checking the pipeline only")
    for note in manifest["model"]["loader_notes"]:
        print(f"  note: {note}")
    if manifest["tocom"]:
        print(f"  ToCom merged: rho_train {manifest['tocom']['rho_train']} -> keep {manifest['tocom']['keep']}, "
              f"scale {manifest['tocom']['scale']}")
    print(f"  {'artefact':<24} {'role':<12} {'inputs':<10} {'max abs err':>11} {'top-1':>6}  kept tokens")
    for artifact in manifest["artifacts"]:
        for result in manifest["validation"].get(artifact["role"], {}).get("comparisons", [{}]):
            if not result:
                print(f"  {artifact['path']:<24} {artifact['role']:<12}")
                continue
            kept = "same order" if result["kept_order_identical"] else (
                "same sets" if result["kept_sets_identical"] else "differ")
            print(f"  {artifact['path']:<24} {artifact['role']:<12} {result['inputs']:<10} "
                  f"{result['max_abs_error']:>11.2e} {result['top1_agreement']:>6.3f}  {kept}")
    engine = manifest["engine"]
    if engine and engine.get("built") is False:
        print(f"  no TensorRT engine: {engine['reason']}")
    print(f"  manifest: {out / 'manifest.json'} ({manifest['build_seconds']:.1f} s)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
