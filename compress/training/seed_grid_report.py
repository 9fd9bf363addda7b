"""What ``compress.seed_grid`` reports from its finished cells: the arms over seeds, the paired comparisons behind
the docs' claims, the plot and the text table.

An *arm* is one model measured at one degree over the seeds: DynamicViT from one init at one keep ratio, an init
itself (dense, keep 1.0), or a ToCom model at one deploy keep ratio or ToMe r with and without the plugin. A
*comparison* pairs two arms seed by seed (``seed_statistics.compare``): each claim of the docs is one comparison
per degree. Everything here reads the cells' records (plain numbers); nothing trains.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Sequence

from matplotlib.figure import Figure

from compress.plumbing.files import atomic_write
from compress.training import seed_statistics as stats

INIT_LABELS = {"base": "full-image base", "masked": "masked fine-tuned base",
               "finetuned": "unmasked control (base fine-tuned without masking)"}
# (claim, what it says, arm measured, arm it is measured against): a difference is the first arm minus the second.
INIT_CLAIMS = (
    ("masked_vs_base", "masked fine-tuning vs the full-image base", "masked", "base"),
    ("masked_vs_control", "masked fine-tuning vs the unmasked control (the same extra epochs)", "masked", "finetuned"),
    ("control_vs_base", "extra epochs alone: the unmasked control vs the full-image base", "finetuned", "base"),
)
TOCOM_CLAIMS = (
    ("tocom_keep", "ToCom vs no ToCom, DynamicViT at other keep ratios", "tocom_merged", "tocom_without", "keep"),
    ("tocom_tome", "ToCom vs no ToCom, ToMe at r (from r 0)", "tome_merged", "tome_without", "r"),
)
TOCOM_ARMS = {"tocom": ("tocom_without", "tocom_merged", "keep"), "tome_tocom": ("tome_without", "tome_merged", "r")}


def cell_summary(record: dict) -> str:
    """One line for the progress log: a training cell's top-1, a ToCom cell's scale and changes."""
    if "top1" in record:
        return f"top1 {record['top1']:.2f}"
    changes = ", ".join(f"{row['degree']:g}: {row['top1_tocom_merged'] - row['top1_without_tocom']:+.2f}"
                        for row in record["evaluation"])
    return f"scale {record['chosen_scale']:g}, ToCom change {changes}"


def arm_values(records: Sequence[dict]) -> dict[tuple[str, str, float], dict[int, float]]:
    """{(arm, degree name, degree): {seed: top-1}} from the finished cells' records."""
    arms: dict[tuple[str, str, float], dict[int, float]] = {}

    def add(arm: str, degree_name: str, degree: float, seed: int, value: float) -> None:
        arms.setdefault((arm, degree_name, degree), {})[seed] = value

    for record in records:
        kind, seed = record["kind"], record["seed"]
        if kind == "dynamicvit":
            add(f"dynamicvit_{record['init']}", "keep", record["keep"], seed, record["top1"])
        elif kind in INIT_LABELS:
            add(f"dense_{kind}", "keep", 1.0, seed, record["top1"])
        else:
            without, merged, degree_name = TOCOM_ARMS[kind]
            for row in record["evaluation"]:
                add(without, degree_name, row["degree"], seed, row["top1_without_tocom"])
                add(merged, degree_name, row["degree"], seed, row["top1_tocom_merged"])
    return arms


def arm_rows(arms: dict[tuple[str, str, float], dict[int, float]], method: str) -> list[dict]:
    """Each arm's per-seed values and their summary (n, mean, std, interval), in a stable order."""
    return [{"arm": arm, "degree_name": degree_name, "degree": degree, "values": dict(sorted(values.items())),
             **stats.summarise([values[s] for s in sorted(values)], method)}
            for (arm, degree_name, degree), values in sorted(arms.items())]


def comparison_rows(arms: dict[tuple[str, str, float], dict[int, float]], method: str) -> list[dict]:
    """Every claim at every degree both its arms were measured at: the paired differences and their verdict."""
    pairs = []
    for claim, text, measured, reference in INIT_CLAIMS:
        for prefix in ("dense", "dynamicvit"):
            pairs.append((claim, text, f"{prefix}_{measured}", f"{prefix}_{reference}", "keep"))
    pairs += [(claim, text, measured, reference, degree_name)
              for claim, text, measured, reference, degree_name in TOCOM_CLAIMS]
    rows = []
    for claim, text, measured, reference, degree_name in pairs:
        degrees = sorted({d for (arm, name, d) in arms if arm == measured and name == degree_name}
                         & {d for (arm, name, d) in arms if arm == reference and name == degree_name}, reverse=True)
        for degree in degrees:
            comparison = stats.compare(arms[(measured, degree_name, degree)], arms[(reference, degree_name, degree)],
                                       method)
            rows.append({"claim": claim, "text": text, "measured": measured, "reference": reference,
                         "degree_name": degree_name, "degree": degree, **comparison})
    return rows


