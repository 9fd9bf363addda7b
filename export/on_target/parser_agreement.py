"""Does the parser-support check agree with a real parser? A corpus of ONNX graphs through both, side by side.

``python -m export.on_target.tensorrt_support --against-parser CORPUS [CORPUS ...] --out DIR``:

- every graph of the corpus (``*.onnx`` under each folder) goes through the check, every support table, timed;
- and through a real ONNX parser and builder: TensorRT-RTX (it parses and builds on a machine without a GPU), or
  TensorRT where it is installed (``--runtime``). Parse and build are counted apart. Dynamic inputs get an
  optimization profile, shape-tensor inputs values in it, taken from ``GRAPH.npz`` beside the graph where there
  is one (``export.on_target.tensorrt_engine.probe_graph``): a failed build is then the builder's;
- the parser runs in child processes, one graph at a time: TensorRT-RTX's parser ends the process
  (std::terminate) on a plugin node, and a graph that takes a child down is recorded as such, not lost;
- each parser result is appended to ``DIR/parser.<runtime>.jsonl`` as it arrives, and a rerun skips the graphs
  found there (the check, fast, always runs again: its data may have changed);
- it prints per support table the confusion table (the check's verdict against the parser's) and the
  disagreements grouped by operator, and writes all of it to ``DIR/agreement.json``.

``--make-node-corpus DIR`` writes ONNX's own backend node test cases, generated from the installed onnx package
(``onnx.backend.test.case.node``), as ``DIR/<case>.onnx`` with the case's first inputs as ``DIR/<case>.npz``.

Only ``export.on_target.tensorrt_engine`` touches the runtime; this module needs onnx and numpy.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx

from compress.plumbing.cli import HelpFormatter, exit_codes_epilog, exit_from_cli
from compress.plumbing.errors import PipelineError
from export.on_target.runtimes import RUNTIMES, require_bindings, runtime, runtime_version
from export.on_target.tensorrt_engine import plan_engine, probe_graph
from export.on_target.tensorrt_support import SUPPORT_TABLES, Problem, check_graph, iter_graphs, support_data

REPO = Path(__file__).resolve().parents[2]
RESULTS = "agreement.json"
OUTCOMES = ("builds", "build refused", "parse refused", "parser aborted", "timed out", "harness error")
UNDECIDED = ("timed out", "harness error")  # neither a yes nor a no from the parser
REFUSED = ("build refused", "parse refused", "parser aborted")
STRUCTURAL_OPS = {"Constant", "Identity"}  # not what a graph of the corpus is about


class CorpusError(PipelineError):
    """A corpus, output folder or runtime the harness cannot use."""


# ----------------------------------------------------------------------------- corpora


def make_node_corpus(folder: Path) -> int:
    """ONNX's backend node test cases as ``<case>.onnx`` plus ``<case>.npz`` (the first data set's inputs that are
    arrays, keyed by graph input name: the values shape-tensor inputs get). Returns the number of graphs."""
    from onnx.backend.test.case.node import collect_testcases

    folder.mkdir(parents=True, exist_ok=True)
    cases = [case for case in collect_testcases(None) if case.model is not None]
    for case in cases:
        onnx.save(case.model, str(folder / f"{case.name}.onnx"))
        inputs = case.data_sets[0][0] if case.data_sets else []
        names = [value.name for value in case.model.graph.input]
        arrays = {name: np.asarray(value) for name, value in zip(names, inputs) if _is_array(value)}
        if arrays:
            np.savez(folder / f"{case.name}.npz", **arrays)
    return len(cases)


def _is_array(value) -> bool:
    return isinstance(value, (np.ndarray, np.generic)) and value.dtype != object


def corpus_graphs(corpora: Sequence[Path]) -> dict[str, Path]:
    """{graph id: path}: every ``*.onnx`` under each corpus folder (or the file itself), the id relative to it."""
    graphs = {}
    for corpus in corpora:
        if corpus.is_file() and corpus.suffix == ".onnx":
            graphs[corpus.name] = corpus
            continue
        if not corpus.is_dir():
            raise CorpusError(f"corpus not found: {corpus} (a folder of .onnx files or one .onnx file)")
        for path in sorted(corpus.rglob("*.onnx")):
            graphs[f"{corpus.name}/{path.relative_to(corpus)}"] = path
    if not graphs:
        raise CorpusError(f"no .onnx file under {', '.join(map(str, corpora))}")
    return graphs


def graph_operators(path: Path) -> list[str]:
    """The op types of a graph and its subgraphs, without the structural ones, in order of first use."""
    model = onnx.load(str(path), load_external_data=False)
    ops = [node.op_type for graph in iter_graphs(model.graph) for node in graph.node]
    return list(dict.fromkeys(op for op in ops if op not in STRUCTURAL_OPS)) or list(dict.fromkeys(ops))


# ----------------------------------------------------------------------------- the check side


def check_corpus(graphs: dict[str, Path]) -> tuple[dict[str, dict[str, list[Problem]]], float]:
    """({graph id: {table: problems}} on every support table, seconds the check took over the whole corpus)."""
    results, started = {}, time.perf_counter()
    for graph, path in graphs.items():
        results[graph] = check_graph(path, SUPPORT_TABLES)
    return results, time.perf_counter() - started


# ----------------------------------------------------------------------------- the parser side (child processes)


def parser_outcome(record: dict) -> str:
    """One of OUTCOMES for a parser record."""
    if record.get("aborted"):
        return "parser aborted"
    if record.get("timed_out"):
        return "timed out"
    if record.get("harness_error"):
        return "harness error"
    if not record["parsed"]:
        return "parse refused"
    return "builds" if record["built"] else "build refused"


class ParserWorker:
    """A child process that probes graphs one at a time (``--worker``), restarted when a graph takes it down."""

    def __init__(self, runtime_key: str, log: Path):
        self.runtime_key, self.log = runtime_key, log
        self.process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "a") as log:
            return subprocess.Popen([sys.executable, "-m", "export.on_target.parser_agreement", "--worker",
                                     self.runtime_key], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                    text=True, env=env, cwd=REPO)

    def probe(self, path: Path, timeout: float) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        values = path.with_suffix(".npz")
        request = {"graph": str(path), "values": str(values) if values.exists() else None}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return self._ended("the worker process had ended")
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.close()
            return {"parsed": None, "built": None, "timed_out": True, "seconds": timeout}
        line = self.process.stdout.readline()
        if not line:
            return self._ended(f"the parser process ended (exit status {self.process.wait()})")
        return json.loads(line)

    def _ended(self, why: str) -> dict:
        self.process = None
        return {"parsed": None, "built": None, "aborted": True, "abort": why}

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def worker_loop(runtime_key: str) -> int:
    """The child's side: one JSON request per stdin line, one JSON result per stdout line. Whatever the runtime
    itself prints goes to stderr, so stdout carries the results only."""
    results = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    chosen = runtime(runtime_key)
    require_bindings(chosen)
    version = runtime_version(chosen)
    flags = plan_engine(version, "fp32", chosen=chosen).network_flags
    for line in sys.stdin:
        request = json.loads(line)
        try:
            values = dict(np.load(request["values"])) if request["values"] else {}
            result = probe_graph(chosen, Path(request["graph"]), values, flags)
        except Exception as exc:  # the probe's own failure, told apart from the parser's and the builder's
            result = {"parsed": None, "built": None, "harness_error": f"{type(exc).__name__}: {exc}"[:300]}
        results.write(json.dumps(result) + "\n")
        results.flush()
    return 0


def probe_corpus(graphs: dict[str, Path], runtime_key: str, out: Path, jobs: int, timeout: float,
                 progress=print) -> dict[str, dict]:
    """{graph id: parser record} for every graph: read from ``out/parser.<runtime>.jsonl`` where a previous run
    recorded it, probed (in ``jobs`` child processes) and appended there otherwise."""
    store = out / f"parser.{runtime_key}.jsonl"
    done = read_records(store)
    todo = [graph for graph in graphs if graph not in done]
    progress(f"parser: {len(done)} graph(s) recorded in {store}, {len(todo)} to probe with {jobs} process(es)")
    lock, counter = threading.Lock(), Counter()
    workers = [ParserWorker(runtime_key, out / f"parser.{runtime_key}.log") for _ in range(jobs)]
    free = list(workers)

    def probe(graph: str) -> None:
        with lock:
            worker = free.pop()
        try:
            record = {"graph": graph, **worker.probe(graphs[graph], timeout)}
        finally:
            with lock:
                free.append(worker)
        with lock:
            with open(store, "a") as file:
                file.write(json.dumps(record) + "\n")
            done[graph] = record
            counter[parser_outcome(record)] += 1
            if sum(counter.values()) % 100 == 0:
                progress(f"  {sum(counter.values())}/{len(todo)}: {dict(counter)}")

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(probe, todo))
    finally:
        for worker in workers:
            worker.close()
    return {graph: done[graph] for graph in graphs}


def read_records(store: Path) -> dict[str, dict]:
    """The parser records of a previous run (a line cut short by an interrupted run is dropped)."""
    if not store.exists():
        return {}
    records = {}
    for line in store.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[record["graph"]] = record
    return records


# ----------------------------------------------------------------------------- comparing the two


@dataclass(frozen=True)
class Disagreement:
    graph: str
    table: str
    kind: str  # "false accept (parse)", "false accept (build)", "false accept (aborted)", "false refusal"
    operator: str
    reason: str  # the parser's error for a false accept, the check's first problem for a false refusal


def confusion(checked: dict[str, dict[str, list[Problem]]], parsed: dict[str, dict], table: str) -> dict:
    """{"supported" / "refused": {outcome: count}} for one support table, and the agreement figures."""
    cells = {verdict: dict.fromkeys(OUTCOMES, 0) for verdict in ("supported", "refused")}
    for graph, per_table in checked.items():
        verdict = "refused" if per_table[table] else "supported"
        cells[verdict][parser_outcome(parsed[graph])] += 1
    decided = sum(cells[v][o] for v in cells for o in OUTCOMES if o not in UNDECIDED)
    agree = cells["supported"]["builds"] + sum(cells["refused"][o] for o in REFUSED)
    return {"cells": cells, "graphs": len(checked), "decided": decided, "agree": agree,
            "agreement": round(agree / decided, 4) if decided else None,
            "false_accepts_parse": cells["supported"]["parse refused"] + cells["supported"]["parser aborted"],
            "false_accepts_build": cells["supported"]["build refused"], "false_refusals": cells["refused"]["builds"]}


PARSER_OPERATOR = re.compile(r"operator: ([A-Za-z0-9_]+)|import([A-Z][A-Za-z0-9_]+)")


def blamed_operator(error: str, operators: list[str], flagged: list[str]) -> str:
    """The operator a parser refusal is about: the one its message names, else one that a support table refuses in
    this graph (the measured table knows this parser), else the graph's first."""
    named = PARSER_OPERATOR.search(error)
    if named:
        return named.group(1) or named.group(2)
    return next((op for op in flagged if op in operators), (operators or ["?"])[0])


