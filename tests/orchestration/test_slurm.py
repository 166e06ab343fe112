"""The SLURM launcher: the script it writes (run with stand-ins for srun, scontrol, ray and python, so the two-node
branch runs on one host), its arguments, and sweeps run through it on a real single-node SLURM (Debian's
slurm-wlm and munge, started as root in the test's own folder): one sweep cancelled and submitted again, then
requeued by its own time-limit signal, finishing with no MLflow run or step twice."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from orchestration.cluster.slurm import Launch, LaunchError, main, node_problems, render_script, submit, sweep_status, \
    time_limit_s

from .conftest import REPO, mlflow_runs, stage_runs, steps
from .local_slurm import LocalSlurm, missing_binaries

SWEEP = "group_size-demo"


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]


def test_directives_declare_the_allocation_and_the_requeue() -> None:
    launch = Launch(nodes=2, gpus_per_node=4, cpus_per_node=16, time="2-00:00:00", partition="gpu",
                    sbatch_options=["--account=proj", "--mem=0"], overrides=["ablation=group_size"])
    script = render_script(launch, "group_size-places_lt", Path("/shared/sweeps/group_size-places_lt"), Path("/w"))
    assert _directives(script) == [
        "--job-name=lpt-group_size-places_lt", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16",
        "--gres=gpu:4", "--time=2-00:00:00", "--requeue", "--signal=B:USR1@300", "--open-mode=append",
        "--output=/shared/sweeps/group_size-places_lt/slurm/job-%j.out", "--partition=gpu", "--account=proj",
        "--mem=0"]
    cpu_only = render_script(Launch(cpus_per_node=4, time="90"), "s", Path("/s"), Path("/w"))
    assert _directives(cpu_only) == ["--job-name=lpt-s", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=4",
                                     "--time=90", "--requeue", "--signal=B:USR1@300", "--open-mode=append",
                                     "--output=/s/slurm/job-%j.out"]
    assert "--gres" not in cpu_only
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


FAKES = {
    "srun": 'echo "srun $*" >> "$LOG"\n'
            'while [ $# -gt 0 ]; do case $1 in -w) shift 2;; -*) shift;; *) break;; esac; done\nexec "$@"\n',
    "scontrol": '[ "$1 $2" = "show hostnames" ] && { echo n1; echo n2; exit 0; }\necho "scontrol $*" >> "$LOG"\n',
    "ray": 'echo "ray $*" >> "$LOG"\nexec tail -f /dev/null\n',  # a Ray node: runs until the script stops it
    # wait-for-nodes returns once the Ray nodes it names have started (counted in the log), as the real one waits
    # for them to register: without the wait, a loaded machine could stop the script before a node logs its start
    "python": 'echo "python $*" >> "$LOG"\n[ "$1" = -c ] && echo 10.0.0.1\n'
              '[ "$2" = resume-flag ] && echo resume=true\n'
              'if [ "$2" = wait-for-nodes ]; then shift 10\n'
              '  until [ "$(grep -c "^ray start" "$LOG")" -ge $# ]; do sleep 0.05; done; fi\nexit 0\n',
}


def test_two_node_script_starts_head_then_worker_waits_for_both_then_runs_the_driver(tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    launch = Launch(nodes=2, gpus_per_node=4, cpus_per_node=16, overrides=["ablation=group_size",
                                                                           "data.root=/data/my places"])
    folder = tmp_path / "sweeps" / "s"
    script = render_script(launch, "s", folder, tmp_path, python=str(bin_dir / "python"))
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "n[1-2]"}
    run = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "lpt-slurm: driver exited with code 0" in run.stdout and "lpt-slurm: ray stopped" in run.stdout
    calls = log.read_text().splitlines()
    port, launcher = 20000 + 2 * 77, REPO / "orchestration" / "cluster" / "slurm.py"
    assert sorted(c for c in calls if c.startswith("ray ")) == [
        f"ray start --block --node-name=n1 --num-cpus=16 --num-gpus=4 --disable-usage-stats --head "
        f"--node-ip-address=10.0.0.1 --port={port} --include-dashboard=false",
        f"ray start --block --node-name=n2 --num-cpus=16 --num-gpus=4 --disable-usage-stats "
        f"--address=10.0.0.1:{port}"]
    step = "srun --nodes=1 --ntasks=1 --overlap --cpus-per-task=16 --gres=gpu:4"
    assert sorted(c.split(" -w ")[1].split()[0] for c in calls if c.startswith(step)) == ["n1", "n1", "n2"]
    wait = f"python {launcher} wait-for-nodes --address 10.0.0.1:{port} --cpus 16 --gpus 4 --timeout 300"
    assert [c for c in calls if c.startswith("python /")] == [
        f"{wait} n1", f"{wait} n1 n2", f"python {launcher} resume-flag {folder}",
        f"python {REPO / 'orchestration' / 'sweep.py'} cluster=ray cluster.address=10.0.0.1:{port} "
        f"ablation=group_size data.root=/data/my places resume=true"]


def test_a_resume_among_the_overrides_is_left_to_the_user() -> None:
    script = render_script(Launch(overrides=["ablation=group_size", "resume=true"]), "s", Path("/s"), Path("/w"))
    assert 'RESUME=""' in script and "resume-flag" not in script


@pytest.mark.parametrize("value, seconds", [("90", 5400), ("10:30", 630), ("24:00:00", 86400), ("2-06", 194400),
                                            ("1-00:30", 88200), ("0-00:05:30", 330)])
def test_time_limit_in_slurm_formats(value: str, seconds: int) -> None:
    assert time_limit_s(value) == seconds


def test_launch_refuses_what_cannot_work() -> None:
    with pytest.raises(LaunchError, match="expected minutes, H:M:S"):
        time_limit_s("1h")
    with pytest.raises(LaunchError, match=r"--requeue-grace=300: .*--time=5 \(300 s\)"):
        Launch(time="5").check()
    with pytest.raises(LaunchError, match="the launcher sets cluster=ray"):
        Launch(overrides=["ablation=group_size", "cluster.address=head:6379"]).check()
    with pytest.raises(LaunchError, match="--nodes must be >= 1"):
        Launch(nodes=0).check()


def test_sweep_status_from_the_folder(tmp_path) -> None:
    assert sweep_status(tmp_path) == "new"
    (tmp_path / "plan.json").write_text("{}")
    assert sweep_status(tmp_path) == "unfinished"  # the driver died before state.json
    (tmp_path / "state.json").write_text(json.dumps({"status": "running"}))
    assert sweep_status(tmp_path) == "unfinished"
    (tmp_path / "state.json").write_text(json.dumps({"status": "complete"}))
    assert sweep_status(tmp_path) == "complete"


def test_node_problems_name_missing_nodes_and_wrong_resources() -> None:
    nodes = [{"NodeName": "n1", "Alive": True, "Resources": {"CPU": 16.0, "GPU": 4.0}},
             {"NodeName": "n2", "Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0}},
             {"NodeName": "n3", "Alive": False, "Resources": {"CPU": 16.0, "GPU": 4.0}}]
    assert node_problems(nodes, ["n1"], 16, 4) == []
    assert node_problems(nodes, ["n1", "n2", "n3"], 16, 4) == [
        "not registered: n3 (registered: n1, n2)", "n2 registered with 16 CPUs and 2 GPUs, expected 16 and 4"]


def test_submit_checks_the_overrides_before_anything_is_queued(tmp_path, capsys) -> None:
    assert main(["submit", "--dry-run", "ablation=group_size", "prompt.pool_sise=3"]) == 2
    assert "did you mean 'prompt.pool_size'" in capsys.readouterr().err
    assert main(["submit", "--dry-run", "--cpus-per-node=2", "ablation=group_size",
                 f"sweep.root={tmp_path}", f"stages.root={tmp_path / 'stages'}"]) == 0
    script = tmp_path / SWEEP / "slurm" / f"{SWEEP}.sbatch"
    assert f"wrote {script} (not submitted)" in capsys.readouterr().out
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_a_job_of_several_nodes_says_where_its_tracking_server_will_be(tmp_path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")  # a login node's sbatch, as far as submit sees it
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    lines: list[str] = []
    for nodes in (1, 2):
        submit(Launch(nodes=nodes, overrides=["ablation=group_size", f"sweep.root={tmp_path}"]), log=lines.append)
    log = tmp_path / SWEEP / "slurm" / "job-4242.out"
    assert lines[0] == lines[1] == f"submitted job 4242 for sweep {SWEEP!r} (new); log: {log}"
    assert lines[2:] == [f"tracking: the job's first node runs the sweep's own mlflow server, the only writer of its "
                         f"store (tracking.server=auto); `grep tracking: {log}` shows its address and the SSH tunnel "
                         f"to its UI"]


# ------------------------------------------------------------------ against a real SLURM


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge, "
                    f"as .ci/run does")
    if os.geteuid() != 0:
        pytest.skip("a local slurmd (and munged for it) must run as root")
    cluster = LocalSlurm.start(tmp_path_factory.mktemp("slurm"), cpus=2)
    yield cluster
    cluster.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _submit(slurm: LocalSlurm, monkeypatch, launch: Launch) -> str:
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    _, job = submit(launch)
    return job


def _wait_for_event(slurm: LocalSlurm, job: str, event: Path, timeout: float = 900) -> None:
    """The trial's event file (debug.event_dir), while the job runs; fails at once if the job ends first."""
    deadline = time.monotonic() + timeout
    while not event.exists():
        state = slurm.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before {event.name}"
        assert time.monotonic() < deadline, f"no {event.name} after {timeout:.0f} s"
        time.sleep(0.5)


