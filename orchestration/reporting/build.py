"""Paper-style tables and plots of a sweep (`python orchestration/report.py sweep=<name>` builds them again).

Rows are the ablation's axis values (or Optuna's trials, best first); columns overall / many / medium / few under
the authors' split rule, then under the standard rule. Every accuracy carries a 95 % interval from the stored
per-image predictions (test images resampled within class, and seeds where there are several), and every row is
compared with the ablation's reference row by a paired difference, Holm-corrected across the table. Point
estimates are the numbers MLflow holds for the trials' runs (trials.json when the tracking store is unreachable).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from experiments.ablations import PAPER_EXPERIMENT, Ablation
from experiments.suites import find_ablation
from lpt_core.uncertainty import REPLICATES
from orchestration.reporting import optuna_study, plots
from orchestration.reporting.sources import Run, Sources, load_predictions, load_runs, open_store, upstream_runs
from orchestration.reporting.statistics import KEY_NAMES, MAX_OPTUNA_ROWS, POINT_KEYS, RULE_KEYS, Line, Tables, \
    comparison_count, set_intervals, set_points
from orchestration.plan.record import PlanRecord, read_state
from orchestration.tracking.registry import RunRegistry
from orchestration.tracking.study import load_sweep_study

RULE_TITLES = {"authors": "authors' split (many > 100, 20 < medium <= 100, few <= 20)",
               "standard": "standard split (many > 100, 20 <= medium <= 100, few < 20)"}
PAPER_NAMES = {"places_lt": "Places-LT"}


@dataclass
class Report:
    markdown: str
    rows: list[dict]
    files: list[Path] = field(default_factory=list)
    tables: Tables | None = None  # what the markdown shows (a suite's report reads its tables' lines)


def _grid_lines(plan: PlanRecord, ablation: Ablation, runs: list[Run]) -> list[Line]:
    """Grid: one line per row with trials, in the ablation's order. Optuna: one per trial, best first."""
    if plan.search == "optuna":
        sign = -1 if plan.mode == "max" else 1
        lines = [Line(r.row, r.stage, [r]) for r in runs]
        return sorted(lines, key=lambda ln: sign * ln.runs[0].metrics.get(plan.metric, sign * math.inf))
    reference = ablation.reference_for(plan.experiment)
    lines = [Line(row, "", [r for r in runs if r.row == row]) for row in plan.rows]
    lines = [ln for ln in lines if ln.runs]
    for line in lines:
        line.stage = line.runs[0].stage
        line.role = "reference" if line.label == reference else "row"
    return lines


def _upstream_lines(lines: list[Line], runs: dict[str, Run]) -> tuple[Line | None, dict[str, Line]]:
    """The phase 1 shared by every phase-2 row (a line of the table), or each row's own phase 1 (plot markers)."""
    phase2 = [ln for ln in lines if ln.stage == "phase2"]
    keys = {ln.label: sorted(r.upstream for r in ln.runs if r.upstream in runs) for ln in phase2}
    if not phase2 or any(len(k) != len(ln.runs) for ln, k in zip(phase2, keys.values())):
        return None, {}
    own_keys = {r.stage_key for ln in lines for r in ln.runs}
    if len({tuple(k) for k in keys.values()}) == 1:
        shared = keys[phase2[0].label]
        if own_keys & set(shared):  # the phase 1 is a row of this table already (per_phase)
            return None, {}
        return Line("phase 1 (shared upstream)", "phase1", [runs[k] for k in shared], role="upstream"), {}
    return None, {label: Line(f"phase 1 of {label}", "phase1", [runs[k] for k in ks]) for label, ks in keys.items()}


def collect(folder: Path, sources: Sources, replicates: int = REPLICATES) -> Tables:
    """Every line of the report with its points, intervals and paired differences, and notes on what is missing."""
    plan = PlanRecord.read(folder)
    ablation = find_ablation(plan.ablation)
    runs = load_runs(folder, sources)
    lines = _grid_lines(plan, ablation, runs)
    shared, row_upstreams = _upstream_lines(lines, upstream_runs(runs, sources))
    lines += [shared] if shared else []
    reference = next((ln for ln in lines if ln.role == "reference"), None)
    extra = list(row_upstreams.values())
    set_points(lines + extra)
    tables = {r.stage_key: t for ln in lines + extra for r in ln.runs
              if (t := load_predictions(r, sources)) is not None}
    notes, steps = set_intervals(lines, tables, reference, ablation.compare, replicates, ablation.steps)
    set_intervals(extra, tables, None, (), replicates)
    elsewhere = [f"{ln.label} (run {r.run_id})" for ln in lines for r in ln.runs if not r.in_tracking]
    if sources.client is not None and elsewhere:
        notes.insert(0, f"runs not in this tracking store (cached stages, tracked in the store of the sweep that "
                        f"trained them), numbers from trials.json / the stage store: {', '.join(elsewhere)}")
    return Tables(plan, ablation, lines, reference, row_upstreams,
                  [sources.note, *_unfinished(folder, plan, lines), *notes], steps)


