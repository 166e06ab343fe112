"""Reports from hand-made sweep folders: intervals and paired differences with known answers, the phase-1 line,
the reference row, the paper column, Optuna importances, and a real MLflow store as the source of every number."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lpt_core.metrics import accuracy_report, match_histogram, match_table, per_class_table, prediction_table
from lpt_core.uncertainty import bootstrap_accuracies, percentile_interval
from orchestration.reporting.build import build_report
from orchestration.report import main
from orchestration.tracking.run_names import metric_name
from orchestration.plan.record import PlanRecord

# 4 classes x 10 test images; train counts 200 / 50 / 20 / 5: authors' few = classes 2, 3, standard few = class 3
LABELS = torch.arange(4).repeat_interleave(10)
COUNTS = torch.tensor([200, 50, 20, 5])


def preds_right_on(right: torch.Tensor) -> torch.Tensor:
    """Predictions that are right exactly where `right` [40] is True."""
    return torch.where(right, LABELS, (LABELS + 1) % 4)


def class_right(*classes: int) -> torch.Tensor:
    return torch.isin(LABELS, torch.tensor(classes))


def write_stage(root: Path, key: str, right: torch.Tensor, upstream: str | None = None, pool: int = 0,
                predictions: bool = True) -> dict:
    """A finished stage folder (result.json, per_class, predictions, match) whose metrics match its predictions."""
    preds = preds_right_on(right)
    folder = root / key
    folder.mkdir(parents=True)
    metrics = accuracy_report(preds, LABELS, COUNTS)
    topk = None
    if pool:
        topk = torch.stack([LABELS % pool, (LABELS + 1) % pool], dim=1)  # class c matches prompts c, c+1
        pq.write_table(match_table(match_histogram(LABELS, topk, 4, pool)), folder / "match.parquet")
    pq.write_table(per_class_table(preds, LABELS, COUNTS), folder / "per_class.parquet")
    if predictions:
        pq.write_table(prediction_table(preds, LABELS, COUNTS, topk), folder / "predictions.parquet")
    phase = key.split("-")[0]
    (folder / "result.json").write_text(json.dumps({"metrics": metrics, "history": [], "run_id": f"run-{key}",
                                                    "phase": phase, "upstream": upstream}))
    return metrics


def make_sweep(tmp_path: Path, rows: dict, ablation: str = "group_size", axis: str = "m", seeds=(0,),
               experiment: str = "demo", search: str = "grid", plan_rows=None) -> Path:
    """rows: label -> {seed: (stage, right [40], upstream right [40] or None, config)}; writes stages + sweep."""
    stages = tmp_path / "stages"
    records, upstreams = [], {}
    for label, by_seed in rows.items():
        for seed, (stage, right, up_right, config) in by_seed.items():
            upstream = None
            if up_right is not None:
                upstream = f"phase1-s{seed}-{'.'.join(map(str, up_right.nonzero().flatten().tolist()))}"
                if upstream not in upstreams:
                    upstreams[upstream] = write_stage(stages, upstream, up_right)
            key = f"{stage}-{label}-s{seed}".replace(" ", "_")
            metrics = write_stage(stages, key, right, upstream, pool=4 if stage == "phase2" else 0)
            records.append({"trial_id": f"{label}/seed={seed}", "row": label, "seed": seed, "stage": stage,
                            "stage_key": key, "run_id": f"run-{key}", "config": config or {}, "metrics": metrics})
    plan = {"fingerprint": "f", "name": f"{ablation}-{experiment}", "ablation": ablation, "experiment": experiment,
            "axis": axis, "rows": plan_rows if plan_rows is not None else list(rows), "seeds": list(seeds),
            "search": search, "metric": "acc", "stage_root": str(stages)}
    folder = tmp_path / "sweeps" / plan["name"]
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps(plan))
    (folder / "trials.json").write_text(json.dumps(records))
    return folder


def table(markdown: str, title: str) -> list[list[str]]:
    section = markdown.split(f"### {title}")[1].split("###")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")][1:]  # [0] is the header
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def read_csv(folder: Path) -> list[dict]:
    with open(folder / "report" / "report.csv") as handle:
        return list(csv.DictReader(handle))


PHASE1 = class_right(0)  # 25 % overall
REF = class_right(0, 1)  # 50 %, many 100, medium 100, few 0
MIXED = torch.arange(40) % 2 == 0  # half of every class: 50 % everywhere, with within-class variation


@pytest.fixture
def group_size(tmp_path: Path) -> Path:
    return make_sweep(tmp_path, {"5": {0: ("phase2", REF, PHASE1, None)},
                                 "20": {0: ("phase2", REF, PHASE1, None)},
                                 "40": {0: ("phase2", MIXED, PHASE1, None)}})


def test_intervals_reference_and_shared_phase1_by_hand(group_size: Path) -> None:
    report = build_report(group_size, tracking_uri=None)
    authors = table(report.markdown, "authors")
    # classes all right or all wrong: every within-class resample is the same, so the intervals have width 0
    assert authors[0] == ["5", "phase2", "50.0 ± 0.0", "100.0 ± 0.0", "100.0 ± 0.0", "0.0 ± 0.0"]
    assert authors[1] == ["**20** (reference)", "phase2", "50.0 ± 0.0", "100.0 ± 0.0", "100.0 ± 0.0", "0.0 ± 0.0"]
    assert authors[3] == ["phase 1 (shared upstream)", "phase1", "25.0 ± 0.0", "100.0 ± 0.0", "0.0 ± 0.0",
                          "0.0 ± 0.0"]
    assert table(report.markdown, "standard")[1][2:] == ["50.0 ± 0.0", "100.0 ± 0.0", "50.0 ± 0.0", "0.0 ± 0.0"]
    assert "paper" not in report.markdown  # the demo is not the paper's dataset
    assert "stratified bootstrap over the test images, resampled within their class with 2000 replicates" in \
        report.markdown
    deltas = table(report.markdown, "paired differences")
    # row 5 is row 20 again: a difference of exactly 0; phase 1 is 25 points below on every resample
    assert deltas[0] == ["5", "+0.0 [+0.0, +0.0]", "+0.0 [+0.0, +0.0]", "+0.0 [+0.0, +0.0]"]
    assert deltas[2] == ["phase 1 (shared upstream)", "-25.0 [-25.0, -25.0] *", "+0.0 [+0.0, +0.0]",
                         "+0.0 [+0.0, +0.0]"]
    assert "Holm's correction over the 9 comparisons of this table" in report.markdown
    rows = {r["row"]: r for r in read_csv(group_size)}
    assert rows["20"]["role"] == "reference" and rows["phase 1 (shared upstream)"]["role"] == "upstream"
    # p = 2 / 2001 for a difference that is negative on every replicate; Holm multiplies the smallest by 9
    assert float(rows["phase 1 (shared upstream)"]["d_acc_p"]) == pytest.approx(2 / 2001)
    assert float(rows["phase 1 (shared upstream)"]["d_acc_p_holm"]) == pytest.approx(9 * 2 / 2001)
    assert float(rows["5"]["d_acc_p"]) == 1.0


def mixed_interval(key: str):
    """The interval of row MIXED straight from lpt_core: the report must give exactly this (same seed, 2000)."""
    groups = {"acc": np.ones(40, bool), "few": LABELS.numpy() >= 2}
    reps = bootstrap_accuracies(MIXED.numpy()[None, None], LABELS.numpy(), groups, seed=0)
    return percentile_interval(reps[key][:, 0], 50.0)


def test_a_varying_row_gets_the_bootstrap_of_its_own_predictions(group_size: Path) -> None:
    build_report(group_size, tracking_uri=None)
    row = {r["row"]: r for r in read_csv(group_size)}["40"]
    for key in ("acc", "few"):
        expected = mixed_interval(key)
        assert (float(row[f"{key}_lo"]), float(row[f"{key}_hi"])) == pytest.approx((expected.low, expected.high))
        assert expected.low < 50.0 < expected.high
    assert float(row["acc"]) == 50.0 and float(row["d_few"]) == 50.0  # few: 50 % against the reference's 0 %


def test_plots_are_written(group_size: Path) -> None:
    report = build_report(group_size, tracking_uri=None)
    assert {p.name for p in report.files} == {"report.md", "report.csv", "axis.png", "compare.png", "matches.png"}
    for name in ("axis.png", "compare.png", "matches.png"):
        assert (group_size / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (group_size / "report" / "report.md").read_text().strip() == report.markdown


def test_two_seeds_carry_the_seed_to_seed_variation(tmp_path: Path) -> None:
    # seed 0 right everywhere, seed 1 nowhere: the two-level bootstrap draws seed means 0, 50, 100 (1/4, 1/2, 1/4)
    everywhere, nowhere = torch.ones(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool)
    folder = make_sweep(tmp_path, {"mean": {0: ("phase2", everywhere, None, None), 1: ("phase2", nowhere, None, None)},
                                   "concat": {0: ("phase2", everywhere, None, None),
                                              1: ("phase2", everywhere, None, None)}},
                        ablation="ensemble", axis="ensemble", seeds=(0, 1))
    report = build_report(folder, tracking_uri=None)
    authors = table(report.markdown, "authors")
    assert authors[0][:3] == ["**mean** (reference)", "phase2", "50.0 ± 50.0"]
    assert authors[1][:3] == ["concat", "phase2", "100.0 ± 0.0"]
    assert "the 2 seeds resampled with replacement and the test images within their class, the same images for " \
           "every seed" in report.markdown
    assert "mean over the 2 seeds" in report.markdown
    # concat - mean: seeds paired, so the difference is 100 - (seed mean): 0, 50 or 100
    assert table(report.markdown, "paired differences")[0][1] == "+50.0 [+0.0, +100.0]"


def test_per_phase_steps_are_paired_differences_between_rows(tmp_path: Path) -> None:
    """Tab. 8's steps (phase1_ce - linear_probe, phase1_agcl - phase1_ce) beside the differences to full LPT, in
    one Holm family; every class all right or all wrong, so each difference is exact with a zero-width interval."""
    rows = {"linear_probe": class_right(0), "vpt_ce_instance": class_right(0), "phase1_ce": class_right(0, 1),
            "phase1_agcl": class_right(0, 1, 2), "full_lpt": class_right(0, 1, 2, 3)}
    folder = make_sweep(tmp_path, {label: {0: ("phase2" if label == "full_lpt" else "phase1", right, None, None)}
                                   for label, right in rows.items()}, ablation="per_phase", axis="row")
    report = build_report(folder, tracking_uri=None)
    assert "### paired differences to the reference row row = full_lpt, and between steps" in report.markdown
    deltas = {line[0]: line[1:] for line in table(report.markdown, "paired differences")}
    assert list(deltas) == ["linear_probe", "vpt_ce_instance", "phase1_ce", "phase1_agcl",
                            "phase1_ce - linear_probe", "phase1_agcl - phase1_ce"]
    # overall / few (authors: classes 2, 3) / few (standard: class 3)
    assert deltas["phase1_ce - linear_probe"] == ["+25.0 [+25.0, +25.0] *", "+0.0 [+0.0, +0.0]", "+0.0 [+0.0, +0.0]"]
    assert deltas["phase1_agcl - phase1_ce"] == ["+25.0 [+25.0, +25.0] *", "+50.0 [+50.0, +50.0] *",
                                                 "+0.0 [+0.0, +0.0]"]
    assert deltas["phase1_agcl"] == ["-25.0 [-25.0, -25.0] *", "-50.0 [-50.0, -50.0] *", "-100.0 [-100.0, -100.0] *"]
    assert "Holm's correction over the 18 comparisons of this table" in report.markdown
    steps = {r["row"]: r for r in read_csv(folder) if r["role"] == "step"}
    assert sorted(steps) == ["phase1_agcl - phase1_ce", "phase1_ce - linear_probe"]
    assert float(steps["phase1_agcl - phase1_ce"]["d_few"]) == 50.0 and steps["phase1_agcl - phase1_ce"]["acc"] == "nan"
    assert "compare.png" in {p.name for p in report.files}


def test_a_step_needs_both_rows_on_the_same_seeds(tmp_path: Path) -> None:
    rows = {"phase1_ce": {0: ("phase1", class_right(0, 1), None, None)},
            "phase1_agcl": {1: ("phase1", class_right(0, 1, 2), None, None)},
            "full_lpt": {1: ("phase2", class_right(0, 1, 2, 3), None, None)}}
    folder = make_sweep(tmp_path, rows, ablation="per_phase", axis="row", seeds=(0, 1))
    report = build_report(folder, tracking_uri=None)
    assert "phase1_agcl - phase1_ce: the two rows have other seeds or test images, not compared" in report.markdown
    assert "phase1_ce - linear_probe" not in report.markdown  # a row of the step is not in the sweep


def test_no_reference_row_and_no_predictions_are_said(tmp_path: Path) -> None:
    stages = tmp_path / "stages"
    folder = make_sweep(tmp_path, {"5": {0: ("phase2", REF, PHASE1, None)}, "10": {0: ("phase2", MIXED, PHASE1, None)}})
    (stages / "phase2-10-s0" / "predictions.parquet").unlink()
    report = build_report(folder, tracking_uri=None)
    assert "The reference row m = 20 is not in this sweep (ablation.values, or its trials failed): no paired " \
           "comparison." in report.markdown
    assert "no per-image predictions for 10: point estimates only, no interval" in report.markdown
    assert table(report.markdown, "authors")[1][:3] == ["10", "phase2", "50.0"]
    assert "compare.png" not in {p.name for p in report.files}


def test_paper_column_only_on_the_papers_dataset(tmp_path: Path) -> None:
    folder = make_sweep(tmp_path, {"decoupled": {0: ("phase2", REF, None, None)},
                                   "joint": {0: ("joint", PHASE1, None, None)}},
                        ablation="decoupled_vs_joint", axis="training", experiment="places_lt")
    report = build_report(folder, tracking_uri=None)
    assert "| training | stage | overall | many | medium | few | paper, Places-LT |" in report.markdown
    assert table(report.markdown, "authors")[1][-1] == "47.48"
    assert "paper" not in report.markdown.split("### standard")[1]


def test_optuna_report_lists_best_trials_and_importances(tmp_path: Path) -> None:
    rows = {}
    for i, right in enumerate([class_right(0), class_right(0, 1, 2), class_right(0, 1), MIXED]):
        config = {"phase2.loss.lambda_pos_ib": 0.5 * i, "phase2.loss.lambda_neg_ib": 2.0 + i,
                  "phase2.loss.eta": 0.9 - 0.2 * i}
        rows[f"trial {i}"] = {0: ("phase2", right, PHASE1, config)}
    folder = make_sweep(tmp_path, rows, ablation="loss", axis="lambda+/lambda-/eta", search="optuna", plan_rows=[])
    report = build_report(folder, tracking_uri=None)
    authors = table(report.markdown, "authors")
    assert [r[0] for r in authors] == ["trial 1", "trial 2", "trial 3", "trial 0", "phase 1 (shared upstream)"]
    assert authors[0][2] == "75.0 ± 0.0"
    assert "Optuna trials have no reference row" in report.markdown
    importances = table(report.markdown, "parameter importances")
    assert sorted(r[0] for r in importances) == ["phase2.loss.eta", "phase2.loss.lambda_neg_ib",
                                                 "phase2.loss.lambda_pos_ib"]
    assert sum(float(r[1]) for r in importances) == pytest.approx(1.0, abs=2e-3)  # normalised, 3 decimals each
    assert {p.name for p in report.files} >= {"optuna.png", "axis.png"}
    rows_csv = read_csv(folder)
    assert float(rows_csv[0]["phase2.loss.lambda_pos_ib"]) == 0.5 and rows_csv[0]["acc_lo"] == "75.0"


# ---------------------------------------------------------------------------------------------- real MLflow
def _log_runs(uri: str, folder: Path, shift: float) -> dict[str, dict[str, float]]:
    """An MLflow run for every trial and phase-1 stage, holding the stage's metrics + shift (so they differ from
    trials.json's) under the names the runs use, and the predictions artifact; returns run id -> metrics as logged,
    by lpt_core's keys."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment("lpt", artifact_location=(folder / "mlartifacts").as_uri())
    plan = json.loads((folder / "plan.json").read_text())
    logged, stage_root = {}, Path(plan["stage_root"])
    records = json.loads((folder / "trials.json").read_text())
    for stage in sorted(p for p in stage_root.iterdir()):
        result = json.loads((stage / "result.json").read_text())
        run = client.create_run(experiment, tags={"lpt.stage_key": stage.name})
        metrics = {k: v + shift for k, v in result["metrics"].items() if not math.isnan(v)}
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, metric_name(key), value)
        client.log_artifact(run.info.run_id, str(stage / "predictions.parquet"))
        result["run_id"] = run.info.run_id
        (stage / "result.json").write_text(json.dumps(result))
        for record in records:
            if record["stage_key"] == stage.name:
                record["run_id"] = run.info.run_id
        logged[run.info.run_id] = metrics
    (folder / "trials.json").write_text(json.dumps(records))
    return logged


