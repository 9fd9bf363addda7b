"""``python -m compress.seed_grid``: the demo's claims measured over several seeds, with 95 % intervals, by one command.

For every seed it trains the runs of ``python -m compress.demo`` (the same recipe, ``DemoRecipe``): the full-image
base, its masked fine-tuning, with ``--control`` the unmasked control (the same epochs, no patch removed), and
DynamicViT at every ``--keeps`` ratio from each of them. ``--tocom`` adds a keep-ratio ToCom plugin, and
``--tome-tocom`` a ToMe r plugin, on that seed's DynamicViT from the masked init at ``--tocom-keep`` (the kind of model
the demo ships), each measured with and without ToCom on the test split. ``--epochs-scale`` shortens every run the
same way, to fit a time budget without dropping seeds.

Every run is a *cell*, OUT/seed_<s>/<run>/. Runs start from the cells they need (one base per seed serves
every fine-tuning and DynamicViT run of that seed) and run side by side, ``--jobs`` worker processes with
``--threads`` threads each. A finished cell writes OUT/seed_<s>/<run>/cell.json atomically; a later start with the
same OUT skips every cell that has one ("skipping finished cell") and resumes an unfinished training run from its
last epoch checkpoint (a ToCom run starts again). A worker that dies stops the grid (exit 1); run the same command
again to go on.

At the end it writes OUT/results.json (every cell; per arm the mean, sample standard deviation and 95 % interval
over the seeds; the paired comparisons, each with the per-seed differences, their mean and interval and the
verdict they support: "helps", "hurts" or "no measurable effect") and OUT/accuracy_vs_keep.png.

Exit codes: 1 when some cells did not finish (a cell failed, or a worker was killed): rerun to resume.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from compress.models import tocom
from compress.plumbing.cli import (
    add_version_argument,
    keep_ratio_argument,
    parse_number_list,
    parser_from_docstring,
    positive_float,
    positive_int,
)
from compress.plumbing.errors import PipelineError
from compress.plumbing.files import atomic_write, prepare_output
from compress.training import seed_grid_report as report
from compress.training.demo import DEMO_RECIPE, DemoRecipe, add_recipe_arguments
from compress.training.seed_statistics import INTERVAL_METHODS
from compress.training.tocom_train import ToComTrainConfig
from compress.training.tocom_train import train as train_tocom
from compress.training.train import CHECKPOINT_NAME, MODEL_NAME, TrainConfig, train

CELL_RESULT, CELL_STARTED, CELL_OUTPUT = "cell.json", "started.json", "output.log"
RESULTS_NAME, PLOT_NAME = "results.json", "accuracy_vs_keep.png"
EXIT_UNFINISHED = 1
INITS = ("base", "masked")  # DynamicViT is trained from each; --control adds "finetuned"
TRAINING_KINDS = ("base", "masked", "finetuned", "dynamicvit")
TOCOM_KINDS = ("tocom", "tome_tocom")
# The ToCom recipes of the single-seed figures in the docs: the shipped keep-ratio plugin (docs/tocom.md) and the
# ToMe r plugin on the demo backbone (docs/tome.md). Epochs and warm-up are scaled by --epochs-scale like the rest.
KEEP_TOCOM_RECIPE = dict(epochs=30, lr=1e-3, warmup_epochs=2.0, batch_size=64)
TOME_TOCOM_RECIPE = dict(tome=True, epochs=12, lr=1e-3, warmup_epochs=1.0, batch_size=64, rank_per_step=2)
TOME_RS = (4, 8, 12, 16)  # docs/tome.md's deploy r
TOCOM_HOLDOUT = ToComTrainConfig().holdout_fraction
# Expected seconds of one cell at one thread on the 2-core development VM, for the order cells start in and the
# estimate of the time left (which is then calibrated by the cells that finish). Per epoch: the base 397 s / 40 and
# masked fine-tuning 43 s / 10 (docs/training.md), the control 79 s / 10 and DynamicViT 97.5 s / 12 (mean of the six
# timed runs of docs/demo_results.json and docs/training.md); ToCom: one epoch and the fixed cost of choosing the
# scale and measuring the test split, timed for issue 27 (one thread, full data).
SECONDS_PER_EPOCH = {"base": 9.9, "masked": 4.3, "finetuned": 7.9, "dynamicvit": 8.1, "tocom": 2.5, "tome_tocom": 2.5}
SECONDS_PER_CELL = {"tocom": 33.0, "tome_tocom": 24.0}


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class GridSpec:
    """What the grid measures: which seeds, keep ratios and arms, with which recipe (as given: ``plan_cells`` scales
    its epochs by ``epochs_scale``)."""

    seeds: tuple[int, ...]
    keeps: tuple[float, ...]
    recipe: DemoRecipe = DEMO_RECIPE
    control: bool = False
    tocom: bool = False
    tome_tocom: bool = False
    tocom_keep: float = 0.7
    tome_rs: tuple[int, ...] = TOME_RS
    epochs_scale: float = 1.0
    limit_train: int | None = None
    limit_eval: int | None = None

    @property
    def inits(self) -> tuple[str, ...]:
        return INITS + (("finetuned",) if self.control else ())


@dataclass(frozen=True)
class Cell:
    """One training run of the grid. ``name`` ("seed_0/dynamicvit_masked_0.7") is also its folder under OUT;
    ``needs``: the cells whose model.pth it starts from; ``options``: what it trains (the trainer's options, JSON
    values, the init named by cell): two starts that plan the same options train the same cell."""

    name: str
    kind: str
    seed: int
    options: dict = field(hash=False)
    needs: tuple[str, ...] = ()
    init: str | None = None  # the arm a DynamicViT starts from
    keep: float | None = None  # a DynamicViT's keep ratio; a ToCom cell's --tocom-keep

    @property
    def expected_seconds(self) -> float:
        return SECONDS_PER_EPOCH[self.kind] * self.options["epochs"] + SECONDS_PER_CELL.get(self.kind, 0.0)


def scaled_epochs(epochs: int, scale: float) -> int:
    """``epochs`` x ``scale`` rounded half up, at least 1 (0 stays 0): every arm shortened the same way."""
    return 0 if epochs == 0 else max(1, int(math.floor(epochs * scale + 0.5)))


def scaled_recipe(recipe: DemoRecipe, scale: float) -> DemoRecipe:
    """The recipe with every epoch count (warm-up included) scaled by ``scale``, so every schedule keeps its shape."""
    return replace(recipe, base_epochs=scaled_epochs(recipe.base_epochs, scale),
                   masked_epochs=scaled_epochs(recipe.masked_epochs, scale),
                   dynamicvit_epochs=scaled_epochs(recipe.dynamicvit_epochs, scale),
                   backbone_frozen_epochs=scaled_epochs(recipe.backbone_frozen_epochs, scale),
                   warmup_epochs=recipe.warmup_epochs * scale)


def scaled_tocom_recipe(recipe: dict, scale: float) -> dict:
    return {**recipe, "epochs": scaled_epochs(recipe["epochs"], scale), "warmup_epochs": recipe["warmup_epochs"] * scale}


def keep_name(keep: float) -> str:
    return f"{keep:g}"


def plan_cells(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid, each after the cells it needs (seed by seed)."""
    recipe = scaled_recipe(spec.recipe, spec.epochs_scale)
    limits = dict(limit_train=spec.limit_train, limit_eval=spec.limit_eval)
    cells = []
    for seed in spec.seeds:
        cells.append(make_cell(seed, "base", "base", recipe.base_run(), limits))
        cells.append(make_cell(seed, "masked", "masked", recipe.finetune_run(masked=True), limits, "base"))
        if spec.control:
            cells.append(make_cell(seed, "finetuned", "finetuned", recipe.finetune_run(masked=False), limits, "base"))
        for keep in spec.keeps:
            for init in spec.inits:
                cells.append(make_cell(seed, f"dynamicvit_{init}_{keep_name(keep)}", "dynamicvit",
                                       recipe.dynamicvit_run(keep), limits, init, init=init, keep=keep))
        subject = f"dynamicvit_masked_{keep_name(spec.tocom_keep)}"
        if spec.tocom:
            cells.append(make_cell(seed, "tocom_keep", "tocom", scaled_tocom_recipe(KEEP_TOCOM_RECIPE, spec.epochs_scale),
                                   limits, subject, keep=spec.tocom_keep))
        if spec.tome_tocom:
            options = {**scaled_tocom_recipe(TOME_TOCOM_RECIPE, spec.epochs_scale), "eval_keeps": list(spec.tome_rs)}
            cells.append(make_cell(seed, "tocom_tome", "tome_tocom", options, limits, subject, keep=spec.tocom_keep))
    return cells


