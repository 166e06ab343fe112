"""A suite's report: each table as the paper lays it out, then a verdict on each claim the paper makes about them.

A suite runs as one sweep whose rows are labelled `<ablation>:<row>` (experiments/suites.py). Its report is
built from per-table sweep folders written beside it (`<suite folder>/<ablation>/`: plan.json, trials.json and
state.json made from the suite's), so that every table gets the report of its ablation run alone (report.md with
both split rules and its paired differences, report.csv, plots; `report.py sweep=<suite>/<ablation>` rebuilds one)
and the suite's report reads their lines. Claims are paired differences between rows of a table, computed with the
replicates the tables draw (a difference a table also shows has the same estimate and interval there; its p-value
differs: a table adjusts over its own comparisons, the suite over all its claims') and Holm-adjusted over the
claims' comparisons of the suite.

Files: <suite folder>/suite.json (the suite and which row was trained for each table row), report/report.md,
report/claims.csv, report/claims.png.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from matplotlib.figure import Figure
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from experiments.ablations import PAPER_EXPERIMENT, get_ablation
from experiments.suites import SUITES, Claim, Suite, split_label
from lpt_core.files import atomic_write_bytes
from lpt_core.uncertainty import holm
from orchestration.plan.record import STATE_FILE, PlanRecord, read_state
from orchestration.plan.trial_specs import split_trial_id, trial_id
from orchestration.reporting.build import PAPER_NAMES, Report, build_report, cell, row_label, write_csv
from orchestration.reporting.sources import Sources, load_predictions, open_store
from orchestration.reporting.statistics import ALPHA, KEY_NAMES, Comparison, Line, Tables, paired_comparison
from orchestration.reporting.workbench import summarise_sweep
from orchestration.tracking.registry import RunRegistry

SUITE_FILE = "suite.json"
HOLDS, NOT_SIGNIFICANT, CONTRADICTED, MISSING = "holds", "not significant", "contradicted", "missing"
VERDICT_COLOURS = {HOLDS: "tab:green", NOT_SIGNIFICANT: "0.5", CONTRADICTED: "tab:red"}


def write_suite_file(folder: Path, suite: str, aliases: dict[str, str]) -> None:
    """suite.json: the suite's name and, for every table row, the row trained for it."""
    atomic_write_bytes(folder / SUITE_FILE, json.dumps({"suite": suite, "aliases": aliases}, indent=1).encode())


def is_suite(folder: Path) -> bool:
    return (folder / SUITE_FILE).is_file()


def _read_suite(folder: Path) -> tuple[Suite, dict[str, str]]:
    saved = json.loads((folder / SUITE_FILE).read_text())
    return SUITES[saved["suite"]], saved["aliases"]


def _seeds_by_row(folder: Path, status: str) -> dict[str, list[int]]:
    """The suite's trials that state.json lists under `status` (failed, stopped): row -> their seeds."""
    found: dict[str, list[int]] = {}
    for ident in read_state(folder).get(status, []):
        row, seed = split_trial_id(ident)
        found.setdefault(row, []).append(seed)
    return found


def write_table_folders(folder: Path) -> dict[str, Path]:
    """Each table's sweep folder, made from the suite's plan.json, trials.json and state.json: the table's rows
    under their own labels, each with the trials of the row trained for it."""
    record = PlanRecord.read(folder)
    suite, aliases = _read_suite(folder)
    path = folder / "trials.json"
    records = json.loads(path.read_text()) if path.exists() else []
    failed_seeds, stopped_seeds = _seeds_by_row(folder, "failed"), _seeds_by_row(folder, "stopped")
    folders = {}
    for table in suite.tables:
        labels = [label for label in aliases if split_label(label)[0] == table.ablation]
        if not labels:
            continue
        ablation = get_ablation(table.ablation)
        rows = [split_label(label)[1] for label in labels]
        sub = folder / table.ablation
        sub.mkdir(exist_ok=True)
        PlanRecord(record.fingerprint, f"{record.name}/{table.ablation}", table.ablation, record.experiment,
                   ablation.axis, rows, record.seeds, "grid", ablation.metric, record.stage_root, None, record.mode,
                   record.tracking_experiment, record.tracking_uri).write(sub)
        trials, failed, stopped = [], [], []
        for label, row in zip(labels, rows):
            kept = aliases[label]
            trials += [{**r, "row": row, "trial_id": trial_id(row, r["seed"])} for r in records if r["row"] == kept]
            failed += [trial_id(row, seed) for seed in failed_seeds.get(kept, [])]
            stopped += [trial_id(row, seed) for seed in stopped_seeds.get(kept, [])]
        complete = not failed and len(trials) == len(rows) * len(record.seeds)
        atomic_write_bytes(sub / "trials.json", json.dumps(trials, indent=1, sort_keys=True).encode())
        atomic_write_bytes(sub / STATE_FILE, json.dumps({"status": "complete" if complete else "incomplete",
                                                          "failed": failed, "stopped": stopped}, indent=1).encode())
        folders[table.ablation] = sub
    return folders