def _job_log(folder: Path, job: str) -> str:
    return (folder / "slurm" / f"job-{job}.out").read_text()


def _resumed_after_epoch(tmp_path: Path, row: str) -> int | None:
    """Where the phase-2 stage of a row resumed (None: trained in one go)."""
    _, runs = mlflow_runs(tmp_path / "sweeps", SWEEP)
    (run,) = [r for r in stage_runs(runs, "phase2") if r.data.tags["lpt.row"] == row]
    result = tmp_path / "stages" / run.data.tags["lpt.stage_key"] / "result.json"
    return json.loads(result.read_text())["extras"]["resumed_after_epoch"]


def _check_no_duplicates(tmp_path: Path, rows: list[str]) -> None:
    client, runs = mlflow_runs(tmp_path / "sweeps", SWEEP)
    assert len([r for r in runs if r.data.tags.get("lpt.role") == "sweep"]) == 1
    assert len(stage_runs(runs, "phase1")) == 1
    phase2 = stage_runs(runs, "phase2")
    assert sorted(r.data.tags["lpt.row"] for r in phase2) == rows
    for run in phase2:
        assert steps(client, run) == [0, 1, 2] and steps(client, run, "loss") == [0, 1, 2]
    folder = tmp_path / "sweeps" / SWEEP
    assert json.loads((folder / "state.json").read_text())["status"] == "complete"
    assert len(json.loads((folder / "trials.json").read_text())) == len(rows)


