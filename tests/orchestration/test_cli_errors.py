"""Bad input at the command line: a clear message naming the key / address / path, a non-zero exit, and nothing
of an earlier sweep touched."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .conftest import REPO, run_sweep_cli

pytestmark = pytest.mark.slow


def _earlier_sweep(root, name="group_size-demo"):
    folder = root / "sweeps" / name
    folder.mkdir(parents=True)
    plan = {"fingerprint": "0123456789abcdef", "name": name, "ablation": "group_size", "experiment": "demo",
            "axis": "m", "rows": ["5", "10", "20", "40"], "seeds": [0], "search": "grid", "metric": "acc",
            "stage_root": str(root / "stages")}  # the keys an earlier version wrote (no content: old two-hash case)
    files = {"plan.json": json.dumps(plan), "state.json": '{"status": "complete"}',
             "trials.json": "[]"}
    for file, text in files.items():
        (folder / file).write_text(text)
    return folder, files


def _unchanged(folder, files) -> bool:
    return {p.name: p.read_text() for p in folder.iterdir() if p.suffix == ".json"} == files


@pytest.mark.parametrize("extra, code, needle", [
    (["ablation=group_sise"], 2, "error: ablation='group_sise': no such ablation; did you mean 'group_size'?"),
    (["ablation=nonexistent"], 2, "error: ablation='nonexistent': no such ablation; valid options: group_size, "),
    (["ablation=group_size", "experiment=places_lp"], 2,
     "error: experiment='places_lp': no such experiment; did you mean 'places_lt'?"),
    (["ablation=group_size", "experiment=places_lt"], 2, "data.root"),
    (["ablation=group_size", "prompt.top_k=50"], 2, "prompt.top_k=50"),
    (["ablation=group_size", "'ablation.values=[7]'"], 2, "['7'] are not rows"),
    (["ablation=group_size", "search=optuna"], 2, "no continuous space"),
    (["ablation=group_size", "resources.cpu=0"], 2, "resources"),
])
def test_bad_input_is_refused_before_anything_runs(sweep_command, sweep_overrides, tmp_path, extra, code, needle):
    folder, files = _earlier_sweep(tmp_path)
    extra = [e.strip("'") for e in extra]
    tiny_demo = not any(e.startswith("experiment=") for e in extra)  # the demo's overrides fit only the demo
    overrides = sweep_overrides(*extra) if tiny_demo else [*extra, f"sweep.root={tmp_path / 'sweeps'}",
                                                              f"stages.root={tmp_path / 'stages'}"]
    result = sweep_command(overrides)
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert needle in result.stderr + result.stdout
    assert _unchanged(folder, files)


@pytest.mark.parametrize("override, message", [
    ("+model.not_a_key=3", "override 'model.not_a_key': no config key 'model'; 'model' is a config group, "
                           "chosen with model=<name>, not a key"),
    ("+data.not_a_key=1", "override 'data.not_a_key': no config key 'data.not_a_key'; valid keys under data: "
                          "name, root, options, img_size, resize_size, crop_min_scale, num_workers, "
                          "eval_batch_size, eval_split, download, skip_bad_images, cache_dir"),
    ("resourses.cpu=1", "override 'resourses.cpu': no config key 'resourses'; did you mean 'resources'?"),
    ("+resourses.cpu=1", "override 'resourses.cpu': no config key 'resourses'; did you mean 'resources'?"),
    ("prompt.pool_sise=3", "override 'prompt.pool_sise': no config key 'prompt.pool_sise'; "
                           "did you mean 'prompt.pool_size'?"),
])
def test_both_command_lines_refuse_an_unknown_key_alike_before_any_work(tmp_path, override, message):
    """single_run.py and sweep.py get the same command line; both stop at the same check, before Hydra, Ray or data."""
    args = ["ablation=group_size", "stage=phase1", f"workdir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"sweep.root={tmp_path / 'sweeps'}", f"stages.root={tmp_path / 'stages'}", override]
    results = {script: subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True,
                                      text=True, timeout=300)
               for script in ("experiments/single_run.py", "orchestration/sweep.py")}
    for script, result in results.items():
        assert result.returncode == 2, (script, result.stdout[-2000:], result.stderr[-2000:])
        assert [line for line in result.stderr.splitlines() if "error" in line.lower()] == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []  # no run folder, demo cache, sweep folder or stage


# runs a command line's script as `python <script> <args>` does, and says with its exit code which of the heavy
# libraries it had imported when it exited
_IMPORTED_AT_EXIT = """
import runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print("imported:", sorted(m for m in ("torch", "timm", "ray", "mlflow") if m in sys.modules))
"""


@pytest.mark.parametrize("script", ["experiments/single_run.py", "orchestration/sweep.py"])
def test_an_unknown_key_is_refused_before_the_heavy_imports(tmp_path, script):
    """The refusal comes at once: neither command line has imported torch, timm, Ray or MLflow (seconds) when it
    stops at an unknown key."""
    result = subprocess.run([sys.executable, "-c", _IMPORTED_AT_EXIT, str(REPO / script), "ablation=group_size",
                             f"workdir={tmp_path / 'run'}", "prompt.pool_sise=3"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "did you mean 'prompt.pool_size'?" in result.stderr
    assert "imported: []" in result.stdout


def test_a_sweep_with_another_configuration_under_the_same_name_is_refused(sweep_command, sweep_overrides, tmp_path):
    folder, files = _earlier_sweep(tmp_path)
    result = sweep_command(sweep_overrides("ablation=group_size", "resume=true"))
    assert result.returncode == 2 and "different configuration" in result.stderr
    assert _unchanged(folder, files)


def test_a_damaged_plan_file_is_refused_and_left_alone(sweep_command, sweep_overrides, tmp_path):
    folder = tmp_path / "sweeps" / "group_size-demo"
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text('{"fingerprint": "0123')
    result = sweep_command(sweep_overrides("ablation=group_size", "resume=true"))
    assert result.returncode == 2 and f"{folder / 'plan.json'}: unreadable" in result.stderr
    assert (folder / "plan.json").read_text() == '{"fingerprint": "0123'


def test_unreachable_cluster_fails_fast_and_writes_nothing(sweep_overrides, tmp_path):
    start = time.monotonic()
    result = run_sweep_cli(sweep_overrides("ablation=group_size", "cluster=ray", "cluster.address=127.0.0.1:9",
                                           "cluster.connect_timeout_s=3"))
    assert result.returncode == 2 and "127.0.0.1:9" in result.stderr and "cannot reach" in result.stderr
    assert time.monotonic() - start < 120  # a timeout, not ray.init's minutes of retries
    folder = tmp_path / "sweeps" / "group_size-demo"
    assert not (folder / "plan.json").exists() and not (folder / "state.json").exists()


def test_unwritable_storage_is_refused(sweep_command, sweep_overrides, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = sweep_command([*sweep_overrides("ablation=group_size"), f"sweep.root={blocker}/sweeps"])
    assert result.returncode == 2 and "cannot write the sweep folder" in result.stderr
    assert blocker.read_text() == "not a folder"
