"""`ablation=paper` end to end on the tiny demo: one sweep for the paper's seven tables, every distinct stage trained
once, each table's report as its ablation's own, a claims table whose differences are the tables' own, one MLflow
parent run with a run per table below it; a failed table row that does not stop the others; a suite killed in the
middle and resumed."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from experiments.ablations import get_ablation
from experiments.compose import compose_config
from experiments.suites import SUITES
from orchestration.execute.driver import run_sweep
from orchestration.plan.sweep_plan import build_plan
from orchestration.report import main as report_main

from .conftest import ONE_SLOT, kill_driver_when, mlflow_runs, stage_runs, steps, wait_for_event
from .report_checks import check_ablation_report

pytestmark = pytest.mark.slow

SUITE = "paper-demo"
VERDICTS = {"holds", "not significant", "contradicted"}


def _csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _table_difference(folder: Path, table: str, a: str, b: str, key: str) -> tuple[float, float, float]:
    """a - b on `key` as the table's own report has it: a step row `a - b`, or a row against the reference."""
    rows = {r["row"]: r for r in _csv(folder / table / "report" / "report.csv")}
    reference = next(r["row"] for r in rows.values() if r["role"] == "reference")
    if f"{a} - {b}" in rows:
        r = rows[f"{a} - {b}"]
        return float(r[f"d_{key}"]), float(r[f"d_{key}_lo"]), float(r[f"d_{key}_hi"])
    if b == reference:
        r = rows[a]
        return float(r[f"d_{key}"]), float(r[f"d_{key}_lo"]), float(r[f"d_{key}_hi"])
    assert a == reference, (table, a, b)
    r = rows[b]
    return -float(r[f"d_{key}"]), -float(r[f"d_{key}_hi"]), -float(r[f"d_{key}_lo"])


def _stage_keys_trained_once(root: Path, overrides: list[str]) -> int:
    """Every distinct stage of the plan has exactly one MLflow stage run in the suite, each epoch logged once."""
    plan = build_plan(compose_config(overrides))
    keys = {spec.key for trial in plan.trials.values() for spec in trial.chain}
    client, runs = mlflow_runs(root / "sweeps", SUITE)
    trained = Counter(r.data.tags["lpt.stage_key"] for r in runs if r.data.tags.get("lpt.role") == "stage")
    assert set(trained) == keys and set(trained.values()) == {1}, trained
    for run in runs:
        if run.data.tags.get("lpt.role") == "stage":
            epochs = plan.base.stage_config(run.data.tags["lpt.stage"]).epochs
            assert steps(client, run) == list(range(epochs)), run.info.run_name
    return len(keys)