def disagreements(checked: dict[str, dict[str, list[Problem]]], parsed: dict[str, dict], operators: dict[str, list[str]],
                  table: str) -> list[Disagreement]:
    """Every graph where the check's verdict on ``table`` and the parser's outcome differ, with the operator it is
    about (the check's first problem's for a false refusal, ``blamed_operator`` for a false accept)."""
    found = []
    for graph, per_table in checked.items():
        outcome, problems = parser_outcome(parsed[graph]), per_table[table]
        if problems and outcome == "builds":
            first = problems[0]
            found.append(Disagreement(graph, table, "false refusal", first.op or "(graph)", first.reason))
        elif not problems and outcome in REFUSED:
            error = parsed[graph].get("parse_error") or parsed[graph].get("build_error") or parsed[graph].get("abort") or ""
            flagged = [p.op for found_ in per_table.values() for p in found_ if p.op]
            kind = {"parse refused": "false accept (parse)", "build refused": "false accept (build)",
                    "parser aborted": "false accept (aborted)"}[outcome]
            found.append(Disagreement(graph, table, kind, blamed_operator(error, operators.get(graph, []), flagged),
                                      error))
    return found


def grouped(found: Iterable[Disagreement]) -> dict[tuple[str, str], list[Disagreement]]:
    """Disagreements by (kind, operator), largest group first."""
    groups = defaultdict(list)
    for item in found:
        groups[(item.kind, item.operator)].append(item)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]), kv[0][1])))


