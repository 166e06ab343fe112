"""`python orchestration/report.py sweep=<name> [root=outputs/sweeps] [tracking_uri=...]` (or `lpt-report`): the
report of a sweep built again from its stage store and its MLflow runs, e.g. after a resume or with another store.
A suite (`ablation=paper`) gets its tables' reports and its claims again; `sweep=<suite>/<ablation>` one table's.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lpt_core.config import ConfigError
from lpt_core.suggest import did_you_mean
from orchestration.plan.record import PLAN_FILE, PlanRecord
from orchestration.reporting.build import build_report
from orchestration.reporting.suite_report import build_suite_report, is_suite
from orchestration.tracking.registry import default_tracking_uri


def _recorded_uri(plan: PlanRecord) -> str | None:
    """The store the sweep tracked to, as plan.json keeps it; None where it is not usable (an earlier version did not
    keep it, or its credentials were redacted: pass tracking_uri= then)."""
    return plan.tracking_uri if plan.tracking_uri and "***" not in plan.tracking_uri else None


USAGE = "usage: python orchestration/report.py sweep=<name> [root=outputs/sweeps] [tracking_uri=...]"
KEYS = ("sweep", "root", "tracking_uri")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    errors = [f"unknown key '{key}'; {did_you_mean(key, KEYS)}" for key in args if key not in KEYS]
    errors += [f"'{a}' is not key=value" for a in argv if "=" not in a]
    if "sweep" not in args:
        errors.append("sweep=<name> is required")
    if errors:
        print(f"error: {'; '.join(errors)}\n{USAGE}", file=sys.stderr)
        return 2
    folder = Path(args.get("root", "outputs/sweeps")) / args["sweep"]
    if not (folder / PLAN_FILE).exists():
        print(f"error: no sweep at {folder} ({PLAN_FILE} missing)", file=sys.stderr)
        return 2
    try:
        plan = PlanRecord.read(folder)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    uri = args.get("tracking_uri") or _recorded_uri(plan) or default_tracking_uri(folder.parent)
    if is_suite(folder):  # a suite: each table's report, then its own with the claims
        report = build_suite_report(folder, uri, log_to_mlflow=False, log=lambda line: None)
    else:
        report = build_report(folder, tracking_uri=uri, log_to_mlflow=False)
    print(report.markdown)
    print("\nfiles: " + ", ".join(str(p) for p in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
