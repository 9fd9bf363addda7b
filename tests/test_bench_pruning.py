"""``python -m export.bench_pruning``: the timing loop, cases, ratios and table shared by CPU and CUDA, the CPU run end
to end on the demo architecture, bad input, and (where present) the reference implementations and a CUDA device.

The reference tests need checkouts of the reference code: set REFERENCE_DYNAMICVIT_CHECKOUT (raoyongming/DynamicViT)
and REFERENCE_TOME_CHECKOUT (facebookresearch/ToMe); they skip otherwise. The CUDA tests skip without a device.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch

from compress.models.dynamicvit import create_dynamicvit
from compress.models.tome import create_tome
from compress.plumbing.cli import EXIT_USER_ERROR
from compress.plumbing.errors import PipelineError
from export import bench_pruning as bench
from test_cli_errors import assert_user_error, run, run_in_process

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
REFERENCE_DYNAMICVIT = os.environ.get("REFERENCE_DYNAMICVIT_CHECKOUT")
REFERENCE_TOME = os.environ.get("REFERENCE_TOME_CHECKOUT")
needs_reference_dynamicvit = pytest.mark.skipif(
    not REFERENCE_DYNAMICVIT, reason="REFERENCE_DYNAMICVIT_CHECKOUT (a raoyongming/DynamicViT checkout) not set")
needs_reference_tome = pytest.mark.skipif(
    not REFERENCE_TOME, reason="REFERENCE_TOME_CHECKOUT (a facebookresearch/ToMe checkout) not set")
# A 196-patch DeiT small enough for CPU tests (the reference DynamicViT needs the 14 x 14 grid).
SMALL_224 = dict(embed_dim=64, depth=4, num_heads=2, num_classes=10, pruning_locations=(1, 2, 3))


@pytest.fixture(scope="module")
def demo_sources():
    torch.manual_seed(0)
    return bench.Sources(create_dynamicvit("demo-vit", keep_ratio=0.7).eval(), create_tome("demo-vit"))


@pytest.fixture(scope="module")
def small_224():
    torch.manual_seed(0)
    model = create_dynamicvit("vit_small_patch16_224", keep_ratio=0.7, **SMALL_224).eval()
    overrides = {k: v for k, v in SMALL_224.items() if k != "pruning_locations"}
    return bench.Sources(model, create_tome("vit_small_patch16_224", **overrides))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- shared pure parts


def test_cases_are_timed_round_robin_after_the_warm_up_with_the_given_clock():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("dense", "keep 0.7", "tome r 8")}
    ticks = iter(range(100))

    def clock(run):  # a deterministic clock: each timed call "takes" the next integer
        run()
        return float(next(ticks))

    times = bench.interleaved_times(runners, warmup=2, repeats=3, clock=clock)
    assert calls[:6] == ["dense"] * 2 + ["keep 0.7"] * 2 + ["tome r 8"] * 2  # warm-up, per case
    assert calls[6:] == ["dense", "keep 0.7", "tome r 8"] * 3  # then rounds
    assert times == {"dense": [0.0, 3.0, 6.0], "keep 0.7": [1.0, 4.0, 7.0], "tome r 8": [2.0, 5.0, 8.0]}


def test_the_default_clock_is_wall_time_in_milliseconds():
    times = bench.interleaved_times({"sleep": lambda: __import__("time").sleep(0.02)}, warmup=0, repeats=2)
    assert all(15.0 <= t < 500.0 for t in times["sleep"])


def test_ratio_is_the_median_of_per_round_ratios():
    # A slow round (3rd) doubles both: per-round ratios 0.5, 0.5, 0.5, 0.9 -> median 0.5; medians alone would say 0.6
    assert bench.ratio_to_dense([5.0, 5.0, 10.0, 9.0], [10.0, 10.0, 20.0, 10.0]) == 0.5


def test_cases_dense_first_with_analytic_macs_and_no_duplicates(demo_sources):
    cases = bench.plan_cases(demo_sources.model, demo_sources.tome, [0.7, 1.0, 0.7, 0.5], [4, 4, 8], timm_dense=True)
    assert [c.name for c in cases] == ["dense", "keep 0.7", "keep 0.5", "tome r 4", "tome r 8", "timm dense"]
    by_name = {c.name: c for c in cases}
    from compress.models.complexity import analytic_macs

    shape = demo_sources.model.cost_shape()
    assert by_name["dense"].macs == by_name["timm dense"].macs == analytic_macs(shape, 1.0)
    assert by_name["keep 0.5"].macs == analytic_macs(shape, 0.5)
    assert by_name["tome r 8"].macs == demo_sources.tome.macs([8] * len(demo_sources.tome.blocks))
    assert by_name["tome r 8"].macs < by_name["tome r 4"].macs < by_name["dense"].macs


def test_reference_cases_mirror_the_project_cases(demo_sources):
    cases = bench.plan_cases(demo_sources.model, demo_sources.tome, [0.7], [4], reference_dynamicvit=True,
                             reference_tome=True)
    by_name = {c.name: c for c in cases}
    assert by_name["reference keep 0.7"].macs == by_name["keep 0.7"].macs
    assert by_name["reference tome r 4"].macs == by_name["tome r 4"].macs
    assert by_name["reference tome r 4"].method == "reference-tome"


def test_an_r_the_model_cannot_merge_is_refused_while_planning(demo_sources):
    with pytest.raises(PipelineError, match="merge"):
        bench.plan_cases(demo_sources.model, demo_sources.tome, [], [40])  # 65 tokens merge at most 32 per block


def test_rows_give_both_ratios_and_leave_untimed_cases_empty():
    cases = [bench.Case("dense", "dynamicvit", 1.0, 100), bench.Case("keep 0.5", "dynamicvit", 0.5, 50),
             bench.Case("timm dense", "timm", None, 100), bench.Case("reference keep 0.5", "reference-dynamicvit", 0.5, 50)]
    times = {("graph", "dense"): [2.0, 4.0, 2.0], ("graph", "keep 0.5"): [1.0, 3.0, 1.5],
             ("graph", "timm dense"): [1.0, 2.0, 1.0], ("graph", "reference keep 0.5"): [3.0, 3.0, 3.0],
             ("eager", "dense"): [5.0, 5.0, 5.0], ("eager", "keep 0.5"): [6.0, 6.0, 6.0],
             ("eager", "timm dense"): [4.0, 4.0, 4.0]}
    rows = bench.summarise(cases, 8, times, ("eager", "graph"))
    row = {r["case"]: r for r in rows}
    assert row["keep 0.5"]["macs_ratio"] == 0.5 and row["keep 0.5"]["macs_g"] == 50 / 1e9
    assert row["keep 0.5"]["graph_ms"] == 1.5
    assert row["keep 0.5"]["graph_ratio"] == 0.75  # per round 0.5, 0.75, 0.75
    assert row["keep 0.5"]["graph_vs_timm"] == 1.5  # per round 1.0, 1.5, 1.5
    assert row["keep 0.5"]["eager_ratio"] == 1.2 and row["timm dense"]["eager_ratio"] == 0.8
    assert row["reference keep 0.5"]["eager_ms"] is None and row["reference keep 0.5"]["eager_ratio"] is None
    assert row["dense"]["graph_ratio"] == 1.0 and row["timm dense"]["graph_vs_timm"] == 1.0
    columns = bench.result_columns(("eager", "graph"), with_timm=True)
    assert columns[:6] == ["batch", "case", "method", "degree", "macs_g", "macs_ratio"]
    assert set(columns[6:]) == {f"{f}_{s}" for f in ("eager", "graph") for s in ("ms", "ratio", "vs_timm")}
    assert set(rows[0]) == set(columns)


def test_table_and_csv_show_a_missing_value_as_a_dash_and_an_empty_field(tmp_path):
    rows = [{"batch": 1, "case": "keep 0.7", "degree": 0.7, "graph_ms": 1.23456, "graph_ratio": None},
            {"batch": 256, "case": "tome r 13", "degree": 13, "graph_ms": 12.0, "graph_ratio": 0.5}]
    columns = ["batch", "case", "degree", "graph_ms", "graph_ratio"]
    lines = bench.format_table(rows, columns).splitlines()
    assert lines[0].split() == ["batch", "case", "degree", "graph_ms", "graph_ratio"]
    assert lines[1].split() == ["1", "keep", "0.7", "0.7", "1.235", "-"]
    assert lines[2].split() == ["256", "tome", "r", "13", "13", "12.000", "0.500"]
    assert len({len(line) for line in lines}) == 1  # aligned
    written = read_csv(bench.write_csv(tmp_path / "rows.csv", rows, columns))
    assert written[0]["graph_ratio"] == "" and written[1]["graph_ratio"] == "0.5" and written[0]["degree"] == "0.7"


def test_cuda_defaults_are_the_gpu_plan_and_cpu_defaults_are_unchanged():
    parser = bench.build_parser()
    cpu = bench.resolve_options(parser.parse_args([]))
    assert (cpu.device, cpu.keep, cpu.batch, cpu.dtype, cpu.frameworks) == (
        "cpu", (0.9, 0.8, 0.7, 0.6, 0.5), (1, 8), "fp32", ("pytorch", "onnxruntime"))
    assert bench.DEFAULTS["cuda"] == {"keep": (0.7, 0.5), "tome_r": (8, 13, 16), "batch": (1, 8, 64, 256),
                                      "dtype": "fp16", "warmup": 10, "repeats": 50}
    help_text = parser.format_help()
    assert "--reference-tome" in help_text and "0.7 0.5 on cuda" in help_text


# ----------------------------------------------------------------------------- what runs


def test_every_case_builds_a_module_that_runs_in_both_precisions(demo_sources):
    """What the CUDA path builds (deploy copies, mixed float16), run on the CPU: shapes and finite logits."""
    cases = bench.plan_cases(demo_sources.model, demo_sources.tome, [0.5], [8], timm_dense=True)
    images = torch.randn(2, *demo_sources.model.image_shape)
    with torch.inference_mode():
        for case in cases:
            for deploy, precision in ((False, "fp32"), (True, "fp32"), (True, "fp16")):
                module = bench.torch_module(case, demo_sources, deploy, precision)
                logits = module(images.to(bench.DTYPES[precision]))
                assert logits.shape == (2, 10) and bool(torch.isfinite(logits).all()), (case.name, precision)
                assert logits.dtype == bench.DTYPES[precision]


def test_the_deploy_copy_times_what_the_export_runs(demo_sources):
    case = bench.Case("keep 0.5", "dynamicvit", 0.5, 0)
    deployed = bench.torch_module(case, demo_sources, deploy=True)
    user = bench.torch_module(case, demo_sources, deploy=False)
    assert deployed.explicit_attention and not user.explicit_attention
    assert deployed.keep_ratio == user.keep_ratio == 0.5 and demo_sources.model.keep_ratio == 0.7  # left unchanged
    tome = bench.torch_module(bench.Case("tome r 8", "tome", 8, 0), demo_sources, deploy=True, precision="fp16")
    assert set(tome.r_schedule) == {8} and tome.cls_token.dtype == torch.float16


def test_reference_cases_have_no_onnx_graph(demo_sources):
    case = bench.Case("timm dense", "timm", None, 0)
    assert bench.onnx_session(case, demo_sources, 1, 1) is None


def test_cpu_run_end_to_end_on_the_demo_architecture(tmp_path):
    out = tmp_path / "results" / "cpu.csv"
    result = run_in_process("export.bench_pruning", "--model", "demo-vit", "--keep", "0.5", "--tome-r", "8",
                            "--batch", "1", "2", "--repeats", "2", "--warmup", "1", "--threads", "1", "--csv", out)
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert [(r["batch"], r["case"]) for r in rows] == [
        (b, c) for b in ("1", "2") for c in ("dense", "keep 0.5", "tome r 8")]
    assert list(rows[0]) == bench.result_columns(("pytorch", "onnxruntime"), with_timm=False)
    for row in rows:
        assert all(float(row[f"{f}_ms"]) > 0 and math.isfinite(float(row[f"{f}_ratio"]))
                   for f in ("pytorch", "onnxruntime"))
    assert float(rows[1]["macs_ratio"]) < 1.0 and rows[0]["pytorch_ratio"] == "1.0"
    assert "keep 0.5" in result.stdout and f"written {out}" in result.stdout


# ----------------------------------------------------------------------------- bad input


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_a_device_is_one_error_line_and_exit_2(tmp_path):
    result = run("export.bench_pruning", "--device", "cuda", "--csv", tmp_path / "x.csv")
    assert_user_error(result, "--device cuda", "torch.cuda.is_available()")
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--dtype", "fp16"], ["--dtype fp16", "--device cuda"]),
    (["--frameworks", "graph"], ["--frameworks graph", "pytorch, onnxruntime"]),
    (["--model", "demo-vit", "--tome-r", "40"], ["r 40"]),
    (["--model", "demo-vit", "--reference-dynamicvit", "."], ["--reference-dynamicvit", "196 patches"]),
])
def test_options_the_device_or_model_cannot_honour_are_refused(tmp_path, args, fragments):
    result = run_in_process("export.bench_pruning", *args, "--csv", tmp_path / "x.csv")
    assert result.returncode == EXIT_USER_ERROR
    assert_user_error(result, *fragments)
    assert not (tmp_path / "x.csv").exists()


def test_a_folder_that_is_not_a_reference_checkout_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="not a checkout of facebookresearch/ToMe"):
        bench.load_reference_tome(tmp_path)
    with pytest.raises(PipelineError, match="not a checkout of raoyongming/DynamicViT"):
        bench.load_reference_dynamicvit(tmp_path)


# ----------------------------------------------------------------------------- the reference implementations


@needs_reference_dynamicvit
def test_reference_dynamicvit_has_the_same_architecture_and_logits(small_224):
    sources = bench.Sources(small_224.model, reference_dynamicvit=bench.load_reference_dynamicvit(
        Path(REFERENCE_DYNAMICVIT)))
    reference = bench.torch_module(bench.Case("reference keep 0.7", "reference-dynamicvit", 0.7, 0), sources, False)
    reference.load_state_dict(small_224.model.state_dict(), strict=True)  # same modules, same names
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = bench.torch_module(bench.Case("keep 0.7", "dynamicvit", 0.7, 0), sources, deploy=True)(images)
        assert torch.allclose(reference(images), ours, atol=1e-5)
    assert "utils" not in __import__("sys").modules or not hasattr(__import__("sys").modules["utils"],
                                                                    "batch_index_select")


@needs_reference_tome
def test_reference_tome_has_the_same_architecture_and_logits(small_224):
    sources = bench.Sources(small_224.model, small_224.tome,
                            reference_tome=bench.load_reference_tome(Path(REFERENCE_TOME)))
    reference = bench.torch_module(bench.Case("reference tome r 8", "reference-tome", 8, 0), sources, False)
    reference.load_state_dict(small_224.tome.state_dict(), strict=True)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = bench.torch_module(bench.Case("tome r 8", "tome", 8, 0), sources, deploy=True)(images)
        assert torch.allclose(reference(images), ours, atol=1e-5)


@needs_reference_dynamicvit
@needs_reference_tome
def test_cpu_run_times_the_references_in_pytorch_only(tmp_path):
    out = tmp_path / "ref.csv"
    result = run_in_process("export.bench_pruning", "--model", "dynamicvit_deit_tiny", "--keep", "0.5", "--tome-r",
                            "16", "--batch", "1", "--repeats", "1", "--warmup", "0", "--threads", "1",
                            "--reference-dynamicvit", REFERENCE_DYNAMICVIT, "--reference-tome", REFERENCE_TOME,
                            "--csv", out)
    assert result.returncode == 0, result.stderr
    rows = {r["case"]: r for r in read_csv(out)}
    assert set(rows) == {"dense", "keep 0.5", "tome r 16", "reference keep 0.5", "reference tome r 16"}
    assert float(rows["reference tome r 16"]["pytorch_ms"]) > 0 and rows["reference tome r 16"]["onnxruntime_ms"] == ""


# ----------------------------------------------------------------------------- CUDA (skipped without a device)


@needs_cuda
def test_graph_replay_gives_the_eager_logits(demo_sources):
    images = torch.randn(4, *demo_sources.model.image_shape, device="cuda", dtype=torch.float16)
    for case in bench.plan_cases(demo_sources.model, demo_sources.tome, [0.5], [8], timm_dense=True):
        module = bench.torch_module(case, demo_sources, deploy=True, precision="fp16").cuda()
        with torch.inference_mode():
            eager = module(images).float()
            replay = bench.cuda_graph_replay(module, images)
            replay.output.zero_()
            replay()
            torch.cuda.synchronize()
            assert torch.allclose(replay.output.float(), eager, atol=1e-2, rtol=1e-2), case.name


@needs_cuda
def test_cuda_run_end_to_end_on_the_demo_architecture(tmp_path):
    out = tmp_path / "cuda.csv"
    result = run_in_process("export.bench_pruning", "--device", "cuda", "--model", "demo-vit", "--keep", "0.5",
                            "--tome-r", "8", "--batch", "1", "4", "--repeats", "5", "--warmup", "2", "--csv", out)
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert [r["case"] for r in rows] == ["dense", "keep 0.5", "tome r 8", "timm dense"] * 2
    for row in rows:
        for framework in ("eager", "graph"):
            assert float(row[f"{framework}_ms"]) > 0 and math.isfinite(float(row[f"{framework}_vs_timm"]))