def table_lines(table: str, figures: dict, runtime_name: str) -> list[str]:
    """The confusion table of one support table as text."""
    title = support_data()["versions"][table]["title"]
    width = max(len(o) for o in OUTCOMES)
    lines = [f"table {table} ({title}) against {runtime_name}, {figures['graphs']} graphs",
             f"  {'':<16}" + "".join(f"{o:>{width + 2}}" for o in OUTCOMES)]
    for verdict, cells in figures["cells"].items():
        lines.append(f"  check: {verdict:<9}" + "".join(f"{cells[o]:>{width + 2}}" for o in OUTCOMES))
    share = f" ({100 * figures['agreement']:.1f} %)" if figures["agreement"] is not None else ""
    lines.append(f"  agreement {figures['agree']}/{figures['decided']}{share}; false accepts: "
                 f"{figures['false_accepts_parse']} at parse, {figures['false_accepts_build']} at build; false "
                 f"refusals: {figures['false_refusals']}")
    return lines


def disagreement_lines(found: list[Disagreement], examples: int = 3) -> list[str]:
    lines = []
    for (kind, operator), items in grouped(found).items():
        names = ", ".join(Path(item.graph).stem for item in items[:examples]) + (", ..." if len(items) > examples else "")
        lines.append(f"    {kind:<22} {operator:<24} {len(items):>4}  {names}")
        lines.append(f"    {'':<22} {'':<24}       {items[0].reason[:160]}")
    return lines


