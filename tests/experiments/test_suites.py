"""Suites as data (experiments/suites.py): the paper suite's tables and claims, its union of rows, and the checks
that refuse a suite naming what does not exist."""
from __future__ import annotations

import pytest

from experiments.ablations import ABLATIONS, RUN_UNTIL, get_ablation
from experiments.suites import SUITES, Claim, Suite, SuiteTable, find_ablation, register_suite, split_label
from lpt_core.config import ConfigError

PAPER_TABLES = ["vpt_sampling", "model_size", "per_phase", "decoupled_vs_joint", "query_function", "group_size", "topk"]


def test_the_paper_suite_is_the_ablation_section_in_the_papers_order():
    suite = SUITES["paper"]
    assert [t.ablation for t in suite.tables] == PAPER_TABLES
    assert [t.title.split(":")[0] for t in suite.tables][:5] == ["Tab. 1", "Tab. 7", "Tab. 8", "Tab. 9", "Tab. 10"]
    assert {c.table for c in suite.claims} == set(PAPER_TABLES)


@pytest.mark.parametrize("experiment", ["places_lt", "demo"])
def test_the_union_holds_every_row_of_every_table_under_its_table(experiment):
    union = find_ablation("paper")
    expected = [f"{name}:{p.label}" for name in PAPER_TABLES for p in get_ablation(name).points_for(experiment)]
    assert [p.label for p in union.points_for(experiment)] == expected
    for point in union.points_for(experiment):
        table, row = split_label(point.label)
        assert point.overrides == next(p.overrides for p in get_ablation(table).points_for(experiment)
                                       if p.label == row)
    assert union.reference_for(experiment) == "group_size:20"
    assert union.stages == ("pretrain", "phase1", "phase2", "joint")  # model size, Tab. 8's phase-1 rows, Tab. 9


def test_tab1_rows_stop_after_phase_1_with_ce():
    ablation = get_ablation("vpt_sampling")
    assert ablation.stages == ("phase1",)
    for point in ablation.points:
        assert point.overrides[RUN_UNTIL] == "phase1" and point.overrides["phase1.loss.name"] == "ce"
    shared = {p.label: p.overrides.get("prompt.shared", True) for p in ablation.points}
    assert shared == {"linear_probe_instance": False, "vpt_instance": True, "linear_probe_cb": False, "vpt_cb": True}
    assert ablation.paper == {"vpt_instance": 37.52, "vpt_cb": 44.17}


def test_find_ablation_names_tables_and_suites_and_suggests():
    assert find_ablation("group_size") is ABLATIONS["group_size"]
    with pytest.raises(ConfigError, match=r"ablation='papr'.*did you mean 'paper'"):
        find_ablation("papr")


def _suite(*claims: Claim, name: str = "test_suite", tables=("group_size", "topk")) -> Suite:
    return Suite(name, "a test suite", tuple(SuiteTable(t, t) for t in tables), claims, ("group_size", "20"))


def test_a_suite_must_name_registered_tables_and_rows_of_them():
    with pytest.raises(ValueError, match="claim 'k = 7' .*names rows \\('7',\\)"):
        register_suite(_suite(Claim("k = 7", "Fig. 4", "topk", "best", ("7",))))
    with pytest.raises(ValueError, match="reads table 'per_phase', not in the suite"):
        register_suite(_suite(Claim("x", "Tab. 8", "per_phase", "better", ("full_lpt", "phase1_agcl"))))
    with pytest.raises(ValueError, match="better.*names rows \\('1',\\)"):  # a better claim needs two rows
        register_suite(_suite(Claim("x", "Fig. 4", "topk", "better", ("1",))))
    with pytest.raises(ConfigError, match="unknown ablation"):
        register_suite(_suite(tables=("group_size", "no_such_table")))
    with pytest.raises(ValueError, match="the name is taken"):
        register_suite(_suite(name="paper"))
    assert "test_suite" not in SUITES


def test_model_size_claims_use_the_demo_rows_on_the_demo():
    claim = next(c for c in SUITES["paper"].claims if c.table == "model_size")
    assert claim.rows_for("places_lt") == ("vit_t", "vit_s", "vit_b")
    assert claim.rows_for("demo") == ("micro_s", "micro_m", "micro_l")


def test_claims_with_too_few_or_repeated_rows_are_refused():
    with pytest.raises(ValueError, match="increasing.*names rows \\('1',\\)"):
        register_suite(_suite(Claim("x", "Fig. 4", "topk", "increasing", ("1",))))
    with pytest.raises(ValueError, match="better.*names rows \\('1', '1'\\)"):
        register_suite(_suite(Claim("x", "Fig. 4", "topk", "better", ("1", "1"))))
    assert "test_suite" not in SUITES