# ------------------------------------------------------------------------------------------------------ claims
@dataclass
class ClaimResult:
    claim: Claim
    pairs: list[tuple[str, str]]  # (a, b): each difference a - b the claim rests on
    comparisons: list[Comparison | None]
    verdict: str = MISSING
    missing: str = ""  # why it could not be tested


def verdict(claim: Claim, comparisons: list[Comparison | None]) -> str:
    """holds / not significant / contradicted from the Holm-adjusted comparisons (see experiments.suites.Claim)."""
    if not comparisons or any(c is None or math.isnan(c.p_holm) for c in comparisons):
        return MISSING
    if any(c.significant and c.interval.estimate < 0 for c in comparisons):
        return CONTRADICTED
    if claim.kind == "within_noise" or all(c.significant and c.interval.estimate > 0 for c in comparisons):
        return HOLDS
    return NOT_SIGNIFICANT


def claim_pairs(claim: Claim, experiment: str, lines: dict[str, Line]) -> list[tuple[str, str]]:
    """The differences a claim rests on, between rows of its table (`lines`: the table's rows by label)."""
    rows = claim.rows_for(experiment)
    if claim.kind == "better":
        return [(rows[0], rows[1])]
    if claim.kind == "increasing":
        return list(zip(rows[1:], rows[:-1]))
    others = [label for label in lines if label != rows[0] and not math.isnan(lines[label].point.get(claim.key,
                                                                                                      math.nan))]
    if claim.kind == "best":
        return [(rows[0], other) for other in others]
    best = max(others, key=lambda label: lines[label].point[claim.key], default=None)
    return [(rows[0], best)] if best is not None else []


def evaluate_claims(suite: Suite, experiment: str, tables: dict[str, Tables], sources: Sources,
                    planned: set[str]) -> list[ClaimResult]:
    """Every claim of the suite (planned: the `<table>:<row>` labels the sweep has), its differences Holm-adjusted
    together; a within-noise claim's own p-value is kept as it is (a test that holds when nothing is significant
    must not get easier with every claim added to the family)."""
    results = []
    predictions: dict = {}
    for claim in suite.claims:
        table = tables.get(claim.table)
        lines = {ln.label: ln for ln in table.lines if ln.role in ("row", "reference")} if table else {}
        wanted = claim.rows_for(experiment)
        outside = [row for row in wanted if suite.label(claim.table, row) not in planned]
        unfinished = [row for row in wanted if row not in lines and row not in outside]
        if outside or unfinished:
            missing = "; ".join(filter(None, (outside and f"not in this sweep: {', '.join(outside)}",
                                              unfinished and f"no finished trial for {', '.join(unfinished)}")))
            results.append(ClaimResult(claim, [], [], missing=missing))
            continue
        pairs = claim_pairs(claim, experiment, lines)
        if not pairs:
            results.append(ClaimResult(claim, [], [], missing=f"no other row of {claim.table} in this sweep"))
            continue
        for label in {label for pair in pairs for label in pair}:
            for run in lines[label].runs:
                if run.stage_key not in predictions:
                    predictions[run.stage_key] = load_predictions(run, sources)
        found = {k: v for k, v in predictions.items() if v is not None}
        comparisons = [paired_comparison(lines[a], lines[b], claim.key, found) for a, b in pairs]
        missing = "" if all(comparisons) else "no per-image predictions, or other seeds or test images"
        results.append(ClaimResult(claim, pairs, comparisons, missing=missing))
    family = [c for r in results if r.claim.kind != "within_noise" for c in r.comparisons if c is not None]
    for comparison, adjusted in zip(family, holm([c.p for c in family])):
        comparison.p_holm = adjusted
    for comparison in (c for r in results if r.claim.kind == "within_noise" for c in r.comparisons if c is not None):
        comparison.p_holm = comparison.p
    for result in results:
        result.verdict = verdict(result.claim, result.comparisons) if not result.missing else MISSING
    return results


