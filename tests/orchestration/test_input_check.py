"""A sweep whose inputs are missing fails before training, naming the key, where it looked and on which node, with
exit 2 and no sweep folder; on a cluster every node is asked (orchestration/cluster/input_check.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from experiments.compose import compose_config
from orchestration.cluster.input_check import distinct_inputs
from orchestration.plan.sweep_plan import build_plan

from .conftest import REPO, tiny_sweep


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


# the "elsewhere" node runs with LPT_TEST_STORAGE_VIEW: it sees data.root under another (empty) folder
NODE_VIEW_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from experiments.compose import compose_config
from orchestration.cluster.input_check import MissingInputError, check_inputs
from orchestration.cluster.storage_check import TEST_VIEW_ENV
from orchestration.plan.sweep_plan import build_plan

overrides, other_view = json.loads(sys.argv[1]), sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_name": "head"})
cluster.add_node(num_cpus=1, node_name="good")
elsewhere = cluster.add_node(num_cpus=1, node_name="elsewhere", env_vars={TEST_VIEW_ENV: other_view})
cluster.wait_for_nodes()
ray.init(address=cluster.address)
plan = build_plan(compose_config(overrides))
try:
    check_inputs(plan, log=lambda line: None)
    print("NOT REFUSED", flush=True)
except MissingInputError as err:
    print("REFUSED:", err, flush=True)
cluster.remove_node(elsewhere)
lines = []
check_inputs(plan, log=lines.append)
print("AFTER:", lines[0], flush=True)
"""


@pytest.mark.slow
def test_every_node_is_asked_and_the_node_without_the_data_is_named(tmp_path, demo_cache):
    """A 3-node simulated cluster where one node sees another filesystem (test-only view): the split lists are
    missing there alone, and the refusal names that node and the file; without it, the check passes on all."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("".join(f"img/{i}.png {i % 3}\n" for i in range(12)))
    (data / "test.txt").write_text("".join(f"img/t{i}.png {i % 3}\n" for i in range(6)))
    weights = tmp_path / "vit.safetensors"  # on the shared filesystem: every node finds it
    weights.write_bytes(b"weights")
    demo_options = [o for o in tiny_sweep(tmp_path, demo_cache) if not o.startswith("++data.options.")]
    overrides = [*demo_options, "ablation=group_size", "data.name=lt_list", f"data.root={data}",
                 "++data.options.train_list=train.txt", "++data.options.test_list=test.txt",
                 "++data.options.check_files=false", f"backbone.weights_file={weights}"]
    done = subprocess.run([sys.executable, "-c", NODE_VIEW_SCRIPT, json.dumps(overrides), str(tmp_path / "view")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
             if line.startswith(("REFUSED", "NOT REFUSED", "AFTER"))}
    assert "REFUSED" in lines, done.stdout[-3000:] + done.stderr[-3000:]
    refusal = lines["REFUSED"]
    assert refusal.count("node ") == 1 and "node elsewhere (" in refusal
    assert f"lt_list: data.options.train_list file not found: {tmp_path / 'view'}{data / 'train.txt'}" in refusal
    assert lines["AFTER"] == "inputs: 1 distinct dataset/backbone pair(s) found on all 2 nodes"
