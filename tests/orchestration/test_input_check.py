"""A sweep whose inputs are missing fails before training, naming the key, where it looked and on which node, with
exit 2 and no sweep folder. On a cluster every node is asked: test_storage_check.py's simulated cluster, where one
node sees another filesystem, checks that the refusal names that node."""
from __future__ import annotations

import pytest

from experiments.compose import compose_config
from orchestration.cluster.input_check import distinct_inputs
from orchestration.plan.sweep_plan import build_plan

from .conftest import tiny_sweep


def test_distinct_inputs_leave_out_the_weights_the_driver_pretrains(tmp_path, demo_cache):
    plan = build_plan(compose_config(tiny_sweep(tmp_path, demo_cache, "ablation=group_size")))
    ((cfg, check_weights),) = distinct_inputs(plan)  # four rows, one dataset and backbone
    assert not check_weights and cfg.data.name == "demo"
    sizes = build_plan(compose_config(tiny_sweep(tmp_path, demo_cache, "ablation=model_size")))
    assert len(distinct_inputs(sizes)) == 3
    places = build_plan(compose_config(["ablation=group_size", "experiment=places_lt", "data.root=/data"]))
    assert [check for _, check in distinct_inputs(places)] == [True]


@pytest.mark.slow
def test_a_missing_data_root_is_refused_before_training(sweep_command, tmp_path):
    """The command a new user types with no data: exit 2 naming data.root and the backbone's weights, no folder."""
    done = sweep_command(["ablation=group_size", "experiment=places_lt", "data.root=/nonexistent", "resources.gpu=0",
                          "resources.cpu=1", f"sweep.root={tmp_path / 'sweeps'}", f"stages.root={tmp_path / 'stages'}",
                          "cluster.num_cpus=2"])
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: inputs missing before any training; nothing was trained or written: places_lt: "
                            "data.root='/nonexistent' is not a directory")
    assert "backbone.name='vit_base_patch16_224.augreg_in21k': its weights" in error
    assert "fusion:" not in done.stdout and "Traceback" not in done.stderr
    assert not (tmp_path / "sweeps" / "group_size-places_lt").exists() and not (tmp_path / "stages").exists()