def make_cell(seed: int, run: str, kind: str, options: dict, limits: dict, starts_from: str | None = None,
              **labels) -> Cell:
    """The cell OUT/seed_<seed>/<run>, started from the same seed's cell ``starts_from`` (its init or ToCom's model)."""
    needs = (f"seed_{seed}/{starts_from}",) if starts_from else ()
    named = {**options, **({"init_cell": needs[0]} if needs else {}), "seed": seed, **limits}
    return Cell(f"seed_{seed}/{run}", kind, seed, json_values(named), needs, **labels)


def json_values(options: dict) -> dict:
    """``options`` as JSON gives them back (tuples become lists): what a cell's files record and are compared with."""
    return json.loads(json.dumps(options))


def critical_path_seconds(cells: Sequence[Cell]) -> dict[str, float]:
    """For each cell, its expected seconds plus the longest chain of cells that wait for it: started longest first,
    the cells that hold up the most work run early and the grid does not end on one long cell alone."""
    waiting: dict[str, list[Cell]] = {cell.name: [] for cell in cells}
    for cell in cells:
        for need in cell.needs:
            waiting[need].append(cell)
    path: dict[str, float] = {}
    for cell in reversed(cells):  # plan order puts every cell after what it needs
        path[cell.name] = cell.expected_seconds + max((path[w.name] for w in waiting[cell.name]), default=0.0)
    return path