# ---------------------------------------------------------------------------------------------------- markdown
def _table_section(title: str, folder_name: str, tables: Tables) -> list[str]:
    """The table in the paper's layout: its rows, overall / many / medium / few under the authors' split (and the
    query's K-NN accuracy where the table compares it), the paper's number beside ours on the paper's data."""
    plan, ablation = tables.plan, tables.ablation
    paper = PAPER_NAMES.get(plan.experiment) if plan.experiment == PAPER_EXPERIMENT else None
    keys = ("acc", "many", "medium", "few", *(k for k in ablation.compare if k == "query_knn_acc"))
    head = ["overall", "many", "medium", "few", *(KEY_NAMES[k] for k in keys[4:])]
    head += [f"paper, {paper} (overall)"] if paper else []
    out = ["", f"### {title}", "", f"| {plan.axis} | stage | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 2)]
    for line in tables.lines:
        cells = [cell(line, k) for k in keys] + ([str(ablation.paper.get(line.label, ""))] if paper else [])
        out.append(f"| {row_label(line)} | {line.stage} | " + " | ".join(cells) + " |")
    out += [f"- {note}" for note in tables.notes[1:]]
    out += ["", f"Its full report (both split rules, paired differences to its reference row, plots): "
                f"`{folder_name}/report/report.md`."]
    return out


def _difference(pair: tuple[str, str], comparison: Comparison | None) -> str:
    if comparison is None:
        return f"{pair[0]} - {pair[1]}: -"
    i = comparison.interval
    return f"{pair[0]} - {pair[1]}: {i.estimate:+.1f} [{i.low:+.1f}, {i.high:+.1f}]"


def _claims_section(results: list[ClaimResult], seeds: int) -> list[str]:
    out = ["", "## Claims", "", "| claim | paper | on | difference, 95 % interval | p (Holm) | verdict |",
           "|---|---|---|---|---|---|"]
    for r in results:
        if r.missing:
            out.append(f"| {r.claim.text} | {r.claim.source} | {KEY_NAMES.get(r.claim.key, r.claim.key)} | "
                       f"{r.missing} | - | {r.verdict} |")
            continue
        differences = "<br>".join(_difference(p, c) for p, c in zip(r.pairs, r.comparisons))
        p_values = "<br>".join(f"{c.p_holm:.3g}" if c else "-" for c in r.comparisons)
        out.append(f"| {r.claim.text} | {r.claim.source} | {KEY_NAMES.get(r.claim.key, r.claim.key)} | "
                   f"{differences} | {p_values} | **{r.verdict}** |")
    count = sum(1 for r in results if r.claim.kind != "within_noise" for c in r.comparisons if c is not None)
    out += ["", f"Difference = row a - row b in points of the table's accuracy, 95 % paired bootstrap interval (where "
                f"a table's report shows the same difference, the same estimate and interval). p = Holm-adjusted over "
                f"the {count} comparisons of the suite's claims (family-wise α = {ALPHA}); a `within noise` claim "
                f"keeps its own p. A claim holds when each of its differences is significant in the claimed "
                f"direction, is contradicted when one is significant against it, and is not significant otherwise; "
                f"`within noise` holds unless the row is significantly below the best other row."]
    if seeds == 1:
        out.append("With one seed the intervals cover the test set's sampling only, not the spread between training "
                   "runs: `seeds=[0,1,2]` puts the seeds into every interval and difference.")
    return out


def suite_markdown(record: PlanRecord, suite: Suite, reports: dict[str, Report], results: list[ClaimResult],
                   notes: list[str]) -> str:
    seeds = len(record.seeds)
    out = [f"## {record.name}: suite `{suite.name}` on `{record.experiment}` ({seeds} seed(s); top-1 %, 95 % "
           f"intervals, authors' split)", ""]
    out += [f"- {note}" for note in notes]
    for table in suite.tables:
        report = reports.get(table.ablation)
        if report is None or report.tables is None:
            out += ["", f"### {table.title}", "", "No row of this table is in the sweep."]
        else:
            out += _table_section(table.title, table.ablation, report.tables)
    return "\n".join(out + _claims_section(results, seeds))


def _claims_rows(results: list[ClaimResult]) -> list[dict]:
    rows = []
    for r in results:
        for pair, c in zip(r.pairs or [("", "")], r.comparisons or [None]):
            rows.append({"claim": r.claim.text, "source": r.claim.source, "table": r.claim.table, "key": r.claim.key,
                         "kind": r.claim.kind, "a": pair[0], "b": pair[1],
                         "difference": c.interval.estimate if c else math.nan, "low": c.interval.low if c else math.nan,
                         "high": c.interval.high if c else math.nan, "p": c.p if c else math.nan,
                         "p_holm": c.p_holm if c else math.nan, "verdict": r.verdict, "missing": r.missing})
    return rows


def _agreement(claim: Claim, comparison: Comparison) -> str:
    """What one difference says of its claim, as its verdict would if the claim rested on it alone."""
    return verdict(claim, [comparison])


def _claims_plot(results: list[ClaimResult], path: Path) -> Path:
    """Every difference a claim rests on with its interval, coloured by what it says of the claim (a claim of
    several differences holds only if each is green: its verdict is in the table), the 0 line marked."""
    items = [(f"{r.claim.text}\n{a} - {b} ({KEY_NAMES.get(r.claim.key, r.claim.key)})", c, _agreement(r.claim, c))
             for r in results for (a, b), c in zip(r.pairs, r.comparisons) if c is not None]
    figure = Figure(figsize=(9, 0.55 * max(1, len(items)) + 1.2))
    axis = figure.add_subplot()
    for y, (_, c, says) in enumerate(reversed(items)):
        i = c.interval
        axis.errorbar(i.estimate, y, xerr=[[i.estimate - i.low], [i.high - i.estimate]], fmt="o", capsize=3,
                      color=VERDICT_COLOURS.get(says, "0.5"))
    axis.axvline(0, color="0.3", linewidth=1, linestyle="--")
    axis.set_yticks(range(len(items)), [label for label, _, _ in reversed(items)], fontsize=7)
    axis.set_xlabel("paired difference, points (95 % interval)")
    axis.set_title("Each difference a claim rests on, Holm-adjusted over the suite\n"
                   "green: supports the claim, grey: not significant, red: against it", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    return path


def _missing_notes(folder: Path, suite: Suite, aliases: dict[str, str]) -> list[str]:
    state, failed_rows = read_state(folder), _seeds_by_row(folder, "failed")
    notes = []
    for table in suite.tables:
        failed = [split_label(label)[1] for label in aliases
                  if split_label(label)[0] == table.ablation and aliases[label] in failed_rows]
        if failed:
            notes.append(f"{table.ablation}: rows {', '.join(failed)} failed (resume=true runs them again); the "
                         f"table and its claims lack them")
    if state.get("status") != "complete" and not notes:
        notes.append(f"the suite is {state.get('status', 'not started')}: resume=true finishes it")
    return notes


def build_suite_report(folder: str | Path, tracking_uri: str | None = None, parent_run_id: str | None = None,
                       log_to_mlflow: bool = True, log: Callable[[str], None] = print,
                       store: str | None = None) -> Report:
    """Every table's report in its folder, then the suite's (report/report.md, claims.csv, claims.png). With
    log_to_mlflow, each table's report goes to a run of its own under the suite's parent run."""
    folder = Path(folder)
    record = PlanRecord.read(folder)
    suite, aliases = _read_suite(folder)
    registry = RunRegistry(tracking_uri, record.tracking_experiment) if log_to_mlflow and tracking_uri and \
        parent_run_id else None
    reports = {}
    for ablation, sub in write_table_folders(folder).items():
        table_record = PlanRecord.read(sub)
        run_id = None
        if registry is not None:
            run_id = registry.parent_run(table_record.name, {MLFLOW_PARENT_RUN_ID: parent_run_id,
                                                             "lpt.ablation": ablation, "lpt.suite": record.name})
            registry.log_params(run_id, table_record.parent_params())
        reports[ablation] = build_report(sub, tracking_uri=tracking_uri, parent_run_id=run_id,
                                         log_to_mlflow=registry is not None, store=store)
        if registry is not None:
            summarise_sweep(registry, run_id, table_record, reports[ablation])
            registry.finish(run_id, failed=None if read_state(sub).get("status") == "complete"
                            else "rows of this table failed or are missing")
        log(f"{suite.name}: table {ablation} reported in {sub / 'report'}")
    client, note = open_store(tracking_uri, record.tracking_experiment, 5.0, store)
    tables = {name: report.tables for name, report in reports.items() if report.tables is not None}
    results = evaluate_claims(suite, record.experiment, tables, Sources(Path(record.stage_root), client, note),
                              set(aliases))
    text = suite_markdown(record, suite, reports, results, [note, *_missing_notes(folder, suite, aliases)])
    out = folder / "report"
    out.mkdir(exist_ok=True)
    rows = _claims_rows(results)
    files = [out / "report.md", out / "claims.csv"]
    files[0].write_text(text + "\n")
    write_csv(files[1], rows)
    files.append(_claims_plot(results, out / "claims.png"))
    if registry is not None:
        registry.log_artifacts(parent_run_id, [out], "report")
    return Report(text, rows, files)
