"""``python -m export.build``: a checkpoint -> validated ONNX (and a TensorRT engine where possible).

A thin command line over ``export.api.export_model``: it parses the flags into an ``ExportRequest``, shows
progress on stderr, and prints the summary (figures per graph, one verdict line, the next command) on stdout.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from compress.models.tome import MERGE_FLAVOURS
from compress.plumbing.cli import HelpFormatter, add_version_argument, bounded, exit_codes_epilog, exit_from_cli
from export.api import BACKENDS, ExportError, ExportRequest, ExportResult, ValidationFailed, export_model
from export.methods import DynamicViTOptions, MethodOptions
from export.onnx_export import MIN_OPSET
from export.selection import SELECTION_FLAVOURS
from export.on_target.compare import RANDOM_INPUTS
from export.on_target.runtimes import add_compute_capabilities_argument, runtime_named
from export.on_target.tensorrt_support import SUPPORT_TABLES
from export.tome_export import ToMeOptions


EXIT_VALIDATION_FAILED = 1


def parse_batch_profile(text: str) -> tuple[int, int, int]:
    try:
        low, opt, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (three integers), got {text!r}") from None
    if not 1 <= low <= opt <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= OPT <= MAX, got {text!r}")
    return low, opt, high


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.build", formatter_class=HelpFormatter,
        description="Export a DynamicViT (or a ViT with ToMe token merging) to validated ONNX and, where TensorRT "
                    "is present, a TensorRT engine.",
        epilog=exit_codes_epilog((EXIT_VALIDATION_FAILED, "a graph or engine disagreed with PyTorch: FAILED line, "
                                                           "nothing written")),
    )
    parser.add_argument("--checkpoint", "-c", type=Path, default=None,
                        help="checkpoint: reference format {'model': state_dict}, this project's, or a timm/DeiT "
                             "backbone (default: the built-in demo model; with --model and no checkpoint, that "
                             "architecture with random weights, labelled as such)")
    parser.add_argument("--model", "-m", default=None,
                        help="architecture: a registered variant (dynamicvit_deit_small, dynamicvit_lvvit_s, ...) or a "
                             "timm ViT name; only needed when the checkpoint does not determine it (default: read "
                             "from the checkpoint)")
    parser.add_argument("--keep", "-k", type=bounded(float, 0.0, 1.0, low_open=True), default=None,
                        help="keep ratio rho in (0, 1]; 1.0 exports the dense model (default: the checkpoint's "
                             "training keep ratio)")
    parser.add_argument("--tocom", type=Path, default=None,
                        help="ToCom plugin to merge for (rho_train -> keep) (default: none)")
    parser.add_argument("--tocom-scale", type=bounded(float, 0.0, 10.0, low_open=True), default=None,
                        help="ToCom scale s, only with --tocom (default: the scale the plugin chose)")
    parser.add_argument("--fp16", action="store_true", help="also write a mixed-precision float16 ONNX (and engine)")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 ONNX with explicit Q/DQ (needs --calib-data)")
    parser.add_argument("--calib-data", default=None,
                        help="calibration images for --int8: an image folder, a .npy/.npz file, or 'demo' (default: none)")
    parser.add_argument("--val-data", default=None,
                        help="real images that judge reduced-precision graphs by top-1 agreement: an image folder, "
                             "a .npy/.npz file, or 'demo' (default: the calibration images with --int8, the demo "
                             "test images for the demo model, else none)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", "-b", type=bounded(int, 1, 4096), default=1, help="static batch size")
    batch.add_argument("--dynamic-batch", type=parse_batch_profile, default=None, metavar="MIN,OPT,MAX",
                       help="dynamic batch axis and the engine's optimisation profile (default: static batch)")
    parser.add_argument("--opset", type=bounded(int, MIN_OPSET, 23), default=MIN_OPSET,
                        help=f"ONNX opset, >= {MIN_OPSET} so LayerNormalization is one node")
    parser.add_argument("--gather", choices=SELECTION_FLAVOURS, default="native",
                        help="token selection in the graph: native TopK + GatherND, or the TokenGather "
                             "TensorRT plugin")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="engines to build: trt, TensorRT engines (needs TensorRT and the GPU they run on); rtx, "
                             "TensorRT-RTX engines (built on any machine, GPU or not; checked and timed where an RTX-"
                             "class GPU they target is present; not the plugin or ToMe scatter flavour); ort, none "
                             "(ONNX only); auto: trt where TensorRT and a GPU are present, else rtx where TensorRT-RTX "
                             "is installed and takes the flavour, else none")
    add_compute_capabilities_argument(parser)
    parser.add_argument("--trt-version", choices=(*SUPPORT_TABLES, "both"), default="both",
                        help="TensorRT version(s) every graph must parse on, checked from the graph alone before "
                             "publishing (10.3: every 10.x, JetPack 6; 11: every 11.x; rtx: TensorRT-RTX 1.x); a "
                             "problem on another version only is a warning in the summary; when engines are built "
                             "here the runtime that builds them is a target too")
    parser.add_argument("--out", "-o", type=Path, default=None,
                        help="output folder (default: exports/<model>_keep<rho>_<precision>, or _r<r>_ for ToMe)")
    tome = parser.add_argument_group("token merging (ToMe) instead of DynamicViT pruning")
    tome.add_argument("--tome-r", type=bounded(int, 0, 4096), default=None, metavar="R",
                      help="export ToMe merging R tokens per block (the checkpoint: a plain timm/DeiT ViT, "
                           "{'model': state_dict} or a bare state dict) (default: DynamicViT, no merging)")
    tome.add_argument("--tome-r-train", type=bounded(int, 0, 4096), default=None, metavar="R0",
                      help="the r the checkpoint was fine-tuned at: --tocom merges ToCom(R0 -> R) (default: 0)")
    tome.add_argument("--tome-flavour", choices=MERGE_FLAVOURS, default="onehot",
                      help="how merged tokens are added: onehot (MatMul, no scatter) or scatter (ScatterElements "
                           "'add', TensorRT runs it through its ScatterElements plugin)")
    return add_version_argument(parser)


def method_from_args(args: argparse.Namespace) -> MethodOptions:
    """The method the flags ask for: ToMe with --tome-r, else DynamicViT; flags of the other method are refused."""
    if args.tome_r is None:
        if args.tome_r_train is not None or args.tome_flavour != MERGE_FLAVOURS[0]:
            raise ExportError("--tome-r-train / --tome-flavour do nothing without --tome-r (token merging)")
        return DynamicViTOptions(keep=args.keep, gather=args.gather)
    if args.keep is not None:
        raise ExportError("--keep is DynamicViT's keep ratio; a ToMe export's degree is --tome-r")
    if args.gather != SELECTION_FLAVOURS[0]:
        raise ExportError("--gather is DynamicViT's token selection; ToMe graphs choose --tome-flavour")
    return ToMeOptions(r=args.tome_r, r_train=args.tome_r_train, flavour=args.tome_flavour)


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    return ExportRequest(
        checkpoint=args.checkpoint, model=args.model, method=method_from_args(args), tocom=args.tocom,
        tocom_scale=args.tocom_scale, fp16=args.fp16, int8=args.int8, calib_data=args.calib_data,
        val_data=args.val_data, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch, opset=args.opset,
        backend=args.backend, out=args.out, tensorrt_versions=args.trt_version,
        compute_capabilities=args.compute_capabilities,
    )


class Progress:
    """Numbered steps with the elapsed time, on stderr so stdout keeps only the summary."""

    def __init__(self):
        self.done, self.started = 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done} {time.perf_counter() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)


def kept_text(result: dict) -> str:
    if not result.get("kept_overlap"):
        return "-"
    overlap = "/".join(f"{o:.3f}" for o in result["kept_overlap"])
    return ("same order" if result["kept_order_identical"] else "same sets" if result["kept_sets_identical"]
            else f"overlap {overlap}")


def tensorrt_support_lines(manifest: dict, out: Path) -> list[str]:
    """The parser-support verdict per TensorRT version; a warning with the first problem for a non-target version."""
    support = manifest.get("tensorrt_support") or {}
    if not support:
        return []
    lines = ["  TensorRT parser support (checked from the graphs): " + ", ".join(
        f"{table} {'supported' if facts['supported'] else 'NOT supported'}{' (target)' * facts['target']}"
        for table, facts in support["versions"].items())]
    for table, facts in support["versions"].items():
        problems = [(graph, p) for graph, per in support["graphs"].items() for p in per.get(table, [])]
        if problems and not facts["target"]:
            graph, first = problems[0]
            lines.append(f"  warning: {len(problems)} problem(s) on TensorRT {table} (not a --trt-version target), "
                         f"first: {graph}: {first}; `python -m export.engine {out} --lint` lists them")
    return lines


def real_parser_lines(manifest: dict) -> list[str]:
    """TensorRT-RTX's own parser and builder on every graph, and where they disagree with the table check."""
    real = manifest.get("real_parser") or {}
    if not real.get("ran"):
        return []
    graphs = real["graphs"]
    built = [graph for graph, verdict in graphs.items() if verdict["built"]]
    lines = [f"  {real['runtime']} {real['version']} parser and CPU build: {len(built)} of {len(graphs)} graphs built"]
    for graph, verdict in graphs.items():
        if not verdict["built"]:
            lines.append(f"  note: {graph} not built by {real['runtime']}: "
                         f"{verdict.get('parse_error') or verdict.get('build_error')}")
    return lines