def smallest_train_limit(spec: GridSpec) -> int:
    """The fewest training images that fill one batch of every run (ToCom trains on 1 - its held-out fraction)."""
    batches = [spec.recipe.batch_size, spec.recipe.dynamicvit_batch_size]
    if spec.tocom or spec.tome_tocom:
        batches.append(math.ceil(KEEP_TOCOM_RECIPE["batch_size"] / (1.0 - TOCOM_HOLDOUT)) + 1)
    return max(batches)


def check_spec(spec: GridSpec) -> None:
    """Refuse a grid that cannot run, before any work (PipelineError: one line, exit 2)."""
    if (spec.tocom or spec.tome_tocom) and round(spec.tocom_keep, 6) not in {round(k, 6) for k in spec.keeps}:
        keeps = ",".join(map(keep_name, spec.keeps))
        raise PipelineError(f"--tocom-keep {spec.tocom_keep:g} is not one of --keeps {keeps}: ToCom is trained on that "
                            "seed's DynamicViT at --tocom-keep")
    if spec.tocom:
        tocom.grid_index(tocom.DEFAULT_GRID, spec.tocom_keep, "--tocom-keep")
    if spec.limit_train is not None and spec.limit_train < smallest_train_limit(spec):
        raise PipelineError(f"--limit-train {spec.limit_train} is fewer than one batch of some run: use at least "
                            f"{smallest_train_limit(spec)}")


# ----------------------------------------------------------------------------- one cell (in a worker process)


def limit_threads(threads: int) -> None:
    """Worker start: ``threads`` torch threads. Two processes each running two OpenMP threads on two cores run 10x
    slower than one thread each (docs/training.md), so the grid's parallelism is its processes."""
    torch.set_num_threads(threads)


def write_json(path: Path, value: dict) -> Path:
    return atomic_write(path, lambda temporary: Path(temporary).write_text(json.dumps(value, indent=2) + "\n"))


