"""export.bench: artefact discovery, statistics, JSON/CSV output, and the regression gate on a planted slowdown."""
import contextlib
import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.plumbing.cli import run_cli
from compress.plumbing.errors import PipelineError
from export.on_target import bench

REPO = Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (3, 32, 32)


def tiny_classifier(extra_macs_per_image: int = 0) -> onnx.ModelProto:
    """images [1, 3, 32, 32] -> logits [1, 10]; ``extra_macs_per_image`` adds a wasted MatMul chain that cannot
    be folded away (it depends on the input, and its result is multiplied by zero and added to the logits)."""
    features = int(np.prod(IMAGE_SHAPE))
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((features, 10)).astype(np.float32), "w")]
    nodes = [helper.make_node("Flatten", ["images"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "w"], ["scores"], name="head")]
    last = "scores"
    if extra_macs_per_image:
        width = extra_macs_per_image // features
        weights += [numpy_helper.from_array(rng.standard_normal((features, width)).astype(np.float32), "waste_w"),
                    numpy_helper.from_array(np.zeros((), np.float32), "zero")]
        nodes += [helper.make_node("MatMul", ["flat", "waste_w"], ["waste"], name="waste"),
                  helper.make_node("ReduceSum", ["waste"], ["waste_sum"], name="waste_sum", keepdims=1),
                  helper.make_node("Mul", ["waste_sum", "zero"], ["nothing"], name="nothing"),
                  helper.make_node("Add", ["scores", "nothing"], ["slowed"], name="slowed")]
        last = "slowed"
    nodes.append(helper.make_node("Identity", [last], ["logits"], name="logits"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, *IMAGE_SHAPE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    paths = {"fast": folder / "fast.onnx", "copy": folder / "copy.onnx", "slow": folder / "slow.onnx"}
    onnx.save(tiny_classifier(), str(paths["fast"]))
    onnx.save(tiny_classifier(), str(paths["copy"]))
    onnx.save(tiny_classifier(extra_macs_per_image=3072 * 2048), str(paths["slow"]))  # ~6 M MACs vs 30 k
    return paths


def run_bench(*args):
    """``python -m export.bench ARGS`` in this process (a fresh interpreter per call costs seconds of imports)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(bench.main, [str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def case(artefact, median, ratio=None, backend="ort-cpu"):
    return bench.CaseResult(artefact, backend, 1, 0, median_ms=median, ratio=ratio)


# ----------------------------------------------------------------------------- pure parts


def test_summary_statistics():
    stats = bench.summarise(list(range(1, 101)))
    assert stats["median_ms"] == 50.5 and stats["min_ms"] == 1 and stats["iterations"] == 100
    assert stats["p90_ms"] == pytest.approx(90.1) and stats["p99_ms"] == pytest.approx(99.01)


def test_gate_names_every_slower_case_and_ignores_faster_ones():
    baseline = {"reference": None, "cases": {case("a", 10).key: {"median_ms": 10.0},
                                             case("b", 10).key: {"median_ms": 10.0},
                                             case("c", 10).key: {"median_ms": 10.0}}}
    results = [case("a", 10.5), case("b", 12.0), case("c", 50.0), case("d", 1.0)]
    slower, uncompared, notes = bench.find_regressions(results, baseline, 10.0, None)
    assert len(slower) == 2 and "b|ort-cpu" in slower[0] and "c|ort-cpu" in slower[1] and uncompared == []
    assert any("new case" in n and "d|" in n for n in notes)
    assert bench.find_regressions(results, baseline, 500.0, None)[0] == []


def test_ratio_gate_cancels_a_uniformly_slower_machine():
    baseline = {"reference": "dense", "cases": {case("dense", 10).key: {"median_ms": 10.0, "ratio": 1.0},
                                                case("pruned", 6).key: {"median_ms": 6.0, "ratio": 0.6}}}
    loaded_machine = [case("dense", 30.0, 1.0), case("pruned", 18.0, 0.6)]  # everything 3x slower
    assert bench.find_regressions(loaded_machine, baseline, 10.0, "dense")[0] == []
    assert len(bench.find_regressions(loaded_machine, baseline, 10.0, None)[0]) == 2  # absolute medians: both
    real_regression = [case("dense", 10.0, 1.0), case("pruned", 9.0, 0.9)]
    (line,) = bench.find_regressions(real_regression, baseline, 10.0, "dense")[0]
    assert "pruned" in line and "ratio" in line
    with pytest.raises(bench.BenchError, match="same --reference"):
        bench.find_regressions(real_regression, baseline, 10.0, "other")


def test_artefact_discovery(tmp_path, artefacts):
    export = tmp_path / "export"
    export.mkdir()
    onnx.save(tiny_classifier(), str(export / "model.onnx"))
    (export / "manifest.json").write_text(json.dumps({"artifacts": [{"path": "model.onnx", "role": "onnx"}]}))
    assert [(a.label, a.kind) for a in bench.discover(str(export))] == [("export/model.onnx", "onnx")]
    assert bench.discover(f"mine={artefacts['fast']}")[0].label == "mine"
    (tmp_path / "model.engine").write_bytes(b"not really")
    assert bench.discover(str(tmp_path / "model.engine"))[0].kind == "engine"
    for bad in (tmp_path / "missing.onnx", tmp_path):
        with pytest.raises(PipelineError):
            bench.discover(str(bad))


# ----------------------------------------------------------------------------- command line


def test_bench_writes_json_and_csv_with_the_environment_and_skips_what_cannot_run(tmp_path, artefacts):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    result = run_bench(artefacts["fast"], engine, "-n", "5", "--warmup", "1", "-b", "1", "2", "--out", tmp_path,
                       "--name", "run")
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "run.json").read_text())
    environment = document["environment"]
    assert environment["cpu"] and environment["cpu_count"] and environment["tools"]["onnx"]
    assert environment["load_average"] is not None and environment["load_average_after"] is not None
    by_key = {c["key"]: c for c in document["cases"]}
    timed = by_key[f"{artefacts['fast'].parent.name}/fast.onnx|ort-cpu|b1|t0"]
    assert timed["iterations"] == 5 and timed["median_ms"] > 0 and timed["p99_ms"] >= timed["median_ms"]
    assert by_key[f"{artefacts['fast'].parent.name}/fast.onnx|ort-cpu|b2|t0"]["skipped"] == "static batch 1"
    engine_case = next(c for c in document["cases"] if c["backend"] == "trt")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert engine_case["skipped"] == "TensorRT is not installed"
    rows = list(csv.DictReader((tmp_path / "run.csv").open()))
    assert len(rows) == len(document["cases"]) and "median_ms" in rows[0]


def test_gate_fails_on_a_planted_slowdown_and_passes_on_the_same_artefact(tmp_path, artefacts):
    baseline = tmp_path / "baseline.json"
    common = ["-n", "30", "--warmup", "3", "--reference", f"ref={artefacts['fast']}", "--out", tmp_path]
    saved = run_bench(f"ref={artefacts['fast']}", f"candidate={artefacts['copy']}", *common, "--save-baseline", baseline)
    assert saved.returncode == 0, saved.stderr
    assert json.loads(baseline.read_text())["reference"] == "ref"
    # The same artefact again: its ratio to the reference is unchanged (generous tolerance: a shared machine).
    same = run_bench(f"ref={artefacts['fast']}", f"candidate={artefacts['copy']}", *common, "--baseline", baseline,
                     "--tolerance", "100")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "gate passed" in same.stdout
    # The candidate swapped for a slowed artefact under the same label: ~200x the work.
    slowed = run_bench(f"ref={artefacts['fast']}", f"candidate={artefacts['slow']}", *common, "--baseline", baseline,
                       "--tolerance", "100")
    assert slowed.returncode == bench.EXIT_REGRESSION, slowed.stdout + slowed.stderr
    assert "SLOWER candidate|ort-cpu|b1|t0" in slowed.stdout and "gate FAILED: 1 case(s)" in slowed.stdout


def test_absolute_gate_fails_against_a_much_faster_baseline(tmp_path, artefacts):
    baseline = tmp_path / "baseline.json"
    assert run_bench(artefacts["fast"], artefacts["copy"], "-n", "5", "--out", tmp_path,
                     "--save-baseline", baseline).returncode == 0
    document = json.loads(baseline.read_text())
    for entry in document["cases"].values():
        entry["median_ms"] /= 100.0  # a baseline from an impossibly fast machine
    baseline.write_text(json.dumps(document))
    result = run_bench(artefacts["fast"], artefacts["copy"], "-n", "5", "--out", tmp_path, "--baseline", baseline)
    assert result.returncode == bench.EXIT_REGRESSION
    assert result.stdout.count("SLOWER ") == 2 and "fast.onnx" in result.stdout and "copy.onnx" in result.stdout


def test_bad_arguments_are_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "export.bench", str(tmp_path / "nothing.onnx")], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == f"error: artefact not found: {tmp_path / 'nothing.onnx'}"
    (tmp_path / "bad.json").write_text("{}")
    onnx.save(tiny_classifier(), str(tmp_path / "m.onnx"))
    result = run_bench(tmp_path / "m.onnx", "--baseline", tmp_path / "bad.json", "-n", "1")
    assert result.returncode == 2 and "not a baseline file" in result.stderr


def run_bench_cli(*args, timeout=300):
    """``python -m export.bench ARGS`` in a fresh interpreter: exit codes and stderr exactly as a user sees them."""
    return subprocess.run([sys.executable, "-m", "export.bench", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def test_a_gate_that_cannot_compare_a_baseline_case_fails_naming_it(tmp_path, artefacts):
    baseline = tmp_path / "baseline.json"
    assert run_bench(artefacts["fast"], "-n", "3", "--out", tmp_path, "--save-baseline", baseline).returncode == 0
    document = json.loads(baseline.read_text())
    (only,) = document["cases"]
    document["cases"][only.replace("|b1|", "|b8|")] = dict(document["cases"][only])  # a case this run cannot time
    baseline.write_text(json.dumps(document))
    result = run_bench(artefacts["fast"], "-n", "3", "--out", tmp_path, "--baseline", baseline, "--tolerance", "1000")
    assert result.returncode == bench.EXIT_REGRESSION, result.stdout + result.stderr
    assert f"NOT COMPARED {only.replace('|b1|', '|b8|')}: not measured in this run" in result.stdout
    assert "gate FAILED: 0 case(s) slower" in result.stdout and "1 baseline case(s) not compared" in result.stdout
    # The same case skipped (static batch 1 asked for batch 8) is named with the reason.
    skipped = run_bench(artefacts["fast"], "-n", "3", "-b", "1", "8", "--out", tmp_path, "--baseline", baseline,
                        "--tolerance", "1000")
    assert skipped.returncode == bench.EXIT_REGRESSION and "skipped: static batch 1" in skipped.stdout


def test_a_reference_that_was_skipped_is_an_error_and_saves_nothing(tmp_path, artefacts):
    static_4 = tmp_path / "static4.onnx"
    model = tiny_classifier()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(model, str(static_4))
    baseline = tmp_path / "baseline.json"
    result = run_bench_cli(artefacts["fast"], "--reference", static_4, "-b", "1", "-n", "3", "--out", tmp_path / "r",
                           "--save-baseline", baseline)
    assert result.returncode == 2 and not baseline.exists(), result.stdout + result.stderr
    assert result.stderr.strip() == (f"error: --reference {static_4.parent.name}/static4.onnx was not measured in any "
                                     "case (skipped: static batch 4): choose a reference that runs at these batch sizes "
                                     "and backends")
    assert list((tmp_path / "r").iterdir()) == []


@pytest.mark.parametrize("cases,message", [
    ({"a|ort-cpu|b1|t0": {"median_ms": "fast", "ratio": None}}, "has median_ms 'fast'; expected a positive number"),
    ({"a|ort-cpu|b1|t0": {"median_ms": -1.0}}, "has median_ms -1.0"),
    ({"a|ort-cpu|b1|t0": [1, 2]}, "must be an object with median_ms and ratio"),
    ({"a|ort-cpu|b1|t0": {"median_ms": None, "ratio": None}}, "has neither median_ms nor ratio"),
    ({}, "holds no case: a gate against it would compare nothing"),
])
def test_a_baseline_with_wrong_values_is_one_error_line_before_measuring(tmp_path, artefacts, cases, message):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"schema": 1, "reference": None, "cases": cases}))
    result = run_bench_cli(artefacts["fast"], "--baseline", baseline, "--out", tmp_path / "results")
    assert result.returncode == 2 and result.stdout == "", result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {baseline}") and message in line
    assert not (tmp_path / "results").exists()  # nothing measured, nothing written


@pytest.mark.parametrize("option", ["--out", "--save-baseline"])
def test_an_unwritable_output_is_refused_before_measuring(tmp_path, artefacts, option):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "sub" / ("baseline.json" if option == "--save-baseline" else "")
    started = time.perf_counter()
    result = run_bench_cli(artefacts["slow"], "-n", "100000", option, target)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot write ") and "Not a directory" in line
    assert time.perf_counter() - started < 60  # 100000 slowed runs would take minutes: nothing was measured


@pytest.mark.parametrize("flag,value", [("-n", "0"), ("--warmup", "-1"), ("-b", "0"), ("--threads", "-2"),
                                        ("--tolerance", "nan"), ("--tolerance", "-5")])
def test_numeric_flags_are_bounded(artefacts, flag, value):
    result = run_bench_cli(artefacts["fast"], flag, value)
    assert result.returncode == 2 and "error: argument" in result.stderr and "Traceback" not in result.stderr


def test_progress_is_not_printed_twice(tmp_path, artefacts):
    result = run_bench_cli(artefacts["fast"], artefacts["copy"], "-n", "3", "--out", tmp_path)
    assert result.returncode == 0 and result.stderr == ""  # not a terminal: the table alone carries the figures
    assert result.stdout.count("fast.onnx") == 1 and result.stdout.count("copy.onnx") == 1
    document = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert all(round(value, 2) == value for value in document["environment"]["load_average"])


def test_tensorrt_engine_timing(tmp_path, artefacts):
    reason = bench.tensorrt_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from export.on_target.tensorrt_engine import build_engine, plan_engine

    engine = tmp_path / "tiny.engine"
    build_engine(plan_engine(bench.target_facts()["tensorrt"], "fp32"), artefacts["fast"], engine,
                 {"min": 1, "opt": 1, "max": 2}, "images", IMAGE_SHAPE, None)
    result = run_bench(engine, "-b", "1", "2", "4", "-n", "20", "--out", tmp_path, "--name", "trt")
    assert result.returncode == 0, result.stdout + result.stderr
    cases = {c["batch"]: c for c in json.loads((tmp_path / "trt.json").read_text())["cases"]}
    assert cases[4]["skipped"] == "batch 4 is outside the engine's profile 1..2"
    for batch in (1, 2):
        assert 0 < cases[batch]["median_ms"] <= cases[batch]["end_to_end_median_ms"]


def test_an_engine_built_elsewhere_is_refused(tmp_path, artefacts):
    if bench.tensorrt_unavailable_reason():
        pytest.skip(bench.tensorrt_unavailable_reason())
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model_fp16.engine").write_bytes(b"an engine from another machine")
    (folder / "manifest.json").write_text(json.dumps({
        "artifacts": [{"path": "model_fp16.engine", "role": "engine"}],
        "engines": {"fp16": {"path": "model_fp16.engine", "tensorrt": "10.3.0.30", "gpu": "Orin (nvgpu)",
                             "compute_capability": "8.7"}}}))
    result = run_bench_cli(folder, "--out", tmp_path / "r")
    assert result.returncode == 2 and "engines are not portable" in result.stderr, result.stderr
