"""The plan of a suite (no Ray, no training): the union of its tables' rows with the rows that run the same stages
merged into one, the plan printed before training, and dry_run=true that prints it and writes nothing."""
from __future__ import annotations

from collections import Counter

import pytest

from experiments.compose import compose_config
from lpt_core.config import ConfigError
from orchestration.execute.driver import run_sweep
from orchestration.plan.sweep_plan import build_plan

from .conftest import tiny_sweep

# the rows of the paper suite that another table's row already trains (on the demo and on Places-LT alike: the
# default configuration, and Tab. 1's VPT with instance sampling, which is Tab. 8's (a) with VPT)
MERGED = {"per_phase:vpt_ce_instance": "vpt_sampling:vpt_instance", "per_phase:full_lpt": "group_size:20",
          "decoupled_vs_joint:decoupled": "group_size:20", "query_function:phase1": "group_size:20",
          "topk:2": "group_size:20"}


@pytest.mark.parametrize("experiment, default_model", [("demo", "model_size:micro_m"),
                                                      ("places_lt", "model_size:vit_b")])
def test_rows_that_run_the_same_stages_are_one_row(experiment, default_model):
    overrides = ["ablation=paper", f"experiment={experiment}"] + (["data.root=/nowhere"] if experiment != "demo"
                                                                  else [])
    plan = build_plan(compose_config(overrides))
    assert {label: kept for label, kept in plan.aliases.items() if label != kept} == {
        **MERGED, default_model: "group_size:20"}
    assert len(plan.aliases) == 24 and len(plan.points) == 18 and len(plan.trials) == 18
    finals = Counter(trial.chain[-1].key for trial in plan.trials.values())
    assert set(finals.values()) == {1}  # no two trials end in the same stage
    stages = Counter(spec.stage for spec in {s for t in plan.trials.values() for s in t.chain})
    assert stages == {"phase1": 9, "phase2": 10, "joint": 1}
    # Tab. 8's (c) phase1_agcl is the phase 1 every default phase 2 starts from: its own trial, the same stage
    agcl = plan.trials["per_phase:phase1_agcl/seed=0"].chain
    assert [s.stage for s in agcl] == ["phase1"] and agcl[0].key == plan.trials["group_size:20/seed=0"].chain[0].key


def test_a_suite_is_not_searched():
    with pytest.raises(ConfigError, match="search=optuna: 'paper' is a suite of tables"):
        build_plan(compose_config(["ablation=paper", "search=optuna"]))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    """A cache of its own: the session's may hold backbones other tests pretrained (the plan counts what is not)."""
    lines: list[str] = []
    overrides = tiny_sweep(tmp_path, tmp_path / "cache", "ablation=paper", "seeds=[0,1]", "dry_run=true")
    assert run_sweep(compose_config(overrides), log=lines.append) == 0
    assert lines.pop(0) == "measuring step times here for the estimate ..."
    assert lines[0] == ("plan: suite 'paper' on demo, seeds [0, 1]: 7 tables, 24 rows, 19 distinct (rows that run "
                        "the same stages are trained once)")
    assert "  Fig. 4: the number k of matched group prompts (topk): 4 rows; trained as another table's row: " \
           "2 = group_size:20" in lines
    assert "trials: 38 (19 rows x 2 seed(s))" in lines
    stages = next(line for line in lines if line.startswith("stages: "))
    assert stages.startswith("stages: 44 distinct (20 phase1, 22 phase2, 2 joint), against 62 if each table ran "
                             "as its own sweep; the stage store holds 0, 44 to train; 4 demo backbone(s) to pretrain")
    compute = next(line for line in lines if line.startswith("compute: "))
    assert compute.startswith("compute: about ") and "on cpu (step times measured here" in compute
    assert lines[-1] == "dry_run=true: nothing was trained; no sweep folder, stage or run was written"
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "stages").exists()


def test_dry_run_of_a_single_ablation(tmp_path, demo_cache):
    lines: list[str] = []
    overrides = tiny_sweep(tmp_path, demo_cache, "ablation=group_size", "dry_run=true")
    assert run_sweep(compose_config(overrides), log=lines.append) == 0
    assert lines.pop(0) == "measuring step times here for the estimate ..."
    assert lines[0] == "plan: ablation 'group_size' on demo, seeds [0]: 4 rows"
    assert lines[1].startswith("stages: 5 distinct (1 phase1, 4 phase2); the stage store holds 0, 5 to train")
    assert not (tmp_path / "sweeps").exists()