def test_the_paper_suite_end_to_end(ray_session, sweep_overrides, tmp_path):
    overrides = sweep_overrides("ablation=paper", ONE_SLOT)
    lines: list[str] = []
    assert run_sweep(compose_config(overrides), log=lines.append) == 0
    text = "\n".join(lines)
    folder = tmp_path / "sweeps" / SUITE

    # the plan before training: tables, merged rows, distinct stages against the separate sweeps, an estimate
    assert "plan: suite 'paper' on demo, seeds [0]: 7 tables, 24 rows, 19 distinct" in text
    assert "Tab. 8: the contribution of each phase (per_phase): 5 rows; trained as another table's row: " \
           "vpt_ce_instance = vpt_sampling:vpt_instance, full_lpt = group_size:20" in text
    assert "stages: 22 distinct (10 phase1, 11 phase2, 1 joint), against 31 if each table ran as its own sweep" in text
    assert "compute: about " in text and "estimate: about " in text
    assert _stage_keys_trained_once(tmp_path, overrides) == 22

    # every table is its ablation's report, in its own sweep folder
    suite = SUITES["paper"]
    for table in suite.tables:
        check_ablation_report(table.ablation, folder / table.ablation)
    markdown = (folder / "report" / "report.md").read_text()
    for table in suite.tables:
        assert f"### {table.title}" in markdown
    assert "| **micro_m** (reference) | phase2 |" in markdown  # Tab. 7's reference is the suite's reference row

    # the claims: one line per difference, each the table's own difference, a verdict for each claim
    claims = _csv(folder / "report" / "claims.csv")
    assert [c["claim"] for c in claims if c["a"]] and {c["claim"] for c in claims} == {c.text for c in suite.claims}
    for claim in claims:
        assert claim["verdict"] in VERDICTS and not claim["missing"], claim
        expected = _table_difference(folder, claim["table"], claim["a"], claim["b"], claim["key"])
        assert (float(claim["difference"]), float(claim["low"]), float(claim["high"])) == pytest.approx(expected), \
            claim
    counted = int(markdown.split("Holm-adjusted over the ")[1].split(" ")[0])
    assert len(claims) == 16  # 11 single differences, Tab. 7's 2, Fig. 4's 3
    assert counted == 15  # the within-noise claim keeps its own p-value
    assert (folder / "report" / "claims.png").stat().st_size > 10_000

    # MLflow: the suite's parent run, a run per table below it with the table's report
    client, runs = mlflow_runs(tmp_path / "sweeps", SUITE)
    (parent,) = [r for r in runs if r.data.tags.get("lpt.role") == "sweep"]
    for table in suite.tables:
        (run,) = mlflow_runs(tmp_path / "sweeps", f"{SUITE}/{table.ablation}")[1]
        assert run.data.tags["lpt.ablation"] == table.ablation
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert "report.md" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "report")}
    assert "claims.png" in {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "## Claims" in parent.data.tags["mlflow.note.content"]

    # report.py rebuilds the suite's report, claims included, from the stores
    claims_md = markdown.split("## Claims")[1]
    assert report_main([f"sweep={SUITE}", f"root={tmp_path / 'sweeps'}"]) == 0
    assert (folder / "report" / "report.md").read_text().split("## Claims")[1] == claims_md


# a part of the suite (ablation.values selects rows by their `<table>:<row>` label): topk:2 and
# decoupled_vs_joint:decoupled are trained as group_size:20
SUBSET = ("ablation.values=[model_size:micro_s,group_size:5,group_size:20,topk:2,decoupled_vs_joint:decoupled,"
          "decoupled_vs_joint:joint,per_phase:phase1_agcl]")


def test_a_failed_row_does_not_stop_the_suite_and_resume_finishes_it(ray_session, sweep_overrides, tmp_path):
    """The joint row runs out of memory (a real allocator failure): it fails alone, the other tables finish, the
    report names what is missing and its claim is `missing`; a resume trains that row only."""
    overrides = sweep_overrides("ablation=paper", ONE_SLOT, SUBSET, "max_failures=0")
    fault = ["debug.oom_at_epoch=0", "debug.fail_stage=joint", "debug.fail_row=decoupled_vs_joint:joint"]
    assert run_sweep(compose_config([*overrides, *fault])) == 1
    folder = tmp_path / "sweeps" / SUITE
    state = json.loads((folder / "state.json").read_text())
    assert state["status"] == "incomplete" and state["failed"] == ["decoupled_vs_joint:joint/seed=0"]
    markdown = (folder / "report" / "report.md").read_text()
    assert "- decoupled_vs_joint: rows joint failed (resume=true runs them again)" in markdown
    claims = {c["claim"]: c for c in _csv(folder / "report" / "claims.csv")}
    assert claims["Decoupled training beats joint training"]["verdict"] == "missing"
    assert claims["m = 20 is within noise of the best m"]["verdict"] in VERDICTS
    assert json.loads((folder / "group_size" / "state.json").read_text())["status"] == "complete"
    assert json.loads((folder / "decoupled_vs_joint" / "state.json").read_text())["status"] == "incomplete"
    _, before = mlflow_runs(tmp_path / "sweeps", SUITE)
    finished = {r.data.tags["lpt.stage_key"] for r in stage_runs(before, "phase2") if r.info.status == "FINISHED"}

    assert run_sweep(compose_config([*overrides, "resume=true"])) == 0
    assert json.loads((folder / "state.json").read_text())["status"] == "complete"
    claims = {c["claim"]: c for c in _csv(folder / "report" / "claims.csv")}
    assert claims["Decoupled training beats joint training"]["verdict"] in VERDICTS
    _stage_keys_trained_once(tmp_path, overrides)
    _, after = mlflow_runs(tmp_path / "sweeps", SUITE)
    for run in stage_runs(after, "phase2"):  # the phase 2 rows finished before were not run again
        if run.data.tags["lpt.stage_key"] in finished:
            assert run.data.tags.get("lpt.previous_error") is None


def test_a_suite_killed_in_the_middle_resumes(ray_session, sweep_overrides, tmp_path):
    """The driver (a process of its own, with its own Ray) SIGKILLed while group_size:5's phase 2 holds after its
    epoch 1; resume=true (in this process, on the session's Ray: what a resume does does not depend on which Ray
    runs it) finishes the suite and no stage is trained twice nor any epoch logged twice."""
    overrides = sweep_overrides("ablation=paper", ONE_SLOT, SUBSET, "phase2.epochs=3")
    events = tmp_path / "events"
    hold = [f"debug.event_dir={events}", "debug.hold_at_epoch=1", "debug.fail_stage=phase2",
            "debug.fail_row=group_size:5"]
    kill_driver_when([*overrides, *hold], tmp_path / "driver.log",
                     lambda proc: wait_for_event(events, "phase2.group_size_5.seed0.epoch1", proc))
    folder = tmp_path / "sweeps" / SUITE
    assert json.loads((folder / "state.json").read_text())["status"] == "running"
    first = (tmp_path / "driver.log").read_text()
    assert "plan: suite 'paper' on demo" in first and "distinct stages done; tables complete" in first

    assert run_sweep(compose_config([*overrides, "resume=true"])) == 0
    assert json.loads((folder / "state.json").read_text())["status"] == "complete"
    _stage_keys_trained_once(tmp_path, overrides)
    rows = {r["row"] for r in _csv(folder / "group_size" / "report" / "report.csv")}
    assert {"5", "20"} <= rows
    claims = {c["claim"]: c for c in _csv(folder / "report" / "claims.csv")}
    assert claims["Decoupled training beats joint training"]["verdict"] in VERDICTS
    assert claims["k = 2 is the best k"]["verdict"] == "missing"  # k = 1, 3, 4 are not in this subset
    assert claims["k = 2 is the best k"]["missing"] == "no other row of topk in this sweep"
    assert claims["Larger backbones are better"]["missing"] == "not in this sweep: micro_m, micro_l"
    assert get_ablation("topk").reference == "2"