def engine_lines(manifest: dict) -> list[str]:
    engine = manifest.get("engine") or {}
    if engine.get("built") is False:
        return [f"  no engine: {engine['reason']}"]
    lines = []
    for key, facts in (manifest.get("engines") or {}).items():
        verdict = ("agrees with the golden data" if facts["passed"] else
                   f"not checked here ({facts.get('unchecked')})")
        lines.append(f"  engine {facts['path']}: {facts['runtime']} {facts.get(runtime_named(facts['runtime']).version_key)}, "
                     f"{facts['bytes'] / 1e6:.1f} MB, built in {facts['build_seconds']:.1f} s, {verdict}")
    return lines


def summary_lines(result: ExportResult) -> list[str]:
    """The summary a user reads: what was exported, a row per graph and input set, a verdict, the next command."""
    manifest, out = result.manifest.to_dict(), result.out
    lines = [f"exported {manifest['model']['label']} {result.degree_text} into {out}/"]
    if manifest["model"]["random_weights"]:
        lines.append("  note: RANDOM WEIGHTS (no checkpoint given): for checking the pipeline only")
    lines += [f"  note: {note}" for note in manifest["model"]["loader_notes"]]
    if manifest["tocom"]:
        t = manifest["tocom"]
        source, target = (("r_train", "r") if "r_train" in t else ("rho_train", "keep"))
        lines.append(f"  ToCom merged: {source} {t[source]} -> {target} {t[target]}, scale {t['scale']}")
    lines.append(f"  {'artefact':<26} {'images':<11} {'batch':>5} {'max abs err':>11} {'top-1':>6}  {result.decisions:<13} judged on")
    role_of = {a["role"]: a for a in manifest["artifacts"]}
    for role, entry in manifest["validation"].items():
        for c in entry["comparisons"]:
            judged = ("max abs error + same decisions" if c["max_abs_tolerance"] is not None
                      else "reported, not judged" if c["inputs"] == RANDOM_INPUTS else "top-1 agreement")
            lines.append(f"  {role_of[role]['path']:<26} {c['inputs']:<11} {c['batch'] or '-':>5} "
                         f"{c['max_abs_error']:>11.2e} {c['top1_agreement']:>6.3f}  {kept_text(c):<13} {judged}")
    real = [name for name in manifest["validation_inputs"] if name != RANDOM_INPUTS]
    if not real:
        lines.append("  note: only random images were seen: reduced-precision graphs were checked for finite "
                     "logits only (pass --val-data with real images to judge their top-1 agreement)")
    lines += tensorrt_support_lines(manifest, out)
    lines += real_parser_lines(manifest)
    lines += engine_lines(manifest)
    for name in result.untouched:
        lines.append(f"  note: left {out / name} in place (not written by this tool)")
    graphs = len(manifest["validation"])
    lines.append(f"PASSED: {graphs} graph{'s' * (graphs > 1)} validated against PyTorch on "
                 f"{', '.join(manifest['validation_inputs'])} images ({manifest['build_seconds']:.1f} s); "
                 f"manifest {out / 'manifest.json'}")
    lines.append(f"next, on the target: copy {out}/ and run `python -m export.engine {out}` "
                 f"(TensorRT engine, checked against the golden data; trtexec lines in {out}/trtexec.txt)")
    if (manifest.get("engine") or {}).get("runtime") == "TensorRT-RTX":
        lines.append(f"on an RTX GPU (compute capability 8.0, 8.6, 8.9, 12.0+): `python -m export.engine {out} "
                     "--backend rtx --no-build` checks and times the TensorRT-RTX engines built here")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = export_model(request_from_args(args), Progress())
    except ValidationFailed as exc:
        print(f"\nFAILED: {exc}")
        return EXIT_VALIDATION_FAILED
    print("\n" + "\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    exit_from_cli(main)
