"""Sweep plans built from the composed config (no Ray, no training) and the driver's folder guards."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from experiments.compose import compose_config
from lpt_core.config import ConfigError
from orchestration.execute.driver import SweepError, _check_existing, _prepare_folder, sweep_lock
from orchestration.plan.sweep_plan import SweepPlan, build_plan
from orchestration.plan.record import PlanRecord
from orchestration.plan.trial_specs import tune_values
from lpt_core.stages import stage_chain

DEMO_MICRO = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3)  # experiments/conf/model/micro.yaml


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plan")


@pytest.fixture(scope="module")
def weights(root: Path) -> Path:
    """A micro ViT weights file: with backbone.weights_file set, the demo skips its backbone pretraining."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **DEMO_MICRO)
    path = root / "micro_vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def plan_for(root: Path, weights: Path):
    def build(*overrides: str) -> SweepPlan:
        cfg = compose_config([f"sweep.root={root}/sweeps", f"stages.root={root}/stages",
                              f"backbone.weights_file={weights}", *overrides])
        return build_plan(cfg)

    return build


@pytest.fixture(scope="module")
def group_size(plan_for) -> SweepPlan:
    return plan_for("ablation=group_size")


def test_group_size_plan(group_size: SweepPlan, weights: Path) -> None:
    assert group_size.name == "group_size-demo" and group_size.experiment == "demo"
    assert group_size.points == {str(m): {"prompt.pool_size": m} for m in (5, 10, 20, 40)}
    assert [(t.row, t.seed) for t in group_size.trials.values()] == [("5", 0), ("10", 0), ("20", 0), ("40", 0)]
    assert group_size.base.backbone.weights_file == str(weights)
    assert not group_size.optuna and group_size.pretrain is not None


def test_fingerprint_is_stable_and_follows_the_seeds(plan_for, group_size: SweepPlan) -> None:
    assert plan_for("ablation=group_size").fingerprint() == group_size.fingerprint()
    two_seeds = plan_for("ablation=group_size", "seeds=[0,1]")
    assert two_seeds.fingerprint() != group_size.fingerprint()
    assert len(two_seeds.trials) == 8
    assert plan_for("ablation=group_size", "stages.cache=false").fingerprint() != group_size.fingerprint()


def test_sweep_name_override(plan_for) -> None:
    assert plan_for("ablation=group_size", "sweep.name=mine").name == "mine"


def test_upstream_keys(plan_for, group_size: SweepPlan) -> None:
    keys = group_size.upstream_keys()
    assert len(keys) == 1 and next(iter(keys)).startswith("phase1-")  # every m shares one phase 1
    assert len(plan_for("ablation=group_size", "seeds=[0,1]").upstream_keys()) == 2  # one per seed
    assert len(plan_for("ablation=prompt_length").upstream_keys()) == 4
    assert plan_for("ablation=group_size", "stages.cache=false").upstream_keys() == {}
    assert plan_for("ablation=per_phase").upstream_keys() != {}


def test_ablation_values_narrow_the_rows(plan_for) -> None:
    plan = plan_for("ablation=group_size", "ablation.values=[20,5]")
    assert list(plan.points) == ["20", "5"]


def test_unknown_ablation_values_are_named(plan_for) -> None:
    with pytest.raises(ConfigError, match=r"\['7', '99'\] are not rows of 'group_size'"):
        plan_for("ablation=group_size", "ablation.values=[5,7,99]")


def test_optuna_needs_a_space(plan_for) -> None:
    with pytest.raises(ConfigError, match="search=optuna: ablation 'group_size' has no continuous space"):
        plan_for("ablation=group_size", "search=optuna")


def test_optuna_refuses_ablation_values(plan_for) -> None:
    with pytest.raises(ConfigError, match="ablation.values.*search=optuna"):
        plan_for("ablation=loss", "search=optuna", "ablation.values=[x]")


def test_optuna_loss_plan(plan_for) -> None:
    plan = plan_for("ablation=loss", "search=optuna")
    assert plan.optuna and len(plan.upstream_keys()) == 1


def test_missing_ablation_is_a_config_error(weights: Path) -> None:
    with pytest.raises(ConfigError, match="ablation"):
        build_plan(compose_config([f"backbone.weights_file={weights}"]))


def test_bad_row_is_named(plan_for) -> None:
    with pytest.raises(ConfigError, match=r"row '5'.*prompt\.top_k"):
        plan_for("ablation=group_size", "prompt.top_k=8")  # k=8 > m=5


# ---------------------------------------------------------------------------------------------- driver guards