def grid_results(spec, cells: Sequence, records: dict[str, dict], method: str) -> dict:
    """results.json's content: the grid, every finished cell, the arms and the comparisons."""
    finished = [records[cell.name] for cell in cells if cell.name in records]
    arms = arm_values(finished)
    epochs = {}
    for cell in cells:
        epochs.setdefault(cell.kind, cell.options["epochs"])
    return {
        "complete": len(finished) == len(cells),
        "cells_planned": len(cells), "cells_finished": len(finished),
        "grid": {**{k: v for k, v in asdict(spec).items() if k != "recipe"}, "recipe": asdict(spec.recipe)},
        "epochs": epochs,
        "interval": {"method": method, "confidence": stats.CONFIDENCE,
                     **({"resamples": stats.BOOTSTRAP_RESAMPLES, "seed": stats.BOOTSTRAP_SEED}
                        if method == "bootstrap" else {})},
        "arms": arm_rows(arms, method),
        "comparisons": comparison_rows(arms, method),
        "cells": {record["cell"]: record for record in finished},
    }


# ----------------------------------------------------------------------------- text and plot


def _span_text(row: dict, signed: bool = False) -> str:
    number = "{:+.2f}" if signed else "{:.2f}"
    if row["mean"] is None:
        return "not measured"
    std = "" if row["std"] is None else f" sd {row['std']:.2f}"
    span = "" if row["interval"] is None else " [" + ", ".join(number.format(v) for v in row["interval"]) + "]"
    return number.format(row["mean"]) + std + span


def text_table(results: dict) -> str:
    """The arms and the comparisons, one line each, for the end of the run's log."""
    interval = results["interval"]
    lines = [f"top-1 % on the test split, mean sd [{interval['confidence']:.0%} interval, {interval['method']}] over seeds:"]
    for row in results["arms"]:
        lines.append(f"  {row['arm']:<22} {row['degree_name']} {row['degree']:<5g} n {row['n']}  {_span_text(row)}")
    lines.append("paired differences in points (measured - reference), the same seed on both sides:")
    for row in results["comparisons"]:
        lines.append(f"  {row['claim']:<18} {row['measured']} - {row['reference']} at {row['degree_name']} "
                     f"{row['degree']:g}: n {row['n']}  {_span_text(row, signed=True)}  {row['verdict']}")
    return "\n".join(lines)


def _band(axes, rows: Sequence[dict], label: str, colour: str) -> None:
    """A line of means over the degrees with its intervals as a band (no band where an interval is missing)."""
    rows = sorted(rows, key=lambda row: row["degree"])
    x = [row["degree"] for row in rows]
    axes.plot(x, [row["mean"] for row in rows], marker="o", color=colour, label=label)
    spans = [(row["degree"], *row["interval"]) for row in rows if row["interval"] is not None]
    if spans:
        degrees, low, high = zip(*spans)
        axes.fill_between(degrees, low, high, color=colour, alpha=0.18, linewidth=0)


def _interval_name(results: dict) -> str:
    interval = results["interval"]
    return f"{interval['confidence']:.0%} {'t' if interval['method'] == 't' else 'bootstrap'} interval"


def plot_figure(results: dict) -> Figure:
    """Accuracy against keep ratio, one line per initialisation with its interval as a band (the inits' own dense
    accuracy at keep 1.0 as points with error bars); with ToCom, the change it makes per deploy keep ratio and r."""
    arms, comparisons = results["arms"], results["comparisons"]
    panels = [("keep", None)] + [(claim, text) for claim, text, *_ in TOCOM_CLAIMS
                                 if any(row["claim"] == claim for row in comparisons)]
    figure = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    axes_list = figure.subplots(1, len(panels), squeeze=False)[0]
    # (colour, x offset of the init's own dense point at keep 1.0, so that their error bars do not overlap)
    styles = {"base": ("tab:blue", -0.012), "masked": ("tab:orange", 0.0), "finetuned": ("tab:green", 0.012)}
    seeds = len(results["grid"]["seeds"])
    axes = axes_list[0]
    for init, (colour, offset) in styles.items():
        rows = [row for row in arms if row["arm"] == f"dynamicvit_{init}"]
        if rows:
            _band(axes, rows, f"DynamicViT from the {INIT_LABELS[init]}", colour)
        for row in arms:
            if row["arm"] == f"dense_{init}":
                error = None if row["interval"] is None else [[row["mean"] - row["interval"][0]],
                                                              [row["interval"][1] - row["mean"]]]
                axes.errorbar([1.0 + offset], [row["mean"]], yerr=error, fmt="s", color=colour, capsize=3, markersize=5)
    axes.set_xlabel("keep ratio (squares at 1.0: the init itself, dense)")
    axes.set_ylabel("top-1 % (demo test split)")
    axes.set_title(f"DynamicViT over {seeds} seed(s): mean, {_interval_name(results)}", fontsize=10)
    axes.legend(fontsize=8, loc="best")
    axes.grid(alpha=0.3)
    for axes, (claim, text) in zip(axes_list[1:], panels[1:]):
        rows = [row for row in comparisons if row["claim"] == claim and row["mean"] is not None]
        _band(axes, rows, "ToCom merged - without", "tab:purple")
        axes.axhline(0.0, color="black", linewidth=0.8)
        axes.set_xlabel("deploy keep ratio" if claim == "tocom_keep" else "ToMe r (tokens merged per block)")
        axes.set_ylabel("change in top-1 (points), paired by seed")
        axes.set_title(text, fontsize=10)
        axes.grid(alpha=0.3)
    epochs = ", ".join(f"{kind} {count}" for kind, count in results["epochs"].items())
    figure.suptitle(f"epochs: {epochs} (x{results['grid']['epochs_scale']:g})", fontsize=9)
    return figure


def write_plot(results: dict, path: str | os.PathLike) -> None:
    figure = plot_figure(results)
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
