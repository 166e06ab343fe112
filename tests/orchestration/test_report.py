"""Paper-style report from a hand-made sweep folder (no MLflow): tables, mean +- std by hand, files, CLI errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestration.report import build_report, main

RULE_KEYS = ("acc", "many", "medium", "few", "many_std", "medium_std", "few_std")


def metrics(acc: float, shift: float = 0.0) -> dict[str, float]:
    """acc, then many/medium/few = acc + 10/0/-10 (authors' rule) and +11/+1/-9 (standard rule), plus shift."""
    return {"acc": acc + shift, "many": acc + 10 + shift, "medium": acc + shift, "few": acc - 10 + shift,
            "many_std": acc + 11 + shift, "medium_std": acc + 1 + shift, "few_std": acc - 9 + shift}


def write_sweep(folder: Path, plan: dict, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps(plan))
    (folder / "trials.json").write_text(json.dumps(records))
    return folder


def record(row: str, seed: int, values: dict, stage: str = "phase2") -> dict:
    return {"trial_id": f"{row}-{seed}", "row": row, "seed": seed, "stage": stage, "stage_key": f"{stage}-{row}",
            "run_id": f"run-{row}-{seed}", "config": {}, "metrics": values}


@pytest.fixture
def grid_sweep(tmp_path: Path) -> Path:
    # plan order 20 before 5 (not sorted) so the test sees the plan's order is kept
    plan = {"fingerprint": "f", "name": "gs", "ablation": "group_size", "experiment": "demo", "axis": "m",
            "rows": ["20", "5"], "seeds": [0, 1], "search": "grid", "metric": "acc",
            "stage_root": str(tmp_path / "stages")}
    records = [record("5", 1, metrics(30.0)), record("20", 0, metrics(50.0)),
               record("5", 0, metrics(34.0)), record("20", 1, metrics(52.0))]
    match = pa.table({"class_id": [0, 0, 1], "prompt_id": [0, 1, 1], "count": [3, 1, 4]})
    (tmp_path / "stages" / "phase2-20").mkdir(parents=True)
    pq.write_table(match, tmp_path / "stages" / "phase2-20" / "match.parquet")
    return write_sweep(tmp_path / "sweeps" / "gs", plan, records)


def table_rows(markdown: str, title_word: str) -> list[list[str]]:
    section = markdown.split(f"### {title_word}")[1].split("###")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")][1:]  # [0] is the header
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_grid_report_tables_by_hand(grid_sweep: Path) -> None:
    report = build_report(grid_sweep, tracking_uri=None)
    authors, standard = table_rows(report.markdown, "authors"), table_rows(report.markdown, "standard")
    # row 20: acc 50, 52 -> 51.00 +- 1.41 (sample std); row 5: acc 34, 30 -> 32.00 +- 2.83
    assert authors == [["20", "phase2", "51.00 ± 1.41", "61.00 ± 1.41", "51.00 ± 1.41", "41.00 ± 1.41", "50.07"],
                       ["5", "phase2", "32.00 ± 2.83", "42.00 ± 2.83", "32.00 ± 2.83", "22.00 ± 2.83", ""]]
    assert standard == [["20", "phase2", "51.00 ± 1.41", "62.00 ± 1.41", "52.00 ± 1.41", "42.00 ± 1.41", "50.07"],
                        ["5", "phase2", "32.00 ± 2.83", "43.00 ± 2.83", "33.00 ± 2.83", "23.00 ± 2.83", ""]]
    assert "ablation `group_size` on `demo` (2 seed(s)" in report.markdown
    assert [r["row"] for r in report.rows] == ["20", "5"] and report.rows[0]["n"] == 2
    assert report.rows[1]["acc"] == pytest.approx(32.0) and report.rows[1]["acc_sd"] == pytest.approx(8 ** 0.5)


def test_grid_report_writes_its_files(grid_sweep: Path) -> None:
    report = build_report(grid_sweep, tracking_uri=None)
    out = grid_sweep / "report"
    assert {p.name for p in report.files} == {"report.md", "report.csv", "axis.png", "matches.png"}
    assert (out / "report.md").read_text().strip() == report.markdown
    for png in ("axis.png", "matches.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["row"] for r in rows] == ["20", "5"]
    assert float(rows[0]["acc"]) == pytest.approx(51.0) and float(rows[0]["acc_sd"]) == pytest.approx(2 ** 0.5)
    assert set(RULE_KEYS) <= set(rows[0])


def test_single_seed_cells_have_no_std(tmp_path: Path) -> None:
    plan = {"name": "one", "ablation": "topk", "experiment": "demo", "axis": "k", "rows": ["1", "2", "3"],
            "seeds": [0], "search": "grid", "metric": "acc", "stage_root": str(tmp_path / "none")}
    records = [record("2", 0, {"acc": 41.234}), record("1", 0, metrics(40.0), stage="phase1")]
    report = build_report(write_sweep(tmp_path / "one", plan, records), tracking_uri=None)
    assert "| 1 | phase1 | 40.00 | 50.00 | 40.00 | 30.00 |  |" in report.markdown
    assert "| 2 | phase2 | 41.23 | - | - | - | 50.07 |" in report.markdown  # missing metrics are '-'
    assert [r["row"] for r in report.rows] == ["1", "2"]  # row 3 has no trial: left out
    assert not (tmp_path / "one" / "report" / "matches.png").exists()


def test_optuna_report_sorts_rows_by_the_metric(tmp_path: Path) -> None:
    plan = {"name": "opt", "ablation": "loss", "experiment": "demo", "axis": "lambda+/lambda-/eta", "rows": [],
            "seeds": [0], "search": "optuna", "metric": "acc", "stage_root": str(tmp_path / "none")}
    records = [record("t0", 0, metrics(30.0)), record("t1", 0, metrics(50.0)), record("t2", 0, metrics(40.0))]
    report = build_report(write_sweep(tmp_path / "opt", plan, records), tracking_uri=None)
    assert [r["row"] for r in report.rows] == ["t1", "t2", "t0"]
    assert [row[0] for row in table_rows(report.markdown, "authors")] == ["t1", "t2", "t0"]


def test_cli_missing_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep=nope", f"root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no sweep at" in err and str(tmp_path / "nope") in err


def test_cli_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep=gs", f"root={tmp_path}", "colour=red"]) == 2
    err = capsys.readouterr().err
    assert "unknown keys" in err and "colour" in err and "usage" in err


def test_cli_needs_a_sweep(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