PROBE = ("import fcntl, sys\nhandle = open(sys.argv[1], 'a+')\n"
         "try:\n    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n")


def test_sweep_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    with sweep_lock(tmp_path):
        with pytest.raises(SweepError, match=f"{tmp_path}.*in use by pid {os.getpid()}"):
            with sweep_lock(tmp_path):
                pass
        other = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / ".lock")], timeout=30)
        assert other.returncode == 3
    with sweep_lock(tmp_path):  # released: usable again
        pass


def write_existing(folder: Path, fingerprint: str, status: str | None) -> None:
    """A sweep folder as an earlier version left it: plan.json with the fingerprint but not its content."""
    folder.mkdir(parents=True, exist_ok=True)
    PlanRecord(fingerprint, "x", "group_size", "demo", "m", ["5"], [0], "grid", "acc", str(folder)).write(folder)
    if status is not None:
        (folder / "state.json").write_text(json.dumps({"status": status}))


def test_check_existing(group_size: SweepPlan, tmp_path: Path) -> None:
    record = group_size.record()
    assert _check_existing(group_size, tmp_path / "new", record) == "new"
    write_existing(tmp_path / "done", group_size.fingerprint(), "complete")
    assert _check_existing(group_size, tmp_path / "done", record) == "complete"
    write_existing(tmp_path / "half", group_size.fingerprint(), "incomplete")
    with pytest.raises(SweepError, match="unfinished; pass resume=true"):
        _check_existing(group_size, tmp_path / "half", record)
    resuming = dataclasses.replace(group_size, settings=dataclasses.replace(group_size.settings, resume=True))
    assert _check_existing(resuming, tmp_path / "half", record) == "resume"
    write_existing(tmp_path / "nostate", group_size.fingerprint(), None)
    assert _check_existing(resuming, tmp_path / "nostate", record) == "resume"


def test_check_existing_refuses_a_changed_configuration(group_size: SweepPlan, tmp_path: Path) -> None:
    write_existing(tmp_path, "0123456789abcdef", "complete")
    resuming = dataclasses.replace(group_size, settings=dataclasses.replace(group_size.settings, resume=True))
    with pytest.raises(SweepError, match="different configuration.*0123456789abcdef"):
        _check_existing(resuming, tmp_path, group_size.record())


def resuming_with_tracking(plan: SweepPlan, **tracking) -> SweepPlan:
    settings = dataclasses.replace(plan.settings, resume=True,
                                   tracking=dataclasses.replace(plan.settings.tracking, **tracking))
    return dataclasses.replace(plan, settings=settings)


def test_a_resume_must_track_where_the_sweep_began(group_size: SweepPlan, tmp_path: Path) -> None:
    """Another store or experiment on resume would split the sweep's runs between two places: refused, naming the
    key and both values, with plan.json untouched; the same settings resume."""
    group_size.record().write(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"status": "incomplete"}))
    before = (tmp_path / "plan.json").read_bytes()
    default_uri = group_size.tracking_uri()
    assert default_uri == f"sqlite:///{Path(group_size.settings.sweep.root).resolve() / 'mlflow.db'}"
    same = resuming_with_tracking(group_size)
    assert _check_existing(same, tmp_path, same.record()) == "resume"
    elsewhere = resuming_with_tracking(group_size, uri="http://mlflow.example:5000")
    with pytest.raises(SweepError, match=rf"tracking.uri='{default_uri}' -> 'http://mlflow.example:5000'; "
                                         "nothing was changed"):
        _check_existing(elsewhere, tmp_path, elsewhere.record())
    renamed = resuming_with_tracking(group_size, experiment="other")
    with pytest.raises(SweepError, match=r"tracking.experiment='demo' -> 'other'"):
        _check_existing(renamed, tmp_path, renamed.record())
    assert (tmp_path / "plan.json").read_bytes() == before


def test_plan_json_keeps_the_store_without_its_credentials(group_size: SweepPlan) -> None:
    secret = resuming_with_tracking(group_size, uri="https://alice:hunter2@mlflow.example/?token=abc")
    assert secret.record().tracking_uri == "https://***@mlflow.example/?token=***"
    assert secret.tracking_uri() == "https://alice:hunter2@mlflow.example/?token=abc"


def with_root(plan: SweepPlan, root: Path, **settings) -> SweepPlan:
    location = dataclasses.replace(plan.settings.sweep, root=str(root))
    return dataclasses.replace(plan, settings=dataclasses.replace(plan.settings, sweep=location, **settings))