def test_report_equals_the_mlflow_store_and_falls_back_without_it(group_size: Path) -> None:
    uri = f"sqlite:///{group_size / 'mlflow.db'}"
    logged = _log_runs(uri, group_size, shift=0.125)
    (Path(json.loads((group_size / "plan.json").read_text())["stage_root"]) / "phase2-40-s0" /
     "predictions.parquet").unlink()  # read from the MLflow artifact instead
    report = build_report(group_size, tracking_uri=uri)
    assert f"point estimates from MLflow ({uri})" in report.markdown
    checked = 0
    for row in read_csv(group_size):
        for key in ("acc", "many", "medium", "few", "many_std", "medium_std", "few_std"):
            (run_id,) = row["run_ids"].split(";")
            assert float(row[key]) == logged[run_id][key], (row["row"], key)
            checked += 1
    assert checked == 4 * 7
    assert "no per-image predictions" not in report.markdown  # row 40's came from its artifact
    row_40 = {r["row"]: r for r in read_csv(group_size)}["40"]
    assert (float(row_40["acc_lo"]), float(row_40["acc_hi"])) == pytest.approx(
        (mixed_interval("acc").low, mixed_interval("acc").high))
    assert "the predictions give overall" in report.markdown  # the shifted store no longer matches them: said

    unreachable = build_report(group_size, tracking_uri="http://127.0.0.1:9", outage_wait_s=0)
    assert "MLflow at http://127.0.0.1:9 unreachable" in unreachable.markdown
    rows = {r["row"]: r for r in read_csv(group_size)}
    assert float(rows["20"]["acc"]) == 50.0  # trials.json's number
    assert "no per-image predictions for 40" in unreachable.markdown


