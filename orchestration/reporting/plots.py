"""The report's PNGs: accuracy per row with 95 % interval bars (axis.png), paired differences to the reference row
(compare.png) and, for phase-2 rows, which prompts each class matches (matches.png, Fig. 4).

Conventions in every plot: the reference row is drawn in red and named in its tick label; the phase 1 under the rows
is a dashed line with its interval as a band; keys and legends sit outside the axes, never over the data.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
import numpy as np
from matplotlib.patches import Patch
import pyarrow.parquet as pq

from orchestration.reporting.statistics import KEY_NAMES, MAX_OPTUNA_ROWS, Line, Tables

MAX_HEATMAPS = 6
REFERENCE, ROW, PHASE1 = "tab:red", "tab:blue", "0.35"
SHOTS = (("many", "#4c72b0"), ("medium", "#55a868"), ("few", "#c44e52"))


def tick_label(line: Line, index: int, optuna: bool) -> str:
    label = f"#{index + 1}" if optuna else line.label
    return f"{label}\n(reference)" if line.role == "reference" else label


def error_bars(lines: list[Line], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(points, [2, n] distances to the interval ends); 0 where a line has no interval."""
    points = np.array([ln.point.get(key, math.nan) for ln in lines])
    ends = np.array([[ln.interval[key].low, ln.interval[key].high] if key in ln.interval else [math.nan] * 2
                     for ln in lines]).reshape(len(lines), 2)
    bars = np.nan_to_num(np.abs(ends.T - points), nan=0.0)
    return points, bars


def _phase1_line(axis, line: Line, key: str = "acc") -> None:
    """The shared phase 1 as a dashed line, its interval as a band, named outside the right edge."""
    point = line.point.get(key, math.nan)
    if math.isnan(point):
        return
    axis.axhline(point, color=PHASE1, linestyle="--", linewidth=1.2)
    if key in line.interval and not math.isnan(line.interval[key].low):
        axis.axhspan(line.interval[key].low, line.interval[key].high, color=PHASE1, alpha=0.12, linewidth=0)
    axis.annotate(f"phase 1\n{point:.1f}", xy=(1.0, point), xycoords=("axes fraction", "data"), xytext=(4, 0),
                  textcoords="offset points", va="center", fontsize=8, color=PHASE1)


def _overall_panel(axis, tables: Tables, rows: list[Line], optuna: bool) -> None:
    xs = np.arange(len(rows))
    points, bars = error_bars(rows, "acc")
    colours = [REFERENCE if ln.role == "reference" else ROW for ln in rows]
    for x, y, low, high, colour in zip(xs, points, bars[0], bars[1], colours):
        axis.errorbar(x, y, yerr=[[low], [high]], fmt="o", color=colour, capsize=4, markersize=7)
    own = [tables.row_upstreams.get(ln.label) for ln in rows]
    if any(own):
        present = [i for i, ln in enumerate(own) if ln is not None]
        p_points, p_bars = error_bars([own[i] for i in present], "acc")
        axis.errorbar(xs[present] - 0.25, p_points, yerr=p_bars, fmt="o", mfc="white", color=PHASE1, capsize=3)
        axis.set_title("overall top-1, 95 % intervals (open: the row's own phase 1)", fontsize=10)
    else:
        axis.set_title("overall top-1, 95 % intervals", fontsize=10)
    shared = next((ln for ln in tables.lines if ln.role == "upstream"), None)
    if shared is not None:
        _phase1_line(axis, shared)
    axis.set_xticks(xs, [tick_label(ln, i, optuna) for i, ln in enumerate(rows)])
    axis.set(xlabel="best trials, best first" if optuna else tables.plan.axis, ylabel="top-1 (%)")
    axis.set_xlim(-0.6, len(rows) - 0.4)


def _shot_panel(axis, tables: Tables, rows: list[Line], optuna: bool) -> None:
    width, xs, handles = 0.27, np.arange(len(rows)), []
    for i, (shot, colour) in enumerate(SHOTS):
        points, bars = error_bars(rows, shot)
        shown = ~np.isnan(points)  # a shot group without classes (no many-shot class on a tiny demo) has no bar
        if not shown.any():
            continue
        edges = ["black" if ln.role == "reference" else colour for ln, s in zip(rows, shown) if s]
        axis.bar(xs[shown] + (i - 1) * width, points[shown], width, yerr=bars[:, shown], color=colour,
                 edgecolor=edges, linewidth=1.5, capsize=2)
        handles.append(Patch(color=colour, label=shot))
    axis.set_xticks(xs, [tick_label(ln, i, optuna) for i, ln in enumerate(rows)])
    axis.set(xlabel="best trials, best first" if optuna else tables.plan.axis, ylabel="top-1 (%)")
    axis.set_title("per-shot top-1 (authors' split), 95 % intervals", fontsize=10)
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the data


def _mark_reference_ticks(axis, rows: list[Line]) -> None:
    """Reference tick in red and bold; long labels slanted so neighbours do not run into each other."""
    if max(len(ln.label) for ln in rows) > 8:
        axis.tick_params(axis="x", labelrotation=20)
        for tick in axis.get_xticklabels():
            tick.set_horizontalalignment("right")
    for tick, line in zip(axis.get_xticklabels(), rows):
        if line.role == "reference":
            tick.set_color(REFERENCE)
            tick.set_fontweight("bold")


