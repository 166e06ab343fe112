"""Shared storage on several nodes, checked before any training: a node with another view of the sweep's paths
stops the sweep naming the node and the path (on the same cluster, the input check that asks every node for the
data names it too: orchestration/cluster/input_check.py); two sweeps on two nodes that need the same phase 1 at
the same time train it once (the stage store's flock), after the check passed on every node.

The clusters are ray.cluster_utils.Cluster instances on this host, in subprocesses (each driver needs its own
process); a node started with LPT_TEST_STORAGE_VIEW=<dir> sees every checked path under <dir> (test-only)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.cluster.storage_check import PROBE_PREFIX, TEST_VIEW_ENV, read_probes

from .conftest import REPO, mlflow_runs, stage_runs, steps, tiny_sweep


def test_read_probes_reports_what_a_node_cannot_see(tmp_path, monkeypatch):
    good, other = tmp_path / "good", tmp_path / "other"
    good.mkdir()
    (good / "probe").write_text("token")
    (good / "stale").write_text("old token")
    probes = {"sweep.root": (str(good / "probe"), "token"), "stages.root": (str(good / "stale"), "token"),
              "data": (str(tmp_path / "absent" / "probe"), "token")}
    answer = read_probes(probes)
    assert answer["problems"] == {
        "stages.root": f"{good / 'stale'} holds another probe (another filesystem is mounted there)",
        "data": f"cannot read {tmp_path / 'absent' / 'probe'} (No such file or directory)"}
    monkeypatch.setenv(TEST_VIEW_ENV, str(other))  # this "node" sees every path under `other`
    assert set(read_probes({"sweep.root": (str(good / "probe"), "token")})["problems"]) == {"sweep.root"}
    (other / str(good / "probe").lstrip("/")).parent.mkdir(parents=True)
    (other / str(good / "probe").lstrip("/")).write_text("token")
    assert read_probes({"sweep.root": (str(good / "probe"), "token")})["problems"] == {}


OTHER_VIEW_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from experiments.compose import compose_config
from orchestration.cluster.input_check import MissingInputError, check_inputs
from orchestration.cluster.storage_check import TEST_VIEW_ENV, StorageError, check_shared_storage
from orchestration.execute.driver import run_sweep
from orchestration.plan.sweep_plan import build_plan

sweep, inputs, other_view = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
roots = json.loads(sys.argv[4])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_name": "head"})
cluster.add_node(num_cpus=1, node_name="good")
elsewhere = cluster.add_node(num_cpus=1, node_name="elsewhere", env_vars={TEST_VIEW_ENV: other_view})
cluster.wait_for_nodes()
try:
    run_sweep(compose_config(sweep + ["cluster=ray", f"cluster.address={cluster.address}"]))
    print("STORAGE NOT REFUSED", flush=True)
except StorageError as err:
    print("STORAGE REFUSED:", err, flush=True)
if not ray.is_initialized():
    ray.init(address=cluster.address)
plan = build_plan(compose_config(inputs))
try:
    check_inputs(plan, log=lambda line: None)
    print("INPUTS NOT REFUSED", flush=True)
except MissingInputError as err:
    print("INPUTS REFUSED:", err, flush=True)
cluster.remove_node(elsewhere)
check_shared_storage(roots)  # the same checks pass on the nodes that see the storage
lines = []
check_inputs(plan, log=lines.append)
print("INPUTS AFTER:", lines[0], flush=True)
"""


