"""``python -m export.bench_pruning``: how much faster pruning (DynamicViT) and merging (ToMe) make a ViT, on CPU or a CUDA GPU.

Every case (dense, each keep ratio, each ToMe r, ...) runs at each batch size against the dense model measured in
the same run. All cases of one batch size run round-robin; ``ms`` is the median per case and ``ratio`` the median
over rounds of (case / dense in the same round), which cancels the slow phases of a shared machine. MACs are
analytic, per image, with their ratio to dense beside the latency ratio. Weights are random: latency does not depend
on them (the token counts are fixed by the keep ratio or r). Writes a CSV.

--device cpu (the default): PyTorch eager (the model as users run it) and the exported ONNX graph on ONNX Runtime's
CPU provider, wall-clock time, float32.

--device cuda: the export's deploy copies (explicit attention; --dtype fp16 = the export's mixed float16) run
eagerly ("eager") and as a replay of a CUDA graph captured on a static input after warm-up ("graph"), each call
timed by one CUDA-event pair. timm's own dense model ("timm dense", its fused attention: what a user would otherwise
deploy) is a second baseline (``vs_timm``). With --reference-dynamicvit / --reference-tome naming checkouts of the
reference implementations (raoyongming/DynamicViT, facebookresearch/ToMe), their models are timed the same way,
imported from there (on CPU: PyTorch eager only).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import csv
import importlib
import importlib.util
import io
import platform
import re
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import onnxruntime as ort
import timm
import torch
import torch.nn as nn

from compress.models.dynamicvit import DynamicViTBase, create_dynamicvit
from compress.models.tome import MERGE_FLAVOURS, ToMeViT, create_tome
from compress.plumbing.cli import (
    add_version_argument,
    exit_from_cli,
    keep_ratio_argument,
    non_negative_int,
    parser_from_docstring,
    positive_int,
)
from compress.plumbing.errors import PipelineError
from compress.plumbing.files import atomic_write, prepare_output
from export.deploy import deploy_copy
from export.methods import DynamicViTExport
from export.onnx_export import MIN_OPSET
from export.on_target.compare import cpu_session_options
from export.tome_export import ToMeExport
from trt_plugins.bench_token_gather import capture_cuda_graph

EXIT_CASE_FAILED = 1
DEVICES = ("cpu", "cuda")
FRAMEWORKS = {"cpu": ("pytorch", "onnxruntime"), "cuda": ("eager", "graph")}
DEFAULTS = {  # per device, what runs unless the options say otherwise
    "cpu": {"keep": (0.9, 0.8, 0.7, 0.6, 0.5), "tome_r": (), "batch": (1, 8), "dtype": "fp32", "warmup": 3,
            "repeats": 20},
    "cuda": {"keep": (0.7, 0.5), "tome_r": (8, 13, 16), "batch": (1, 8, 64, 256), "dtype": "fp16", "warmup": 10,
             "repeats": 50},
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DENSE, TIMM_DENSE = "dense", "timm dense"
METHODS = ("dynamicvit", "tome", "timm", "reference-dynamicvit", "reference-tome")
REFERENCE_DYNAMICVIT_PATCHES = 196  # the reference's inference forward hard-codes a 14 x 14 patch grid


# ----------------------------------------------------------------------------- timing (shared by CPU and CUDA)


def wall_clock_ms(run: Callable[[], object]) -> float:
    """Milliseconds of one call on the host clock (CPU work is finished when it returns)."""
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


class CudaEventClock:
    """Milliseconds of one call as one CUDA-event pair around it on the current stream, waited for: GPU time plus
    whatever launch time the GPU spends waiting for the host (so an eager, launch-bound model shows as such)."""

    def __init__(self):
        self.start = torch.cuda.Event(enable_timing=True)
        self.stop = torch.cuda.Event(enable_timing=True)

    def __call__(self, run: Callable[[], object]) -> float:
        self.start.record()
        run()
        self.stop.record()
        self.stop.synchronize()
        return self.start.elapsed_time(self.stop)


def interleaved_times(runners: dict, warmup: int, repeats: int,
                      clock: Callable[[Callable[[], object]], float] = wall_clock_ms) -> dict[object, list[float]]:
    """Milliseconds per run of every runner, taken round-robin so that a slow phase of a shared machine
    hits every case alike (ratios within one round are what the comparison uses).

    runners: key -> zero-argument callable; ``clock(run)`` times one call (``wall_clock_ms``, ``CudaEventClock()``).
    Returns key -> ``repeats`` times in round order.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {key: [] for key in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            times[key].append(clock(run))
    return times


def ratio_to_dense(times: list[float], dense: list[float]) -> float:
    """Median over rounds of (this case / dense in the same round)."""
    return statistics.median(t / d for t, d in zip(times, dense))


def cuda_graph_replay(module: nn.Module, images: torch.Tensor, warmup: int = 3) -> Callable[[], None]:
    """Capture ``module(images)`` once into a CUDA graph and return its replay (a zero-argument callable).

    ``images`` is the static input the graph reads (``trt_plugins.bench_token_gather.capture_cuda_graph`` warms up
    on a side stream first). Call under ``torch.inference_mode()``. The graph and its output stay alive as long as
    the returned callable.
    """
    graph, (output,) = capture_cuda_graph(lambda: module(images), 1, warmup)

    def replay() -> None:
        graph.replay()

    replay.graph, replay.output = graph, output  # keep the captured memory alive with the callable
    return replay


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One configuration timed at every batch size: its name in the table, method, degree and MACs per image."""

    name: str
    method: str  # one of METHODS; "dynamicvit" at keep 1.0 is the dense model
    degree: float | int | None  # keep ratio, r, or None (timm dense)
    macs: int


def unique(values: Sequence) -> list:
    return list(dict.fromkeys(values))


def plan_cases(model: DynamicViTBase, tome: ToMeViT | None, keeps: Sequence[float], tome_rs: Sequence[int],
               timm_dense: bool = False, reference_dynamicvit: bool = False, reference_tome: bool = False) -> list[Case]:
    """Every case to time, dense first; raises PipelineError for a keep ratio or r the model cannot run."""
    keeps = [k for k in unique(keeps) if k != 1.0]
    tome_rs = unique(tome_rs)
    if tome_rs and tome is None:
        raise PipelineError("ToMe cases need a ToMe model")
    dense_macs = DynamicViTExport(1.0).macs(model)
    cases = [Case(DENSE, "dynamicvit", 1.0, dense_macs)]
    cases += [Case(f"keep {k:g}", "dynamicvit", k, DynamicViTExport(k).macs(model)) for k in keeps]
    cases += [Case(f"tome r {r}", "tome", r, ToMeExport(r).macs(tome)) for r in tome_rs]
    if timm_dense:
        cases.append(Case(TIMM_DENSE, "timm", None, dense_macs))
    if reference_dynamicvit:
        cases += [Case(f"reference keep {k:g}", "reference-dynamicvit", k, DynamicViTExport(k).macs(model))
                  for k in keeps]
    if reference_tome:
        cases += [Case(f"reference tome r {r}", "reference-tome", r, ToMeExport(r).macs(tome)) for r in tome_rs]
    return cases


# ----------------------------------------------------------------------------- the reference implementations


def load_reference_tome(checkout: Path) -> types.ModuleType:
    """``tome.patch`` of a checkout of facebookresearch/ToMe, imported from that checkout."""
    if not (checkout / "tome" / "patch" / "timm.py").is_file():
        raise PipelineError(f"--reference-tome {checkout}: not a checkout of facebookresearch/ToMe "
                            "(no tome/patch/timm.py)")
    sys.path.insert(0, str(checkout))
    try:
        patch = importlib.import_module("tome.patch")
    except Exception as exc:  # whatever its imports raise: one line, not a traceback
        raise PipelineError(f"--reference-tome {checkout}: importing its tome package failed: "
                            f"{type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(str(checkout))
    if not Path(patch.__file__).resolve().is_relative_to(checkout.resolve()):
        raise PipelineError(f"--reference-tome {checkout}: a `tome` package from {patch.__file__} was imported "
                            "already; run without it on the path")
    return patch


def load_reference_dynamicvit(checkout: Path) -> type:
    """``VisionTransformerDiffPruning`` of a checkout of raoyongming/DynamicViT (its models/dyvit.py, loaded from
    there under a private module name).

    dyvit.py imports ``batch_index_select`` from the checkout's top-level utils.py, whose other imports
    (``torch._six``, gone since PyTorch 2.0, and tensorboardX) fail on current installs: only that one function is
    compiled from utils.py's source, into a stand-in ``utils`` module present while dyvit.py is imported.
    """
    dyvit, utils = checkout / "models" / "dyvit.py", checkout / "utils.py"
    if not dyvit.is_file() or not utils.is_file():
        raise PipelineError(f"--reference-dynamicvit {checkout}: not a checkout of raoyongming/DynamicViT "
                            "(needs models/dyvit.py and utils.py)")
    tree = ast.parse(utils.read_text(), str(utils))
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "batch_index_select"]
    if not found:
        raise PipelineError(f"--reference-dynamicvit {checkout}: utils.py has no batch_index_select")
    stand_in = types.ModuleType("utils")
    stand_in.torch = torch
    exec(compile(ast.Module(body=found, type_ignores=[]), str(utils), "exec"), stand_in.__dict__)
    previous = sys.modules.get("utils")
    sys.modules["utils"] = stand_in
    try:
        spec = importlib.util.spec_from_file_location("reference_dynamicvit_dyvit", dyvit)
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's deprecation of timm.models.layers
            spec.loader.exec_module(module)
    except Exception as exc:
        raise PipelineError(f"--reference-dynamicvit {checkout}: importing models/dyvit.py failed: "
                            f"{type(exc).__name__}: {exc}") from None
    finally:
        if previous is None:
            sys.modules.pop("utils", None)
        else:
            sys.modules["utils"] = previous
    if not hasattr(module, "VisionTransformerDiffPruning"):
        raise PipelineError(f"--reference-dynamicvit {checkout}: models/dyvit.py has no VisionTransformerDiffPruning")
    return module.VisionTransformerDiffPruning


def check_reference_dynamicvit_model(model: DynamicViTBase) -> None:
    if model.num_patches != REFERENCE_DYNAMICVIT_PATCHES or model.config.family != "deit":
        raise PipelineError(f"--reference-dynamicvit needs a DeiT with {REFERENCE_DYNAMICVIT_PATCHES} patches (the "
                            f"reference code assumes a 14 x 14 grid); this model has {model.num_patches}")


def build_reference_dynamicvit(reference_class: type, model: DynamicViTBase, keep: float) -> nn.Module:
    """The reference's DynamicViT with ``model``'s architecture at ``keep`` (cumulative token_ratio rho**k)."""
    check_reference_dynamicvit_model(model)
    attention = model.blocks[0].attn
    with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints a banner
        reference = reference_class(
            img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
            in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes, embed_dim=model.embed_dim,
            depth=len(model.blocks), num_heads=attention.num_heads,
            mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim, qkv_bias=attention.qkv.bias is not None,
            pruning_loc=list(model.config.pruning_locations),
            token_ratio=[keep ** (stage + 1) for stage in range(model.num_stages)])
    return reference.eval()


def timm_dense_model(model: DynamicViTBase) -> nn.Module:
    """timm's own model of ``model``'s backbone (random weights), as users run it."""
    return timm.create_model(model.config.backbone, pretrained=False, **model.config.backbone_kwargs).eval()


def build_reference_tome(patch: types.ModuleType, model: DynamicViTBase, r: int) -> nn.Module:
    """timm's model of ``model``'s backbone patched by the reference ToMe (``tome.patch.timm``) at ``r``."""
    reference = timm_dense_model(model)
    patch.timm(reference)
    reference.r = r
    return reference


# ----------------------------------------------------------------------------- what runs for each case


@dataclass
class Sources:
    """What the cases are built from."""

    model: DynamicViTBase
    tome: ToMeViT | None = None
    tome_flavour: str = MERGE_FLAVOURS[0]
    reference_dynamicvit: type | None = None
    reference_tome: types.ModuleType | None = None


def torch_module(case: Case, sources: Sources, deploy: bool, precision: str = "fp32") -> nn.Module:
    """The eval-mode module ``case`` times in PyTorch, ``module(images) -> logits``.

    deploy: the export's deploy copy (explicit attention, ``precision`` "fp16" = the export's mixed float16), else
    the model as users run it (DynamicViT with timm's fused attention; float32). timm dense and the references are
    their own code, cast to the precision's dtype as a whole.
    """
    if case.method == "dynamicvit":
        if deploy:
            return deploy_copy(sources.model, case.degree, precision)
        user_model = copy.deepcopy(sources.model).eval()
        user_model.keep_ratio = case.degree
        return user_model
    if case.method == "tome":
        deployed = ToMeExport(case.degree).deploy_copy(sources.tome, precision if deploy else "fp32")
        deployed.merge_flavour = sources.tome_flavour
        return deployed
    if case.method == "timm":
        module = timm_dense_model(sources.model)
    elif case.method == "reference-dynamicvit":
        module = build_reference_dynamicvit(sources.reference_dynamicvit, sources.model, case.degree)
    elif case.method == "reference-tome":
        module = build_reference_tome(sources.reference_tome, sources.model, case.degree)
    else:
        raise PipelineError(f"unknown case method {case.method!r}")
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.to(DTYPES[precision] if deploy else torch.float32)


def onnx_session(case: Case, sources: Sources, batch: int, threads: int) -> ort.InferenceSession | None:
    """An ONNX Runtime CPU session of the case's exported float32 graph; None for code this project does not export."""
    if case.method == "dynamicvit":
        method, model, flavour = DynamicViTExport(case.degree), sources.model, "native"
    elif case.method == "tome":
        method, model, flavour = ToMeExport(case.degree), sources.tome, sources.tome_flavour
    else:
        return None
    graph = method.export_onnx(method.deploy_copy(model, "fp32"), flavour, batch, False, MIN_OPSET, False)
    return ort.InferenceSession(graph.SerializeToString(), cpu_session_options(threads), providers=["CPUExecutionProvider"])


def cpu_runners(cases: Sequence[Case], sources: Sources, images: torch.Tensor, frameworks: Sequence[str],
                threads: int) -> dict[tuple[str, str], Callable[[], object]]:
    """(framework, case name) -> one call, for the CPU frameworks."""
    runners = {}
    for case in cases:
        if "pytorch" in frameworks:
            runners["pytorch", case.name] = partial(torch_module(case, sources, deploy=False), images)
        if "onnxruntime" in frameworks:
            session = onnx_session(case, sources, images.shape[0], threads)
            if session is not None:
                runners["onnxruntime", case.name] = partial(session.run, None, {"images": images.numpy()})
    return runners


def cuda_runners(cases: Sequence[Case], sources: Sources, images: torch.Tensor, frameworks: Sequence[str],
                 precision: str, warmup: int, failures: list[str]) -> dict[tuple[str, str], Callable[[], object]]:
    """(framework, case name) -> one call on the GPU; a case that cannot be built or captured is left out and
    named in ``failures``. Call under ``torch.inference_mode()``."""
    runners = {}
    for case in cases:
        try:
            module = torch_module(case, sources, deploy=True, precision=precision).to(images.device)
            if "eager" in frameworks:
                runners["eager", case.name] = partial(module, images)
            if "graph" in frameworks:
                runners["graph", case.name] = cuda_graph_replay(module, images, warmup)
        except (RuntimeError, PipelineError) as exc:  # out of memory, a capture that the code does not allow
            failures.append(f"batch {images.shape[0]}, {case.name}: {type(exc).__name__}: "
                            f"{(str(exc).strip().splitlines() or [''])[0][:200]}")
            runners = {key: run for key, run in runners.items() if key[1] != case.name}
    return runners


# ----------------------------------------------------------------------------- results


def result_columns(frameworks: Sequence[str], with_timm: bool) -> list[str]:
    per_framework = ("ms", "ratio", "vs_timm") if with_timm else ("ms", "ratio")
    return ["batch", "case", "method", "degree", "macs_g", "macs_ratio"] + [
        f"{framework}_{suffix}" for framework in frameworks for suffix in per_framework]


def summarise(cases: Sequence[Case], batch: int, times: dict[tuple[str, str], list[float]],
              frameworks: Sequence[str]) -> list[dict]:
    """One row per case: MACs and their ratio to dense; per framework the median ms, the ratio to dense and (when
    timm dense was timed) to timm dense. A case a framework did not time has None there."""
    dense_macs = next(case.macs for case in cases if case.name == DENSE)
    with_timm = any(case.name == TIMM_DENSE for case in cases)
    rows = []
    for case in cases:
        row = {"batch": batch, "case": case.name, "method": case.method, "degree": case.degree,
               "macs_g": case.macs / 1e9, "macs_ratio": case.macs / dense_macs}
        for framework in frameworks:
            mine = times.get((framework, case.name))
            baselines = {"ratio": times.get((framework, DENSE))}
            if with_timm:
                baselines["vs_timm"] = times.get((framework, TIMM_DENSE))
            row[f"{framework}_ms"] = statistics.median(mine) if mine else None
            for suffix, baseline in baselines.items():
                row[f"{framework}_{suffix}"] = ratio_to_dense(mine, baseline) if mine and baseline else None
        rows.append(row)
    return rows


def format_value(value, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}" if column == "degree" else f"{value:.3f}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Right-aligned columns; measured floats with 3 decimals, a missing value as '-'."""
    cells = [list(columns)] + [[format_value(row[column], column) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells)


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """The rows as CSV (a missing value as an empty field), written atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows({c: "" if row[c] is None else row[c] for c in columns} for row in rows)

    return atomic_write(path, write)


def default_csv_name(model: str, device: str, precision: str) -> Path:
    version = torch.__version__.split("+")[0]
    if device == "cpu":
        return Path(f"bench_pruning_{model}_{torch.get_num_threads()}cpu_torch{version}.csv")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    return Path(f"bench_pruning_{model}_{gpu}_{precision}_torch{version}.csv")


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = add_version_argument(parser_from_docstring(
        "python -m export.bench_pruning", __doc__,
        (EXIT_CASE_FAILED, "a case could not be built or captured (named at the end); the others were timed")))
    cpu, cuda = DEFAULTS["cpu"], DEFAULTS["cuda"]

    def per_device(key: str) -> str:
        def text(value) -> str:
            return " ".join(map(str, value)) or "none" if isinstance(value, tuple) else str(value)

        return f"(default: {text(cpu[key])} on cpu, {text(cuda[key])} on cuda)"

    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where to time (default: cpu)")
    parser.add_argument("--model", "-m", default="dynamicvit_deit_small",
                        help="architecture: a registered variant or timm ViT name (default: dynamicvit_deit_small)")
    parser.add_argument("--keep", type=keep_ratio_argument, nargs="+", default=None,
                        help=f"DynamicViT keep ratios in (0, 1] to compare with dense {per_device('keep')}")
    parser.add_argument("--tome-r", type=non_negative_int, nargs="+", default=None,
                        help=f"ToMe r (tokens merged per block) to compare with dense {per_device('tome_r')}")
    parser.add_argument("--tome-flavour", choices=MERGE_FLAVOURS, default=MERGE_FLAVOURS[0],
                        help=f"ToMe's row-adding op, in PyTorch and in the ONNX graph (default: {MERGE_FLAVOURS[0]})")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=None, help=f"batch sizes {per_device('batch')}")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="fp16: the export's mixed float16 deploy copies, the other models cast as a whole "
                             "(cuda only) (default: fp32 on cpu, fp16 on cuda)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help=f"timed runs per case; the median is kept {per_device('repeats')}")
    parser.add_argument("--warmup", type=non_negative_int, default=None, help=f"untimed runs first {per_device('warmup')}")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="CPU threads for PyTorch and ONNX Runtime, 0 = all cores (default: 0)")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS["cpu"] + FRAMEWORKS["cuda"], default=None,
                        help="what to time: pytorch / onnxruntime on cpu, eager / graph on cuda (default: both of "
                             "the device's)")
    parser.add_argument("--reference-dynamicvit", type=Path, metavar="CHECKOUT", default=None,
                        help="also time the reference DynamicViT code of this raoyongming/DynamicViT checkout at "
                             "every keep ratio (needs a 196-patch DeiT) (default: not timed)")
    parser.add_argument("--reference-tome", type=Path, metavar="CHECKOUT", default=None,
                        help="also time the reference ToMe code of this facebookresearch/ToMe checkout at every r "
                             "(default: not timed)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="results file (default: bench_pruning_<model>_<cpu count>cpu_torch<version>.csv on "
                             "cpu, bench_pruning_<model>_<gpu>_<dtype>_torch<version>.csv on cuda)")
    return parser


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """The device's defaults for every option left unset; PipelineError for options the device cannot honour."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    defaults = DEFAULTS[args.device]
    for key in ("keep", "batch", "dtype", "warmup", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.frameworks = tuple(args.frameworks or FRAMEWORKS[args.device])
    wrong = [f for f in args.frameworks if f not in FRAMEWORKS[args.device]]
    if wrong:
        raise PipelineError(f"--frameworks {' '.join(wrong)}: on {args.device} choose from "
                            f"{', '.join(FRAMEWORKS[args.device])}")
    if args.device == "cpu" and args.dtype != "fp32":
        raise PipelineError("--dtype fp16 needs --device cuda (the CPU timing is float32)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_options(build_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.csv or default_csv_name(args.model, args.device, args.dtype)
    prepare_output(path.parent)  # an unwritable results file is refused before the timing, not after it
    torch.manual_seed(0)
    model = create_dynamicvit(args.model, keep_ratio=0.7).eval()
    is_timm = model.config.family == "deit"
    if args.tome_r is None:  # ToMe runs on timm ViTs only: by default only there
        args.tome_r = DEFAULTS[args.device]["tome_r"] if is_timm else ()
    sources = Sources(model, create_tome(args.model) if args.tome_r else None, args.tome_flavour)
    if args.reference_dynamicvit is not None:
        check_reference_dynamicvit_model(model)
        sources.reference_dynamicvit = load_reference_dynamicvit(args.reference_dynamicvit)
    if args.reference_tome is not None:
        if not args.tome_r:
            raise PipelineError("--reference-tome needs ToMe cases (--tome-r)")
        sources.reference_tome = load_reference_tome(args.reference_tome)
    cases = plan_cases(model, sources.tome, args.keep, args.tome_r, timm_dense=args.device == "cuda" and is_timm,
                       reference_dynamicvit=sources.reference_dynamicvit is not None,
                       reference_tome=sources.reference_tome is not None)

    device = torch.device(args.device)
    clock = CudaEventClock() if args.device == "cuda" else wall_clock_ms
    rows, failures = [], []
    for batch in args.batch:
        images = torch.randn(batch, *model.image_shape).to(device, DTYPES[args.dtype])
        with torch.inference_mode():
            if args.device == "cuda":
                runners = cuda_runners(cases, sources, images, args.frameworks, args.dtype, args.warmup, failures)
            else:
                runners = cpu_runners(cases, sources, images, args.frameworks, args.threads)
            print(f"  timing batch {batch}: {len(runners)} cases x {args.repeats} interleaved rounds", file=sys.stderr,
                  flush=True)
            times = interleaved_times(runners, args.warmup, args.repeats, clock)
        rows += summarise(cases, batch, times, args.frameworks)
        del runners
        if args.device == "cuda":
            torch.cuda.empty_cache()  # each batch's graphs hold their own memory pools

    if args.device == "cuda":
        where = (f"{torch.cuda.get_device_name()}, {args.dtype}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
                 f"{args.repeats} interleaved rounds after {args.warmup} warm-up calls, ms = median of one CUDA-event "
                 "pair per call (graph: per replay)")
    else:
        where = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
                 f"{torch.__version__}, onnxruntime {ort.__version__}; {args.repeats} interleaved rounds, ms = median")
    print(f"\n{args.model} on {where}; ratio = median of per-round ratios to dense (this project's keep 1.0)"
          + ("; vs_timm = to timm's own dense model" if any(c.name == TIMM_DENSE for c in cases) else ""))
    columns = result_columns(args.frameworks, any(c.name == TIMM_DENSE for c in cases))
    print(format_table(rows, columns))
    write_csv(path, rows, columns)
    print(f"written {path}")
    if failures:
        print("not timed:\n" + "\n".join(f"  {line}" for line in failures), file=sys.stderr)
        return EXIT_CASE_FAILED
    return 0


if __name__ == "__main__":
    exit_from_cli(main)