@pytest.mark.slow
def test_cancelled_job_submitted_again_then_requeued_by_its_time_limit_signal_finishes_the_sweep(
        slurm, sweep_overrides, tmp_path, monkeypatch):
    """One sweep through both ways a job stops early: cancelled while a trial holds after its phase-2 epoch 0 and
    submitted again (the same command), then, holding after epoch 1 in that second job, the time-limit signal that
    makes the job requeue itself. One sweep for both saves a SLURM job and a sweep of the suite's time."""
    events, folder = tmp_path / "events", tmp_path / "sweeps" / SWEEP
    # a trial per row (fuse=off), one at a time on the job's GPU: one trial process per job
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[5,10]", "resources.gpu=1", "fuse=off",
                                f"debug.event_dir={events}", "debug.fail_stage=phase2", "debug.fail_row=5")

    def launch(hold_at_epoch: int) -> Launch:  # debug.* is the test's instrument, free to change on a resume
        return Launch(nodes=1, gpus_per_node=1, cpus_per_node=2, time="60", ray_port=_free_port(),
                      overrides=[*overrides, f"debug.hold_at_epoch={hold_at_epoch}"])

    first = _submit(slurm, monkeypatch, launch(hold_at_epoch=0))
    _wait_for_event(slurm, first, events / "phase2.5.seed0.epoch0")  # m=5 holds after its phase-2 epoch 0
    slurm.run("scancel", first)
    slurm.wait_for_state(first, {"CANCELLED"}, timeout=300)

    job = _submit(slurm, monkeypatch, launch(hold_at_epoch=1))  # submitted again; now m=5 holds after epoch 1
    assert job != first
    _wait_for_event(slurm, job, events / "phase2.5.seed0.epoch1")
    assert "holds an unfinished sweep: resuming it" in _job_log(folder, job)
    # what SLURM sends --requeue-grace seconds before the time limit: the script requeues its own job
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    requeued = slurm.wait_for(job, lambda info: info["Restarts"] == "1" and info["JobState"] == "PENDING",
                              "the job requeued")
    (events / "release").write_text("")  # the second job's processes are gone; its restart must not hold
    if requeued["Reason"] == "BeginTime":  # SLURM holds a requeued job back for a while; start it now
        slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    done = slurm.wait_for_state(job, {"COMPLETED"})
    assert done["Restarts"] == "1"
    log = _job_log(folder, job)
    assert f"USR1 (time limit or preemption notice): requeueing job {job}" in log
    assert f"lpt-slurm: job {job} (restart 1)" in log and log.count("holds an unfinished sweep: resuming it") == 2
    assert "1 Ray node(s) up with 2 CPUs and 1 GPUs each: localhost" in log
    _check_no_duplicates(tmp_path, ["10", "5"])
    assert _resumed_after_epoch(tmp_path, "5") == 1
    client, runs = mlflow_runs(tmp_path / "sweeps", SWEEP)
    for run in stage_runs(runs, "phase2"):
        assert run.data.tags["lpt.device"] == "cpu (Ray assigned GPU 0; CUDA unavailable)"
    # the held trial went on after its epoch 0 in the job submitted again, then after its epoch 1 once requeued
    (held,) = [r for r in stage_runs(runs, "phase2") if r.data.tags["lpt.row"] == "5"]
    key = re.escape(held.data.tags["lpt.stage_key"])
    assert re.findall(rf"\[{key}\] resumed from \S+ after epoch (\d+)", log) == ["0", "1"]