# ----------------------------------------------------------------------------- the command


def against_parser(corpora: Sequence[Path], out: Path, runtime_key: str | None, jobs: int, timeout: float,
                   tables: Sequence[str] = SUPPORT_TABLES, progress=print) -> dict:
    """Run the corpus through the check and the parser, write ``out/agreement.json``, return what it holds."""
    chosen = RUNTIMES[runtime_key] if runtime_key else next(
        (r for r in (RUNTIMES["rtx"], RUNTIMES["trt"]) if runtime_version(r)), None)
    if chosen is None or runtime_version(chosen) is None:
        raise CorpusError(f"no real parser to compare with: {'TensorRT-RTX or TensorRT' if chosen is None else chosen.name} "
                          "is not installed (pip install -e '.[rtx]' installs TensorRT-RTX, no GPU needed)")
    out.mkdir(parents=True, exist_ok=True)
    graphs = corpus_graphs(corpora)
    progress(f"{len(graphs)} graph(s) from {', '.join(map(str, corpora))}")
    checked, check_seconds = check_corpus(graphs)
    progress(f"check: {len(graphs)} graph(s) x {len(SUPPORT_TABLES)} table(s) in {check_seconds:.1f} s")
    parsed = probe_corpus(graphs, chosen.key, out, jobs, timeout, progress)
    operators = {graph: graph_operators(path) for graph, path in graphs.items()}
    runtime_name = f"{chosen.name} {runtime_version(chosen)}"
    report = {"runtime": runtime_name, "corpora": [str(c) for c in corpora], "graphs": len(graphs),
              "check_seconds": round(check_seconds, 2), "tables": {}}
    for table in tables:
        figures = confusion(checked, parsed, table)
        found = disagreements(checked, parsed, operators, table)
        report["tables"][table] = {**figures, "disagreements": [item.__dict__ for item in found]}
        for line in table_lines(table, figures, runtime_name) + disagreement_lines(found):
            progress(line)
    report["graph_results"] = {graph: {"operators": operators[graph], "parser": parsed[graph],
                                       "check": {t: [str(p) for p in checked[graph][t]] for t in tables}}
                               for graph in graphs}
    (out / RESULTS).write_text(json.dumps(report, indent=1) + "\n")
    progress(f"written: {out / RESULTS}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.on_target.tensorrt_support", formatter_class=HelpFormatter,
        description="Compare the parser-support check with a real ONNX parser on a corpus of graphs.",
        epilog=exit_codes_epilog())
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--against-parser", nargs="+", type=Path, metavar="CORPUS",
                      help="folders of .onnx graphs (searched recursively) or .onnx files")
    task.add_argument("--make-node-corpus", type=Path, metavar="DIR",
                      help="write ONNX's backend node test cases (from the installed onnx) into DIR and stop")
    parser.add_argument("--out", type=Path, default=Path("parser_agreement"),
                        help="where the parser records (resumable) and agreement.json go")
    parser.add_argument("--runtime", choices=("rtx", "trt"), default=None,
                        help="the real parser: rtx (TensorRT-RTX) or trt (TensorRT) (default: whichever is installed, "
                             "TensorRT-RTX first)")
    parser.add_argument("--tables", nargs="+", choices=SUPPORT_TABLES, default=list(SUPPORT_TABLES),
                        help="the support tables to report")
    parser.add_argument("--jobs", type=int, default=1, help="parser child processes at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one graph may take to parse and build")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.make_node_corpus:
        count = make_node_corpus(args.make_node_corpus)
        print(f"{count} ONNX node test case(s) (onnx {onnx.__version__}) written to {args.make_node_corpus}")
        return 0
    if args.jobs < 1 or args.timeout <= 0:
        raise CorpusError("--jobs must be >= 1 and --timeout > 0")
    against_parser(args.against_parser, args.out, args.runtime, args.jobs, args.timeout, args.tables)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker_loop(sys.argv[2]))
    exit_from_cli(main)