def test_prepare_folder_creates_it(group_size: SweepPlan, tmp_path: Path) -> None:
    folder = _prepare_folder(with_root(group_size, tmp_path / "a" / "b"))
    assert folder == (tmp_path / "a" / "b" / "group_size-demo").resolve() and folder.is_dir()
    assert list(folder.iterdir()) == []


def test_prepare_folder_refuses_a_root_under_a_file(group_size: SweepPlan, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(SweepError, match=r"sweep\.root=.*afile/sub.*cannot write"):
        _prepare_folder(with_root(group_size, tmp_path / "afile" / "sub"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (the test above covers root)")
def test_prepare_folder_refuses_an_unwritable_root(group_size: SweepPlan, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(SweepError, match="cannot write"):
            _prepare_folder(with_root(group_size, locked))
    finally:
        locked.chmod(0o700)


def test_prepare_folder_refuses_low_disk(group_size: SweepPlan, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**28, 2**28))  # 0.25 GiB free
    with pytest.raises(SweepError, match=r"only 0\.25 GiB free.*min_free_disk_gb=1"):
        _prepare_folder(with_root(group_size, tmp_path))
    _prepare_folder(with_root(group_size, tmp_path, min_free_disk_gb=0.1))


def test_relative_paths_become_absolute_before_trials_change_folder(plan_for, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    plan = plan_for("ablation=group_size", "data.cache_dir=outputs/cache")
    assert plan.base.data.cache_dir == str(tmp_path / "outputs" / "cache")


# ---------------------------------------------------------------------------------------------- typed trials

def test_each_trial_is_built_once_as_a_typed_config(plan_for) -> None:
    plan = plan_for("ablation=group_size", "seeds=[0,1]")
    assert list(plan.trials) == [f"{m}/seed={s}" for m in (5, 10, 20, 40) for s in (0, 1)]
    trial = plan.trials["10/seed=1"]
    assert (trial.row, trial.seed) == ("10", 1)
    assert trial.config == plan.base.with_overrides({"prompt.pool_size": 10, "seed": 1})
    assert trial.chain == stage_chain(trial.config)
    per_phase = plan_for("ablation=per_phase")  # rows that stop after phase 1 (run_until) run one stage
    assert {t.row: [s.stage for s in t.chain] for t in per_phase.trials.values()} == {
        "linear_probe": ["phase1"], "vpt_ce_instance": ["phase1"], "phase1_ce": ["phase1"],
        "phase1_agcl": ["phase1"], "full_lpt": ["phase1", "phase2"]}


def test_trials_of_a_sweep_without_the_stage_cache_are_salted_by_sweep_and_trial(plan_for) -> None:
    plan = plan_for("ablation=group_size", "stages.cache=false", "sweep.name=s")
    trial = plan.trials["5/seed=0"]
    assert trial.chain == stage_chain(trial.config, salt="s/5/seed=0")


def test_trials_receive_their_spec_unchanged_through_the_context(group_size: SweepPlan) -> None:
    context = pickle.loads(pickle.dumps(group_size.context("sqlite:///m.db", "parent")))  # as Ray ships it
    assert context.trials == group_size.trials and context.tracking.uri == "sqlite:///m.db"
    values = tune_values({"trial": {"row": "20", "seed": 0}})
    assert context.trial_id(values) == "20/seed=0" and context.trial(values) == group_size.trials["20/seed=0"]


def test_an_optuna_trial_applies_its_sampled_values_and_validates_them(plan_for) -> None:
    plan = plan_for("ablation=loss", "search=optuna")
    assert list(plan.trials) == ["base/seed=0"]
    context = plan.context("sqlite:///m.db", "parent")
    values = {"phase2.loss.eta": 0.25, "phase2.loss.lambda_neg_ib": 6.0, "phase2.loss.lambda_pos_ib": 1.5, "seed": 0}
    trial = context.trial(values)
    assert trial.trial_id == context.trial_id(values) == "eta=0.25, lambda_neg_ib=6, lambda_pos_ib=1.5/seed=0"
    assert trial.config == plan.base.with_overrides(values)
    assert trial.chain[0] == plan.trials["base/seed=0"].chain[0]  # every sampled trial starts from one phase 1
    with pytest.raises(ConfigError, match="phase2.loss.eta"):
        context.trial({**values, "phase2.loss.eta": -1.0})


def test_plan_json_is_read_back_into_its_record(group_size: SweepPlan, tmp_path: Path) -> None:
    record = group_size.record()
    record.write(tmp_path)
    assert PlanRecord.read(tmp_path) == record
    assert record.fingerprint == group_size.fingerprint() and record.content == group_size.content()
    assert (record.rows, record.search, record.tracking_experiment) == (["5", "10", "20", "40"], "grid", "demo")