def test_report_reads_the_sweeps_mlflow_experiment(group_size: Path) -> None:
    """A sweep tracked with tracking.experiment=team: its report connects to that experiment (plan.json names it)
    and creates no other in the store."""
    from mlflow.tracking import MlflowClient

    dataclasses.replace(PlanRecord.read(group_size), tracking_experiment="team").write(group_size)
    uri = f"sqlite:///{group_size / 'team.db'}"
    report = build_report(group_size, tracking_uri=uri)
    assert f"point estimates from MLflow ({uri})" in report.markdown
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("team") is not None and client.get_experiment_by_name("lpt") is None


def test_cli_missing_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep=nope", f"root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no sweep at" in err and str(tmp_path / "nope") in err


def test_cli_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep=gs", f"root={tmp_path}", "colour=red"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown key 'colour'; valid keys: sweep, root, tracking_uri" in err and "usage" in err
    assert main(["swep=gs", f"root={tmp_path}"]) == 2
    assert "unknown key 'swep'; did you mean 'sweep'?" in capsys.readouterr().err


def test_cli_needs_a_sweep(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_cli_prints_the_report(group_size: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([f"sweep={group_size.name}", f"root={group_size.parent}", "tracking_uri=http://127.0.0.1:9"]) == 0
    out = capsys.readouterr().out
    assert "| **20** (reference) | phase2 | 50.0 ± 0.0 |" in out and "report.csv" in out



def test_cli_reads_the_store_plan_json_names(group_size: Path, capsys: pytest.CaptureFixture) -> None:
    """A sweep tracked with tracking.uri=<elsewhere>: `report.py sweep=...` finds that store without being told;
    a recorded store whose credentials were redacted is not guessed at (the default store beside the sweeps)."""
    elsewhere = f"sqlite:///{group_size.parent.parent / 'elsewhere' / 'mlflow.db'}"
    (group_size.parent.parent / "elsewhere").mkdir()
    dataclasses.replace(PlanRecord.read(group_size), tracking_uri=elsewhere).write(group_size)
    assert main([f"sweep={group_size.name}", f"root={group_size.parent}"]) == 0
    assert f"point estimates from MLflow ({elsewhere})" in capsys.readouterr().out
    dataclasses.replace(PlanRecord.read(group_size), tracking_uri="https://***@mlflow.example").write(group_size)
    assert main([f"sweep={group_size.name}", f"root={group_size.parent}"]) == 0
    default = f"sqlite:///{group_size.parent.resolve() / 'mlflow.db'}"
    assert f"point estimates from MLflow ({default})" in capsys.readouterr().out