def run_cell(cell: Cell, out: str, device: str | None) -> dict:
    """Train ``cell`` (resuming its checkpoint.pth when an earlier start left one), then write its cell.json
    atomically: from then on it counts as finished. The trainers' own output goes to the cell's output.log."""
    folder = Path(out) / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CELL_STARTED, {"cell": cell.name, "options": cell.options, "pid": os.getpid(),
                                        "started": time.time()})
    started = time.time()
    with open(folder / CELL_OUTPUT, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        result = CELL_TRAINERS[cell.kind](cell, Path(out), folder, device)
    record = {"cell": cell.name, "kind": cell.kind, "seed": cell.seed, "init": cell.init, "keep": cell.keep,
              "seconds": round(time.time() - started, 1), **result, "options": cell.options}
    write_json(folder / CELL_RESULT, record)
    # Only a resume reads the epoch checkpoint (optimizer, EMA, RNG: the largest file), and a finished cell is never
    # resumed.
    (folder / CHECKPOINT_NAME).unlink(missing_ok=True)
    return record


def _train_cell(cell: Cell, out: Path, folder: Path, device: str | None) -> dict:
    options = dict(cell.options)
    init = options.pop("init_cell", None)
    resume = "auto" if (folder / CHECKPOINT_NAME).is_file() else None
    result = train(TrainConfig(out=str(folder), init=str(out / init / MODEL_NAME) if init else None, resume=resume,
                               device=device, threads=torch.get_num_threads(), **options))
    return {"top1": result.metrics["eval_top1"], "top1_ema": result.metrics.get("eval_top1_ema"),
            "resumed": resume is not None}


def _tocom_cell(cell: Cell, out: Path, folder: Path, device: str | None) -> dict:
    options = dict(cell.options)
    subject = out / options.pop("init_cell") / MODEL_NAME
    if "eval_keeps" in options:
        options["eval_keeps"] = tuple(options["eval_keeps"])
    result = train_tocom(ToComTrainConfig(checkpoint=str(subject), out=str(folder), device=device, **options))
    degree = int if cell.kind == "tome_tocom" else float
    return {"chosen_scale": result.scale,
            "evaluation": [{"degree": degree(row["keep"]), "top1_without_tocom": row["top1_without_tocom"],
                            "top1_tocom_merged": row["top1_tocom_merged"]} for row in result.evaluation]}


CELL_TRAINERS: dict[str, Callable[[Cell, Path, Path, str | None], dict]] = {
    **{kind: _train_cell for kind in TRAINING_KINDS}, **{kind: _tocom_cell for kind in TOCOM_KINDS}}


# ----------------------------------------------------------------------------- the grid (main process)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or not written by a finished start: the cell runs (again)


def finished_record(cell: Cell, out: Path) -> dict | None:
    """The cell's cell.json when an earlier start finished it; PipelineError when that start (finished or not)
    trained other options: its files would mix two recipes."""
    folder = out / cell.name
    for name in (CELL_RESULT, CELL_STARTED):
        recorded = read_json(folder / name)
        if recorded is not None and recorded.get("options") != cell.options:
            changed = sorted(k for k in set(recorded.get("options") or {}) | set(cell.options)
                             if (recorded.get("options") or {}).get(k) != cell.options.get(k))
            raise PipelineError(f"{folder} was started with other options ({', '.join(changed)} differ): use another "
                                "--out, or the options of that run")
    return read_json(folder / CELL_RESULT)


def format_duration(seconds: float) -> str:
    """'1 h 05 min', '4 min 12 s', '37 s'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def remaining_seconds(expected_left: float, expected_done: float, actual_done: float, jobs: int) -> float:
    """Time left: the expected seconds of the cells not finished, scaled by how long the finished ones took
    against their expectation (this machine, this load), spread over ``jobs`` workers."""
    calibration = actual_done / expected_done if expected_done > 0 and actual_done > 0 else 1.0
    return expected_left * calibration / max(1, jobs)


@dataclass
class GridRun:
    """What one start of the grid did: records of the finished cells (earlier starts included), the failures."""

    records: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)
    worker_died: bool = False


def say(message: str) -> None:
    print(f"[grid] {message}", file=sys.stderr, flush=True)


def run_grid(cells: Sequence[Cell], out: Path, jobs: int, threads: int, device: str | None) -> GridRun:
    """Run every unfinished cell once what it needs has finished, ``jobs`` at a time, longest critical path first."""
    run = GridRun()
    for cell in cells:
        record = finished_record(cell, out)
        if record is not None:
            run.records[cell.name] = record
            say(f"skipping finished cell {cell.name} ({report.cell_summary(record)})")
    pending = [cell for cell in cells if cell.name not in run.records]
    expected = sum(cell.expected_seconds for cell in pending)
    say(f"{len(cells)} cells: {len(run.records)} finished earlier, {len(pending)} to run on {jobs} worker(s) of "
        f"{threads} thread(s); expected about {format_duration(remaining_seconds(expected, 0, 0, jobs))} "
        "(an estimate from the per-epoch times in the docs)")
    if not pending:
        return run
    # Spawned, not forked: a worker starts with no copy of this process's torch threads. OMP_NUM_THREADS reaches
    # the OpenMP runtime before the worker imports torch; limit_threads then sets torch's own count.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=limit_threads,
                                                initargs=(threads,)) as pool:
        try:
            _schedule(pool, cells, pending, run, out, jobs, device)
        except KeyboardInterrupt:
            stop_workers()
            raise
    return run


@contextlib.contextmanager
def workers_ignore_sigint():
    """Spawned while SIGINT is ignored, a worker ignores it for life (an ignored signal stays ignored across exec, and
    Python leaves it so). Ctrl-C then reaches the grid alone, which stops its workers (``stop_workers``) instead of
    each of them printing a KeyboardInterrupt from wherever it was."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_workers() -> None:
    """Terminate this process's worker processes (a cell cut short keeps its last epoch checkpoint)."""
    for worker in multiprocessing.active_children():
        worker.terminate()


def _schedule(pool: concurrent.futures.ProcessPoolExecutor, cells: Sequence[Cell], pending: list[Cell], run: GridRun,
              out: Path, jobs: int, device: str | None) -> None:
    """Submit every cell whose needs have finished, longest critical path first, at most ``jobs`` at a time; record
    in ``run`` what finishes, fails or dies. A dead worker stops the grid (the pool cannot go on without it)."""
    priority = critical_path_seconds(cells)
    expected_left = sum(cell.expected_seconds for cell in pending)
    expected_done = actual_done = 0.0
    started = time.time()
    running: dict[concurrent.futures.Future, tuple[Cell, float]] = {}
    while True:
        blocked = {c.name for c in pending if any(n in run.failed or n in run.not_run for n in c.needs)}
        run.not_run += sorted(blocked)
        pending = [c for c in pending if c.name not in blocked]
        ready = sorted((c for c in pending if all(n in run.records for n in c.needs)), key=lambda c: -priority[c.name])
        for cell in ready[: jobs - len(running)]:
            pending.remove(cell)
            resuming = (out / cell.name / CHECKPOINT_NAME).is_file() and cell.kind in TRAINING_KINDS
            with workers_ignore_sigint():  # a worker process, when one is needed, is spawned here
                running[pool.submit(run_cell, cell, str(out), device)] = (cell, time.time())
            say(f"{'resuming' if resuming else 'started'} {cell.name} ({cell.options['epochs']} epochs) "
                f"[running {len(running)}, done {len(run.records)}/{len(cells)}, "
                f"elapsed {format_duration(time.time() - started)}]")
        if not running:
            return
        done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            cell, since = running.pop(future)
            try:
                record = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                run.worker_died = True
                run.failed[cell.name] = "its worker process died"
                continue
            except Exception as exc:  # a failed cell stops the cells that need it; the others go on
                run.failed[cell.name] = f"{type(exc).__name__}: {exc}"
                say(f"FAILED {cell.name}: {exc} (its output: {out / cell.name / CELL_OUTPUT})")
                continue
            run.records[cell.name] = record
            expected_left -= cell.expected_seconds
            expected_done += cell.expected_seconds
            actual_done += time.time() - since
            say(f"finished {cell.name} in {format_duration(time.time() - since)}: {report.cell_summary(record)} "
                f"[done {len(run.records)}/{len(cells)}, elapsed {format_duration(time.time() - started)}, about "
                f"{format_duration(remaining_seconds(expected_left, expected_done, actual_done, jobs))} left]")
        if run.worker_died:
            say("a worker process died (killed?): stopping; finished cells are kept, rerun the same command to go on")
            run.not_run += [c.name for c, _ in running.values()] + [c.name for c in pending]
            return


# ----------------------------------------------------------------------------- command line


def _number_list(convert: Callable[[str], float | int], check: Callable[[float | int], bool], domain: str,
                 example: str) -> Callable[[str], tuple]:
    """An argparse type: distinct comma-separated numbers, each ``check``ed, at least one."""

    def parse(text: str) -> tuple:
        try:
            values = parse_number_list(text, convert)
        except ValueError:
            values = ()
        if not values or not all(check(v) for v in values) or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"expected distinct {domain} like '{example}', got {text!r}")
        return values

    return parse