@pytest.mark.slow
def test_a_node_with_another_view_is_named_by_the_storage_check_and_the_input_check(sweep_overrides, tmp_path,
                                                                                     demo_cache):
    """One 3-node simulated cluster where the node `elsewhere` sees another (empty) filesystem: the sweep stops
    before training naming that node and the paths it cannot read; the input check asks every node, and its refusal
    names that node and the missing split list; without that node, both checks pass on the 2 nodes left."""
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[5]")
    folder, stages, view = tmp_path / "sweeps" / "group_size-demo", tmp_path / "stages", tmp_path / "view"
    roots = {"sweep.root": str(folder), "stages.root": str(stages)}
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("".join(f"img/{i}.png {i % 3}\n" for i in range(12)))
    (data / "test.txt").write_text("".join(f"img/t{i}.png {i % 3}\n" for i in range(6)))
    weights = tmp_path / "vit.safetensors"  # on the shared filesystem: every node finds it
    weights.write_bytes(b"weights")
    demo_options = [o for o in tiny_sweep(tmp_path, demo_cache) if not o.startswith("++data.options.")]
    inputs = [*demo_options, "ablation=group_size", "data.name=lt_list", f"data.root={data}",
              "++data.options.train_list=train.txt", "++data.options.test_list=test.txt",
              "++data.options.check_files=false", f"backbone.weights_file={weights}"]
    proc = subprocess.run([sys.executable, "-c", OTHER_VIEW_SCRIPT, json.dumps(overrides), json.dumps(inputs),
                           str(view), json.dumps(roots)], cwd=REPO, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
             if line.startswith(("STORAGE", "INPUTS"))}

    refusal = lines["STORAGE REFUSED"]
    assert "node elsewhere (" in refusal and "node good" not in refusal and "node head" not in refusal
    assert f"sweep.root: cannot read {folder}/{PROBE_PREFIX}" in refusal
    assert f"stages.root: cannot read {stages}/{PROBE_PREFIX}" in refusal
    assert "seen by all 2 nodes" in proc.stdout  # head and good, once `elsewhere` is gone
    assert not (folder / "plan.json").exists()  # stopped before the plan, the demo backbone and any trial
    assert list(stages.iterdir()) == []  # no stage started, probes removed
    assert not list(folder.glob(f"{PROBE_PREFIX}*"))

    missing = lines["INPUTS REFUSED"]
    assert missing.count("node ") == 1 and "node elsewhere (" in missing
    assert f"lt_list: data.options.train_list file not found: {view}{data / 'train.txt'}" in missing
    assert lines["INPUTS AFTER"] == "inputs: 1 distinct dataset/backbone pair(s) found on all 2 nodes"


TWO_SWEEPS_SCRIPT = r"""
import json, subprocess, sys, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

sweep_a, sweep_b, events, logs = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_name": "head"})
for name in ("node-a", "node-b"):
    cluster.add_node(num_cpus=1, node_name=name)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
address = [f"cluster=ray", f"cluster.address={cluster.address}"]
def start(overrides, name):
    return subprocess.Popen([sys.executable, "orchestration/sweep.py", *overrides, *address],
                            stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT)
def until(condition, what, procs):
    deadline = time.monotonic() + 600
    while not condition():
        assert all(p.poll() is None for p in procs), f"a driver exited before {what}"
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.2)
a = start(sweep_a, "a")
until(lambda: (events / "phase1.5.seed0.epoch0").exists(), "phase-1 epoch-0 event of sweep A", [a])
b = start(sweep_b, "b")  # needs the phase 1 that A trains (and holds) right now
until(lambda: ray.available_resources().get("CPU", 0) == 0, "B's trial running beside A's", [a, b])
print("BOTH RUNNING", flush=True)
(events / "release").write_text("")
print("RC", a.wait(timeout=600), b.wait(timeout=600), flush=True)
"""


@pytest.mark.slow
def test_two_sweeps_on_two_nodes_train_their_shared_phase1_once(sweep_overrides, tmp_path):
    events = tmp_path / "events"
    shared = [f"debug.event_dir={events}", "debug.fail_stage=phase1"]
    sweep_a = sweep_overrides("ablation=group_size", "ablation.values=[5]", *shared, "debug.hold_at_epoch=0")
    sweep_b = sweep_overrides("ablation=group_size", "ablation.values=[10]", "sweep.name=group_size-b", *shared)
    proc = subprocess.run([sys.executable, "-c", TWO_SWEEPS_SCRIPT, json.dumps(sweep_a), json.dumps(sweep_b),
                           str(events), str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in "ab" if (tmp_path / f"{name}.log").exists()}
    assert "BOTH RUNNING" in proc.stdout and "RC 0 0" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-3000:] + "".join(log[-3000:] for log in logs.values())
    for log in logs.values():
        assert "seen by all 3 nodes" in log
    assert "phase1 reused from the stage store" in logs["b"]
    assert len(list((tmp_path / "stages").glob("phase1-*"))) == 1
    assert sorted(p.name for p in events.glob("phase1.*")) == ["phase1.5.seed0.epoch0", "phase1.5.seed0.epoch1"]
    client_a, runs_a = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    client_b, runs_b = mlflow_runs(tmp_path / "sweeps", "group_size-b")
    (phase1,) = stage_runs(runs_a, "phase1")
    assert stage_runs(runs_b, "phase1") == [] and steps(client_a, phase1) == [0, 1]
    for client, runs in ((client_a, runs_a), (client_b, runs_b)):
        (phase2,) = stage_runs(runs, "phase2")
        assert steps(client, phase2) == [0, 1, 2]
    for name in ("group_size-demo", "group_size-b"):
        assert json.loads(Path(tmp_path / "sweeps" / name / "state.json").read_text())["status"] == "complete"