def _unfinished(folder: Path, plan: PlanRecord, lines: list[Line]) -> list[str]:
    """What the table lacks, said where it is: rows or seeds without a finished trial (a row's cells are over the
    seeds it has), and why (state.json: failed, or stopped early by scheduler=asha)."""
    state = read_state(folder)
    notes = []
    if plan.search == "grid":
        finished = {ln.label: ln.seeds for ln in lines}
        for row in plan.rows:
            seeds = finished.get(row, ())
            if not seeds:
                notes.append(f"{row}: no finished trial, not in the table")
            elif len(seeds) < len(plan.seeds):
                notes.append(f"{row}: {len(seeds)} of {len(plan.seeds)} seeds finished ({', '.join(map(str, seeds))}); "
                             f"its cells are over those")
    if state.get("stopped"):
        notes.append(f"stopped early by scheduler=asha, not in the table: {', '.join(state['stopped'])}")
    if state.get("failed"):
        notes.append(f"failed (resume=true runs them again): {', '.join(state['failed'])}")
    return notes


# ---------------------------------------------------------------------------------------------------- markdown
def cell(line: Line, key: str) -> str:
    point = line.point.get(key, math.nan)
    if math.isnan(point):
        return "-"
    interval = line.interval.get(key)
    if interval is None or math.isnan(interval.low):
        return f"{point:.1f}"
    return f"{point:.1f} ± {interval.half_width:.1f}"


def _delta_cell(line: Line, key: str) -> str:
    comparison = line.delta.get(key)
    if comparison is None:
        return "-"
    i = comparison.interval
    return f"{i.estimate:+.1f} [{i.low:+.1f}, {i.high:+.1f}]" + (" *" if comparison.significant else "")


def row_label(line: Line) -> str:
    return f"**{line.label}** (reference)" if line.role == "reference" else line.label


def _method(plan: PlanRecord) -> str:
    seeds = len(plan.seeds) if plan.search == "grid" else 1
    if seeds == 1:
        how = "a stratified bootstrap over the test images, resampled within their class"
        point = "the value the store holds"
    else:
        how = (f"a two-level bootstrap: the {seeds} seeds resampled with replacement and the test images within "
               f"their class, the same images for every seed,")
        point = f"the mean over the {seeds} seeds of the values the store holds"
    return f"± = half-width of the 95 % percentile interval of {how} with {REPLICATES} replicates; point = {point}."


def _main_tables(tables: Tables, lines: list[Line]) -> list[str]:
    plan, ablation = tables.plan, tables.ablation
    paper = PAPER_NAMES.get(plan.experiment) if plan.experiment == PAPER_EXPERIMENT else None
    extra = [k for k in ablation.compare if k not in RULE_KEYS]
    out = []
    for rule, keys in (("authors", RULE_KEYS[:4]), ("standard", ("acc", *RULE_KEYS[4:]))):
        columns = keys + tuple(extra if rule == "authors" else ())
        head = ["overall", "many", "medium", "few"] + [KEY_NAMES[k] for k in columns[4:]]
        head += [f"paper, {paper}"] if paper and rule == "authors" else []
        out += ["", f"### {RULE_TITLES[rule]}", "", f"| {plan.axis} | stage | " + " | ".join(head) + " |",
                "|" + "---|" * (len(head) + 2)]
        for line in lines:
            cells = [cell(line, k) for k in columns]
            cells += [str(ablation.paper.get(line.label, ""))] if paper and rule == "authors" else []
            out.append(f"| {row_label(line)} | {line.stage} | " + " | ".join(cells) + " |")
        out += ["", _method(plan)]
    return out


