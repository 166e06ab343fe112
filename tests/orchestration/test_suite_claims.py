"""A suite's report (orchestration/reporting/suite_report.py) on hand-made inputs: which differences each kind of
claim rests on, the verdict from Holm-adjusted comparisons, and the per-table sweep folders made from the suite's."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from experiments.suites import Claim
from lpt_core.uncertainty import Interval
from orchestration.reporting.sources import Run
from orchestration.reporting.statistics import Comparison, Line, paired_comparison
from orchestration.plan.record import PlanRecord
from orchestration.plan.trial_specs import trial_id
from orchestration.reporting.suite_report import (CONTRADICTED, HOLDS, MISSING, NOT_SIGNIFICANT, claim_pairs, verdict,
                                                  write_suite_file, write_table_folders)


def _comparison(estimate: float, p_holm: float) -> Comparison:
    return Comparison(Interval(estimate, estimate - 1, estimate + 1), p=p_holm / 2, p_holm=p_holm)


def _claim(kind: str, rows: tuple[str, ...]) -> Claim:
    return Claim("text", "Tab. X", "topk", kind, rows)


@pytest.mark.parametrize("kind, comparisons, expected", [
    ("better", [_comparison(+2.0, 0.01)], HOLDS),
    ("better", [_comparison(+2.0, 0.20)], NOT_SIGNIFICANT),
    ("better", [_comparison(-2.0, 0.01)], CONTRADICTED),
    ("better", [_comparison(-2.0, 0.20)], NOT_SIGNIFICANT),
    ("increasing", [_comparison(+1.0, 0.001), _comparison(+1.0, 0.049)], HOLDS),
    ("increasing", [_comparison(+1.0, 0.001), _comparison(+1.0, 0.05)], NOT_SIGNIFICANT),  # 0.05 is not < α
    ("best", [_comparison(+1.0, 0.001), _comparison(-3.0, 0.01)], CONTRADICTED),
    ("within_noise", [_comparison(-0.5, 0.60)], HOLDS),  # not significantly below the best
    ("within_noise", [_comparison(-3.0, 0.001)], CONTRADICTED),
    ("better", [None], MISSING),
    ("better", [_comparison(+2.0, math.nan)], MISSING),
    ("best", [], MISSING),
])
def test_verdict(kind, comparisons, expected):
    assert verdict(_claim(kind, ("2",) if kind in ("best", "within_noise") else ("1", "2")), comparisons) == expected


def _line(label: str, acc: float) -> Line:
    return Line(label, "phase2", [], point={"acc": acc})


def test_claim_pairs_for_each_kind():
    lines = {label: _line(label, acc) for label, acc in (("1", 50.0), ("2", 52.0), ("3", 53.0), ("4", 51.0))}
    assert claim_pairs(_claim("better", ("2", "1")), "demo", lines) == [("2", "1")]
    assert claim_pairs(_claim("increasing", ("1", "2", "3")), "demo", lines) == [("2", "1"), ("3", "2")]
    assert claim_pairs(_claim("best", ("2",)), "demo", lines) == [("2", "1"), ("2", "3"), ("2", "4")]
    assert claim_pairs(_claim("within_noise", ("2",)), "demo", lines) == [("2", "3")]  # 3 is the best other row
    assert claim_pairs(_claim("within_noise", ("3",)), "demo", lines) == [("3", "2")]  # the best: vs the runner-up


def _predictions(labels: np.ndarray, right: np.ndarray) -> pa.Table:
    counts = np.bincount(labels)
    return pa.table({"label": labels, "pred": np.where(right, labels, (labels + 1) % len(counts)),
                     "train_count": counts[labels] * 10})


def test_paired_comparison_is_the_difference_of_the_two_rows():
    labels = np.repeat(np.arange(4), 25)
    rng = np.random.default_rng(0)
    a_right, b_right = rng.random(100) < 0.7, rng.random(100) < 0.5
    tables = {"a": _predictions(labels, a_right), "b": _predictions(labels, b_right)}
    a = Line("a", "phase2", [Run("a", 0, "phase2", "a", None, {})], point={"acc": 100 * a_right.mean()})
    b = Line("b", "phase2", [Run("b", 0, "phase2", "b", None, {})], point={"acc": 100 * b_right.mean()})
    comparison = paired_comparison(a, b, "acc", tables, replicates=500)
    assert comparison.interval.estimate == pytest.approx(100 * (a_right.mean() - b_right.mean()))
    assert comparison.interval.low < comparison.interval.estimate < comparison.interval.high
    reverse = paired_comparison(b, a, "acc", tables, replicates=500)
    assert reverse.interval.low == pytest.approx(-comparison.interval.high)  # the same replicates, negated
    assert reverse.p == comparison.p
    other_seed = Line("c", "phase2", [Run("c", 1, "phase2", "b", None, {})], point={"acc": 50.0})
    assert paired_comparison(a, other_seed, "acc", tables) is None  # not on the same seeds: no pairing


def test_table_folders_take_each_seed_of_a_merged_row(tmp_path):
    """A suite of two seeds whose merged row group_size:20 failed on seed 1 only: each table that holds it lists
    that seed alone as failed and keeps seed 0's trial under its own row label."""
    folder = tmp_path / "paper-demo"
    folder.mkdir()
    PlanRecord("f", "paper-demo", "paper", "demo", "row", ["group_size:5", "group_size:20"], [0, 1], "grid", "acc",
               str(tmp_path / "stages")).write(folder)
    write_suite_file(folder, "paper", {"group_size:5": "group_size:5", "group_size:20": "group_size:20",
                                       "topk:2": "group_size:20"})
    record = {"stage": "phase2", "stage_key": "k", "run_id": "r", "metrics": {"acc": 50.0}, "config": {}}
    trials = [{**record, "row": row, "seed": seed, "trial_id": trial_id(row, seed)}
              for row, seed in (("group_size:5", 0), ("group_size:5", 1), ("group_size:20", 0))]
    (folder / "trials.json").write_text(json.dumps(trials))
    (folder / "state.json").write_text(json.dumps({"status": "incomplete", "failed": ["group_size:20/seed=1"]}))
    folders = write_table_folders(folder)
    assert set(folders) == {"group_size", "topk"}
    topk = json.loads((folders["topk"] / "state.json").read_text())
    assert topk == {"status": "incomplete", "failed": ["2/seed=1"], "stopped": []}
    assert [(t["row"], t["seed"], t["trial_id"]) for t in json.loads((folders["topk"] / "trials.json").read_text())] \
        == [("2", 0, "2/seed=0")]
    group = json.loads((folders["group_size"] / "state.json").read_text())
    assert group["failed"] == ["20/seed=1"]
    table = PlanRecord.read(folders["group_size"])
    assert (table.name, table.ablation, table.rows, table.axis) == ("paper-demo/group_size", "group_size",
                                                                    ["5", "20"], "m")
