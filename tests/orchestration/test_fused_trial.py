"""A fused trial without Ray: lpt_trainable on two fused rows of the tiny demo, one of which diverges. The other
row finishes with its own stage folder and MLflow run; the diverging row is recorded failed alone, and the driver
splits the trial's final result into one outcome per row (complete / failed) as it does after a Tune run."""
from __future__ import annotations

import dataclasses
import json

import pytest
from mlflow.tracking import MlflowClient

from experiments.compose import compose_config
from orchestration.execute import trainable
from orchestration.execute.stage_store import StageStore
from orchestration.execute.tuning import _outcomes
from orchestration.plan.fusion import TrialUnit
from orchestration.plan.sweep_plan import build_plan
from orchestration.plan.trial_specs import TrialSpec
from orchestration.tracking.registry import RunRegistry

from .conftest import tiny_sweep


@pytest.fixture
def fused_context(tmp_path, demo_cache):
    """The sweep context of group_size rows 5 and 10, row 10 with a learning rate that makes its loss NaN."""
    plan = build_plan(compose_config(tiny_sweep(tmp_path, demo_cache, "ablation=group_size",
                                                "ablation.values=[5,10]")))
    plan.ensure_backbones(log=lambda message: None)
    good, bad = plan.trials["5/seed=0"], plan.trials["10/seed=0"]
    bad = TrialSpec.build(bad.row, bad.seed, bad.config.with_overrides({"phase2.base_lr": 1e30}), None, None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunRegistry(uri, "demo").parent_run(plan.name, {})
    context = dataclasses.replace(plan.context(uri, parent), trials={good.trial_id: good, bad.trial_id: bad})
    return context, good, bad


def test_a_diverging_fused_row_fails_alone_and_the_other_finishes(fused_context, tmp_path, monkeypatch):
    context, good, bad = fused_context
    reports: list[dict] = []
    monkeypatch.setattr(trainable.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    config = {"trial": TrialUnit((good.row, bad.row), 0).tune_config()}

    trainable.lpt_trainable(config, context)

    final = reports[-1]
    rows = json.loads(final[trainable.FUSED_ROWS])
    assert rows[good.trial_id]["trial_complete"] is True and not final["trial_complete"]
    assert rows[bad.trial_id]["trial_failed"].startswith("NonFiniteLossError: phase2 epoch 0")
    outcomes = {o.ident: o for o in _outcomes(context, config, final, None, terminal=True)}
    assert {ident: o.status for ident, o in outcomes.items()} == {good.trial_id: "complete", bad.trial_id: "failed"}
    assert outcomes[good.trial_id].config == {"row": "5", "seed": 0}  # what a resume's rerun trains alone
    assert outcomes[good.trial_id].metrics["stage_key"] == good.chain[-1].key

    store = StageStore(context.stage_root)
    assert store.is_done(good.chain[-1].key) and not store.is_done(bad.chain[-1].key)
    assert (store.folder(good.chain[-1].key) / "predictions.parquet").is_file()
    client = MlflowClient(context.tracking.uri)
    experiment = client.get_experiment_by_name("demo").experiment_id
    good_run, bad_run = (client.search_runs([experiment], f"tags.`lpt.stage_key` = '{trial.chain[-1].key}'")[0]
                         for trial in (good, bad))
    assert good_run.info.status == "FINISHED" and bad_run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(good_run.info.run_id, "epoch")] == [0, 1, 2]
    assert "NonFiniteLossError" in bad_run.data.tags["lpt.error"]
    # the first row's epochs reached Tune as progress, without a checkpoint (each row's are in the stage store)
    assert [r["epoch"] for r in reports[:-1]] == [0, 1, 2] and all(r["stage"] == "phase2" for r in reports[:-1])