seed_list = _number_list(int, lambda seed: seed >= 0, "integers >= 0", "0,1,2,3,4")
keep_list = _number_list(float, lambda keep: 0.0 < keep <= 1.0 and math.isfinite(keep), "keep ratios in (0, 1]",
                         "0.9,0.7,0.5,0.3")
r_list = _number_list(int, lambda r: 1 <= r <= tocom.TOME_GRID[-1], f"integers in [1, {tocom.TOME_GRID[-1]}]",
                      "4,8,12,16")


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = parser_from_docstring("python -m compress.seed_grid", __doc__, (
        EXIT_UNFINISHED, "some cells did not finish (a failed cell, a killed worker): rerun the same command to resume"))
    add_version_argument(parser)
    grid = parser.add_argument_group("the grid")
    grid.add_argument("--seeds", type=seed_list, default=(0, 1, 2, 3, 4),
                      help="seeds, each a full set of runs (default: 0,1,2,3,4)")
    grid.add_argument("--keeps", type=keep_list, default=(0.9, 0.7, 0.5, 0.3),
                      help="keep ratios to train DynamicViT at, each in (0, 1] (default: 0.9,0.7,0.5,0.3)")
    grid.add_argument("--control", action="store_true",
                      help="also fine-tune each base without masking (the same epochs) and train DynamicViT from it "
                      "(default: off)")
    grid.add_argument("--tocom", action="store_true",
                      help="train a keep-ratio ToCom plugin per seed on DynamicViT from the masked init at --tocom-keep "
                      f"(recipe of docs/tocom.md: {_recipe_text(KEEP_TOCOM_RECIPE)}) and measure every other grid keep "
                      "ratio with and without it (default: off)")
    grid.add_argument("--tome-tocom", action="store_true",
                      help="train a ToMe r plugin per seed on the same model's backbone (recipe of docs/tome.md: "
                      f"{_recipe_text(TOME_TOCOM_RECIPE)}) and measure each --tome-rs with and without it (default: off)")
    grid.add_argument("--tocom-keep", type=keep_ratio_argument, default=0.7,
                      help="keep ratio of the DynamicViT the ToCom plugins are trained for; one of --keeps")
    grid.add_argument("--tome-rs", type=r_list, default=TOME_RS,
                      help="ToMe r to measure with --tome-tocom (default: 4,8,12,16)")
    grid.add_argument("--epochs-scale", type=positive_float, default=1.0,
                      help="multiply every run's epochs and warm-up by this (rounded, at least 1 epoch), the same for "
                      "every arm: to fit a time budget")
    grid.add_argument("--interval", choices=INTERVAL_METHODS, default="t",
                      help="95 %% interval of a mean over seeds: Student's t, or a percentile bootstrap over the seeds "
                      "(10,000 resamples, fixed seed 0)")

    recipe = parser.add_argument_group("the recipe (python -m compress.demo's)")
    add_recipe_arguments(recipe)

    run = parser.add_argument_group("run")
    run.add_argument("--out", "-o", type=Path, default=Path("runs/seed_grid"),
                     help="folder of every cell (seed_<s>/<run>/), results.json and the plot; the same folder resumes")
    run.add_argument("--plot", type=Path, default=None, help=f"where the plot goes (default: OUT/{PLOT_NAME})")
    run.add_argument("--jobs", "-j", type=positive_int, default=default_jobs(),
                     help="runs side by side, one worker process each (default: the CPU cores this process may use, "
                     f"here {default_jobs()})")
    run.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--limit-train", type=positive_int, default=None,
                     help="train on only the first N training images, for smoke tests (default: all)")
    run.add_argument("--limit-eval", type=positive_int, default=None,
                     help="measure on only the first N test images, for smoke tests (default: all)")
    return parser


