"""Paper-style tables and plots of a sweep: `python orchestration/report.py sweep=<name> [root=outputs/sweeps]`.

Rows are the ablation's axis values (or Optuna's trials, best first); columns overall / many / medium / few under
the authors' split rule, then the same under the standard rule; mean +- std over seeds. Metrics are read from the
trials' MLflow runs (falling back to trials.json when the tracking store is not reachable).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # Hydra sets INFO; matplotlib's INFO is noise
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from experiments.ablations import get_ablation  # noqa: E402
from orchestration.tracking import Tracker, default_tracking_uri  # noqa: E402

RULES = {"authors": ("acc", "many", "medium", "few"), "standard": ("acc", "many_std", "medium_std", "few_std")}
MAX_HEATMAPS = 6


@dataclass
class Report:
    markdown: str
    rows: list[dict]
    files: list[Path] = field(default_factory=list)


def _trial_metrics(records: list[dict], tracking_uri: str | None) -> list[dict]:
    if tracking_uri is None:
        return records
    try:
        client = Tracker(tracking_uri, "lpt", outage_wait_s=5).client
    except Exception:  # an unreachable server must not lose the report: trials.json has the same numbers
        return records
    out = []
    for record in records:
        try:
            metrics = dict(client.get_run(record["run_id"]).data.metrics)
        except Exception:
            metrics = {}
        out.append({**record, "metrics": {**record["metrics"], **metrics}})
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(plan: dict, records: list[dict]) -> list[dict]:
    """One row per axis value (grid, in the ablation's order) or per trial (Optuna, best first)."""
    if plan["search"] == "optuna":
        groups = {r["row"]: [r] for r in records}
        order = sorted(groups, key=lambda k: -groups[k][0]["metrics"].get(plan["metric"], float("-inf")))
    else:
        groups = {row: [r for r in records if r["row"] == row] for row in plan["rows"]}
        order = [row for row in plan["rows"] if groups[row]]
    rows = []
    for label in order:
        trials = groups[label]
        row = {"row": label, "n": len(trials), "stage": trials[0]["stage"]}
        for key in {k for rule in RULES.values() for k in rule} | {"query_knn_acc", "match_consistency"}:
            row[key], row[f"{key}_sd"] = _mean_std([t["metrics"].get(key, float("nan")) for t in trials])
        rows.append(row)
    return rows


def _cell(row: dict, key: str) -> str:
    mean, sd = row[key], row[f"{key}_sd"]
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if row["n"] == 1 else f"{mean:.2f} ± {sd:.2f}"


def markdown_tables(plan: dict, rows: list[dict], paper: dict[str, float]) -> str:
    lines = [f"## {plan['name']}: ablation `{plan['ablation']}` on `{plan['experiment']}` "
             f"({len(plan['seeds'])} seed(s); top-1 %, mean ± std over seeds)"]
    for rule, keys in RULES.items():
        title = "authors' split (many > 100, 20 < medium <= 100, few <= 20)" if rule == "authors" else \
            "standard split (many > 100, 20 <= medium <= 100, few < 20)"
        lines += ["", f"### {title}", "",
                  f"| {plan['axis']} | stage | overall | many | medium | few | paper |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows:
            cells = " | ".join(_cell(row, k) for k in keys)
            lines.append(f"| {row['row']} | {row['stage']} | {cells} | {paper.get(row['row'], '')} |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = ["row", "n", "stage"] + sorted(k for k in rows[0] if k not in ("row", "n", "stage")) if rows else []
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _plot_axis(path: Path, plan: dict, rows: list[dict]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [str(r["row"]) for r in rows]
    left.errorbar(labels, [r["acc"] for r in rows], yerr=[r["acc_sd"] for r in rows], marker="o", capsize=3)
    left.set(xlabel=plan["axis"], ylabel="overall top-1 (%)", title=f"{plan['ablation']}: overall accuracy")
    width = 0.27
    for i, shot in enumerate(("many", "medium", "few")):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        right.bar(xs, [r[shot] for r in rows], width, yerr=[r[f"{shot}_sd"] for r in rows], label=shot, capsize=2)
    right.set_xticks(range(len(rows)), labels)
    right.set(xlabel=plan["axis"], ylabel="top-1 (%)", title="per-shot accuracy (authors' split)")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_matches(path: Path, plan: dict, records: list[dict]) -> bool:
    """Per-class share of samples choosing each prompt (Fig. 4), one panel per phase-2 row (first seed)."""
    panels = []
    for row in plan["rows"] if plan["search"] == "grid" else sorted({r["row"] for r in records}):
        trial = next((r for r in records if r["row"] == row and r["stage"] != "phase1"), None)
        match_file = Path(plan["stage_root"]) / trial["stage_key"] / "match.parquet" if trial else None
        if match_file is not None and match_file.exists():
            panels.append((row, pq.read_table(match_file).to_pandas()))
    if not panels:
        return False
    panels = panels[:MAX_HEATMAPS]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for axis, (row, table) in zip(axes[0], panels):
        grid = table.pivot(index="class_id", columns="prompt_id", values="count").fillna(0)
        grid = grid.div(grid.sum(axis=1).clip(lower=1), axis=0)
        image = axis.imshow(grid.values, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        axis.set(title=f"{plan['axis']}={row}", xlabel="prompt", ylabel="class")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of the class's top-k picks")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_report(folder: str | Path, tracking_uri: str | None = None, parent_run_id: str | None = None,
                 log_to_mlflow: bool = True) -> Report:
    folder = Path(folder)
    plan = json.loads((folder / "plan.json").read_text())
    records = json.loads((folder / "trials.json").read_text()) if (folder / "trials.json").exists() else []
    records = _trial_metrics(records, tracking_uri)
    rows = aggregate(plan, records)
    markdown = markdown_tables(plan, rows, get_ablation(plan["ablation"]).paper)
    out = folder / "report"
    out.mkdir(exist_ok=True)
    files = [out / "report.md", out / "report.csv"]
    files[0].write_text(markdown + "\n")
    _write_csv(files[1], rows)
    if rows:
        _plot_axis(out / "axis.png", plan, rows)
        files.append(out / "axis.png")
    if _plot_matches(out / "matches.png", plan, records):
        files.append(out / "matches.png")
    if log_to_mlflow and tracking_uri and parent_run_id:
        Tracker(tracking_uri, "lpt").log_artifacts(parent_run_id, [out], "report")
    return Report(markdown, rows, files)


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(args) - {"sweep", "root", "tracking_uri"}
    if "sweep" not in args or unknown:
        print("usage: python orchestration/report.py sweep=<name> [root=outputs/sweeps] [tracking_uri=...]"
              + (f"; unknown keys: {sorted(unknown)}" if unknown else ""), file=sys.stderr)
        return 2
    folder = Path(args.get("root", "outputs/sweeps")) / args["sweep"]
    if not (folder / "plan.json").exists():
        print(f"error: no sweep at {folder} (plan.json missing)", file=sys.stderr)
        return 2
    uri = args.get("tracking_uri") or default_tracking_uri(folder)
    report = build_report(folder, tracking_uri=uri, log_to_mlflow=False)
    print(report.markdown)
    print("\nfiles: " + ", ".join(str(p) for p in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