def _comparison_table(tables: Tables) -> list[str]:
    plan, reference = tables.plan, tables.reference
    if plan.search == "optuna":
        return ["", "Optuna trials have no reference row (a search has no grid default), so no paired comparison "
                    "is made; the parameter importances below say which knob matters."]
    if reference is None:
        wanted = tables.ablation.reference_for(plan.experiment)
        return ["", f"The reference row {plan.axis} = {wanted} is not in this sweep (ablation.values, or its "
                    f"trials failed): no paired comparison."]
    keys = tables.ablation.compare
    title = f"paired differences to the reference row {plan.axis} = {reference.label}"
    out = ["", f"### {title}" + (", and between steps" if tables.steps else ""), "",
           f"| {plan.axis} | " + " | ".join(f"Δ {KEY_NAMES[k]}" for k in keys) + " |",
           "|" + "---|" * (len(keys) + 1)]
    for line in tables.lines + tables.steps:
        if line is not reference:
            out.append(f"| {row_label(line)} | " + " | ".join(_delta_cell(line, k) for k in keys) + " |")
    steps = " (a step `a - b`: row a minus row b)" if tables.steps else ""
    out += ["", f"Δ = row - reference in points{steps}, 95 % paired bootstrap interval (the same resampled test "
                f"images and seeds for both rows); * = the difference is significant after Holm's correction over the "
                f"{comparison_count(tables.lines + tables.steps)} comparisons of this table (family-wise α = 0.05)."]
    return out


def markdown(tables: Tables, optuna_lines: list[str]) -> str:
    plan = tables.plan
    seeds = len(plan.seeds) if plan.search == "grid" else 1
    lines = tables.lines
    if plan.search == "optuna" and len(lines) > MAX_OPTUNA_ROWS:
        lines = lines[:MAX_OPTUNA_ROWS] + [ln for ln in lines if ln.role == "upstream"]
    out = [f"## {plan.name}: ablation `{plan.ablation}` on `{plan.experiment}` "
           f"({seeds} seed(s); top-1 %, 95 % intervals)", ""]
    out += [f"- {note}" for note in tables.notes]
    if len(lines) < len(tables.lines):
        out.append(f"- the best {MAX_OPTUNA_ROWS} of {len(tables.lines)} trials by {plan.metric}; report.csv "
                   f"has them all")
    return "\n".join(out + _main_tables(tables, lines) + _comparison_table(tables) + optuna_lines)


# --------------------------------------------------------------------------------------------------------- csv
def csv_rows(tables: Tables) -> list[dict]:
    """One dict per table line: point estimates (MLflow's), interval ends, paired differences, run ids."""
    rows = []
    for line in tables.lines + tables.steps:
        row = {"row": line.label, "stage": line.stage, "role": line.role, "n": len(line.runs),
               "run_ids": ";".join(str(r.run_id) for r in line.runs)}
        if tables.plan.search == "optuna":
            row.update(line.runs[0].config)
        for key in POINT_KEYS:
            row[key] = line.point.get(key, math.nan)
            if key in line.interval:
                row[f"{key}_lo"], row[f"{key}_hi"] = line.interval[key].low, line.interval[key].high
        for key, comparison in line.delta.items():
            i = comparison.interval
            row.update({f"d_{key}": i.estimate, f"d_{key}_lo": i.low, f"d_{key}_hi": i.high,
                        f"d_{key}_p": comparison.p, f"d_{key}_p_holm": comparison.p_holm})
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def build_report(folder: str | Path, tracking_uri: str | None = None, parent_run_id: str | None = None,
                 log_to_mlflow: bool = True, outage_wait_s: float = 5.0, store: str | None = None) -> Report:
    """store: what the report calls the tracking store (sources.open_store), when tracking_uri is only the way in."""
    folder = Path(folder)
    plan = PlanRecord.read(folder)
    client, note = open_store(tracking_uri, plan.tracking_experiment, outage_wait_s, store)
    tables = collect(folder, Sources(Path(plan.stage_root), client, note))
    out = folder / "report"
    out.mkdir(exist_ok=True)
    optuna_md, optuna_files = (optuna_study.section(tables, out, load_sweep_study(folder, plan.name))
                               if plan.search == "optuna" else ([], []))
    text = markdown(tables, optuna_md)
    rows = csv_rows(tables)
    files = [out / "report.md", out / "report.csv"]
    files[0].write_text(text + "\n")
    write_csv(files[1], rows)
    files += plots.draw(tables, out) + optuna_files
    if log_to_mlflow and tracking_uri and parent_run_id:
        RunRegistry(tracking_uri, plan.tracking_experiment).log_artifacts(parent_run_id, [out], "report")
    return Report(text, rows, files, tables)