def _recipe_text(recipe: dict) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in recipe.items() if not isinstance(value, bool))


def spec_from_args(args: argparse.Namespace) -> GridSpec:
    return GridSpec(seeds=args.seeds, keeps=args.keeps, recipe=DemoRecipe.from_args(args), control=args.control,
                    tocom=args.tocom, tome_tocom=args.tome_tocom, tocom_keep=args.tocom_keep, tome_rs=args.tome_rs,
                    epochs_scale=args.epochs_scale, limit_train=args.limit_train, limit_eval=args.limit_eval)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = spec_from_args(args)
    check_spec(spec)
    out = prepare_output(args.out)
    plot = args.plot or out / PLOT_NAME
    prepare_output(plot.parent)
    cells = plan_cells(spec)
    started = time.time()
    run = run_grid(cells, out, args.jobs, args.threads, args.device)
    results = report.grid_results(spec, cells, run.records, args.interval)
    results.update(seconds=round(time.time() - started, 1), jobs=args.jobs, threads=args.threads,
                   failed=run.failed, not_run=run.not_run, plot=str(plot))
    write_json(out / RESULTS_NAME, results)
    report.write_plot(results, plot)
    print(report.text_table(results), file=sys.stderr)
    say(f"results in {out / RESULTS_NAME}, plot in {plot} ({format_duration(time.time() - started)})")
    if not results["complete"]:
        say(f"{len(cells) - len(run.records)} of {len(cells)} cells did not finish"
            + (f" (failed: {', '.join(sorted(run.failed))})" if run.failed else "")
            + ": rerun the same command to resume")
        return EXIT_UNFINISHED
    return 0
