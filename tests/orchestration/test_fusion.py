"""The plan's fusion decision (orchestration.plan.fusion): which phase-2 rows train in one trial, for a cluster of
a given number of trial slots. No Ray, no training."""
from __future__ import annotations

import pytest
import timm
from safetensors.torch import save_file

from experiments.compose import compose_config
from lpt_core.config import ConfigError
from orchestration.plan.fusion import TrialUnit, plan_fusion, shared_upstream
from orchestration.plan.sweep_plan import SweepPlan, build_plan

DEMO_MICRO = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3)


@pytest.fixture(scope="module")
def plan_for(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fusion")
    weights = root / "micro_vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **DEMO_MICRO).state_dict(),
              str(weights))

    def build(*overrides: str) -> SweepPlan:
        return build_plan(compose_config([f"sweep.root={root}/sweeps", f"stages.root={root}/stages",
                                          f"backbone.weights_file={weights}", *overrides]))

    return build


def _rows(units: list[TrialUnit]) -> list[tuple[tuple[str, ...], int]]:
    return [(unit.rows, unit.seed) for unit in units]


def test_rows_keep_their_own_trials_when_the_cluster_has_a_slot_for_each(plan_for) -> None:
    plan = plan_for("ablation=group_size")
    for slots in (4, 5, 64):
        decision = plan_fusion(plan, slots)
        assert _rows(decision.units) == [(("5",), 0), (("10",), 0), (("20",), 0), (("40",), 0)]
        assert decision.fused == [] and "separate trials finish sooner" in decision.summary[0]


@pytest.mark.parametrize("slots, expected", [
    (1, [("5", "10", "20", "40")]),
    (2, [("5", "10"), ("20", "40")]),
    (3, [("5", "10"), ("20",), ("40",)]),
])
def test_fewer_slots_than_rows_fuse_rows_into_one_trial_per_slot(plan_for, slots: int,
                                                                 expected: list[tuple[str, ...]]) -> None:
    decision = plan_fusion(plan_for("ablation=group_size"), slots)
    assert [unit.rows for unit in decision.units] == expected
    assert all(unit.seed == 0 for unit in decision.units)
    fused_lines = [line for line in decision.summary if line.strip().startswith("fused:")]
    assert fused_lines == [f"  fused: m = {', '.join(rows)} (seed 0)" for rows in expected if len(rows) > 1]


def test_rows_of_different_seeds_never_share_a_trial(plan_for) -> None:
    decision = plan_fusion(plan_for("ablation=group_size", "seeds=[0,1]"), slots=2)
    assert _rows(decision.units) == [(("5", "10", "20", "40"), 0), (("5", "10", "20", "40"), 1)]


def test_fuse_max_rows_caps_a_fused_trial(plan_for) -> None:
    decision = plan_fusion(plan_for("ablation=group_size", "fuse_max_rows=3"), slots=1)
    assert [unit.rows for unit in decision.units] == [("5", "10"), ("20", "40")]
    alone = plan_fusion(plan_for("ablation=group_size", "fuse_max_rows=1"), slots=1)
    assert [unit.rows for unit in alone.units] == [("5",), ("10",), ("20",), ("40",)]


@pytest.mark.parametrize("overrides, reason", [
    (("fuse=off",), "fuse=off"),
    (("scheduler=asha",), "scheduler=asha"),
    (("stages.cache=false",), "stages.cache=false"),
])
def test_fusion_is_off_where_it_cannot_apply(plan_for, overrides: tuple[str, ...], reason: str) -> None:
    decision = plan_fusion(plan_for("ablation=group_size", *overrides), slots=1)
    assert [unit.rows for unit in decision.units] == [("5",), ("10",), ("20",), ("40",)]
    assert len(decision.summary) == 1 and decision.summary[0].startswith(f"fusion: off ({reason}")


def test_only_rows_that_share_a_phase1_and_data_stream_fuse(plan_for) -> None:
    """sampling changes phase 1 (and the batches): no two rows fuse. decoupled_vs_joint: the joint row has no phase
    2 to share. per_phase: the rows that stop after phase 1 stay alone; full_lpt is the only phase-2 row."""
    for ablation in ("sampling", "decoupled_vs_joint", "per_phase", "prompt_length"):
        plan = plan_for(f"ablation={ablation}")
        decision = plan_fusion(plan, slots=1)
        assert decision.fused == [], ablation
        assert len(decision.units) == len(plan.trials)
        assert "no two rows share" in decision.summary[0]


def test_a_loss_grid_fuses_rows_that_differ_in_loss_knobs_only(plan_for) -> None:
    decision = plan_fusion(plan_for("ablation=loss"), slots=1)
    assert [unit.rows for unit in decision.units] == [("0.0,4.0,0.5", "0.0,8.0,0.5", "0.5,4.0,0.5", "0.5,8.0,0.5")]


def test_tune_configs_of_single_and_fused_units() -> None:
    assert TrialUnit(("5",), 1).tune_config() == {"row": "5", "seed": 1}
    assert TrialUnit(("5", "10"), 1).tune_config() == {"row": "5+10", "rows": ["5", "10"], "seed": 1}


def test_fuse_max_rows_below_one_is_refused(plan_for) -> None:
    with pytest.raises(ConfigError, match="fuse_max_rows=0"):
        plan_for("ablation=group_size", "fuse_max_rows=0")


def test_a_bad_fuse_value_is_refused_with_the_choices(plan_for) -> None:
    with pytest.raises(ConfigError, match="fuse"):
        plan_for("ablation=group_size", "fuse=sometimes")


def test_fusion_settings_do_not_change_the_sweeps_fingerprint(plan_for) -> None:
    """fuse and fuse_max_rows place the work, like resources.*: a resume may change them."""
    base = plan_for("ablation=group_size").fingerprint()
    assert plan_for("ablation=group_size", "fuse=off").fingerprint() == base
    assert plan_for("ablation=group_size", "fuse_max_rows=2").fingerprint() == base


def test_a_phase1_that_several_trials_start_from_gets_its_own_tune_run(plan_for) -> None:
    """(Nothing is trained in this module's stage root: every upstream stage is missing.)"""
    plan = plan_for("ablation=group_size")
    (key,) = plan.upstream_keys()
    assert list(shared_upstream(plan, plan_fusion(plan, slots=4).units, plan.upstream_keys())) == [key]
    assert list(shared_upstream(plan, plan_fusion(plan, slots=2).units, plan.upstream_keys())) == [key]


def test_a_phase1_that_one_trial_needs_is_trained_in_that_trial(plan_for) -> None:
    """One fused trial for every row, or one phase 1 per row (prompt_length): no Tune run of phase 1s before the
    trials, which would only hold every phase 2 back."""
    fused = plan_for("ablation=group_size")
    assert shared_upstream(fused, plan_fusion(fused, slots=1).units, fused.upstream_keys()) == {}
    per_row = plan_for("ablation=prompt_length")
    assert len(per_row.upstream_keys()) == 4
    assert shared_upstream(per_row, plan_fusion(per_row, slots=1).units, per_row.upstream_keys()) == {}


def test_an_optuna_search_trains_its_phase1_first(plan_for) -> None:
    """Its trials are sampled one by one, each on the base row's phase 1."""
    plan = plan_for("ablation=loss", "search=optuna")
    assert shared_upstream(plan, plan_fusion(plan, slots=1).units, plan.upstream_keys()) == plan.upstream_keys()