def plot_axis(path: Path, tables: Tables) -> None:
    optuna = tables.plan.search == "optuna"
    rows = [ln for ln in tables.lines if ln.role != "upstream"][:MAX_OPTUNA_ROWS if optuna else None]
    fig = Figure(figsize=(max(11, 1.3 * len(rows) + 6), 4.6))
    left, right = fig.subplots(1, 2)
    _overall_panel(left, tables, rows, optuna)
    _shot_panel(right, tables, rows, optuna)
    for axis in (left, right):
        _mark_reference_ticks(axis, rows)
    fig.suptitle(f"{tables.plan.name}: {tables.plan.ablation} on {tables.plan.experiment}")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_compare(path: Path, tables: Tables) -> bool:
    """Forest plot of every paired difference; filled = significant after Holm's correction."""
    keys = [k for k in tables.ablation.compare if any(k in ln.delta for ln in tables.lines + tables.steps)]
    compared = [ln for ln in tables.lines + tables.steps if ln.delta]
    if not keys:
        return False
    fig = Figure(figsize=(3.6 * len(keys) + 1.5, 0.45 * len(compared) + 1.8))
    axes = fig.subplots(1, len(keys), sharey=True, squeeze=False)
    ys = np.arange(len(compared))[::-1]
    for axis, key in zip(axes[0], keys):
        for y, line in zip(ys, compared):
            if key not in line.delta:
                continue
            c = line.delta[key]
            i = c.interval
            axis.errorbar(i.estimate, y, xerr=[[i.estimate - i.low], [i.high - i.estimate]], fmt="o", capsize=3,
                          color=ROW, mfc=ROW if c.significant else "white")
        axis.axvline(0, color=REFERENCE, linewidth=1)
        axis.set_xlabel(f"Δ {KEY_NAMES.get(key, key)} (points)")
    axes[0][0].set_yticks(ys, [ln.label for ln in compared])
    axes[0][0].set_ylim(-0.7, len(compared) - 0.3)
    steps = "; a - b: row a minus row b" if tables.steps else ""
    fig.suptitle(f"paired differences to {tables.plan.axis} = {tables.reference.label}{steps}; 95 % intervals, "
                 f"filled = significant after Holm", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _match_grid(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """([C, m] share of each class's test images whose top-k holds prompt j, train counts, shot names), classes
    sorted head to tail and prompts by the first class that uses them most, so a class's prompts stand together."""
    if not (folder / "match.parquet").exists() or not (folder / "per_class.parquet").exists():
        return None
    match = pq.read_table(folder / "match.parquet").to_pandas()
    per_class = pq.read_table(folder / "per_class.parquet").to_pandas().set_index("class_id")
    grid = match.pivot(index="class_id", columns="prompt_id", values="count").fillna(0)
    per_class = per_class.loc[grid.index]
    share = grid.values / np.maximum(per_class["test_count"].values, 1)[:, None]
    order = np.argsort(-per_class["train_count"].values, kind="stable")
    share = share[order]
    owner = np.where(share.max(axis=0) > 0, share.argmax(axis=0), len(share))  # unused prompts go last
    prompts = np.lexsort((-share.max(axis=0), owner))
    return share[:, prompts], per_class["train_count"].values[order], list(per_class["shot_authors"].values[order])


def plot_matches(path: Path, tables: Tables) -> bool:
    panels = []
    for line in tables.lines:
        run = next((r for r in sorted(line.runs, key=lambda r: r.seed) if r.stage != "phase1"), None)
        grid = _match_grid(Path(tables.plan.stage_root) / run.stage_key) if run else None
        if grid is not None:
            panels.append((line, grid))
        if len(panels) == MAX_HEATMAPS:
            break
    if not panels:
        return False
    fig = Figure(figsize=(3.4 * len(panels) + 1.6, 5))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for axis, (line, (share, counts, shots)) in zip(axes[0], panels):
        image = axis.imshow(share, aspect="auto", cmap="magma_r", vmin=0, vmax=1, interpolation="nearest")
        for boundary in [i for i in range(1, len(shots)) if shots[i] != shots[i - 1]]:
            axis.axhline(boundary - 0.5, color="tab:cyan", linewidth=1.2)
        centres = {s: np.mean([i for i, v in enumerate(shots) if v == s]) for s in dict.fromkeys(shots)}
        axis.set_yticks(list(centres.values()), list(centres) if axis is axes[0][0] else [])
        title = f"{tables.plan.axis}={line.label}" + (" (reference)" if line.role == "reference" else "")
        axis.set(title=title, xlabel=f"prompt ({share.shape[1]}, grouped by class)")
        axis.set_xticks([])
    axes[0][0].set_ylabel("classes, most to fewest training images")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85,
                 label="share of the class's test images matching the prompt")
    fig.suptitle("prompt matching per class (first seed; Fig. 4)", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def draw(tables: Tables, out: Path) -> list[Path]:
    """Every plot the sweep supports, written to `out`; returns the files."""
    files = []
    if any(ln.role != "upstream" for ln in tables.lines):
        plot_axis(out / "axis.png", tables)
        files.append(out / "axis.png")
    if tables.reference is not None and plot_compare(out / "compare.png", tables):
        files.append(out / "compare.png")
    if plot_matches(out / "matches.png", tables):
        files.append(out / "matches.png")
    return files
