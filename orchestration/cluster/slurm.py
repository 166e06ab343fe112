"""A sweep inside one SLURM allocation: writes an sbatch script next to the sweep and submits it.

    python orchestration/cluster/slurm.py submit --nodes 2 --gpus-per-node 4 --cpus-per-node 32 --time 24:00:00 \\
        --partition gpu ablation=group_size experiment=places_lt data.root=/shared/places365 resources.gpu=1 \\
        sweep.root=/shared/lpt/sweeps stages.root=/shared/lpt/stages

The overrides are checked (and the sweep's folder found) before anything is queued. Inside the allocation the
script starts the Ray head on the first node and a Ray worker on every other node (srun), waits until every node
has registered with its CPUs and GPUs, runs the sweep driver with cluster=ray and the overrides (adding
resume=true when the sweep folder holds an unfinished sweep), and stops Ray when the driver ends.

Requeue: the job is submitted with --requeue and --signal=B:USR1@<grace>; on that signal (sent <grace> seconds
before the time limit, or by a site's preemption notice) the script requeues its own job. A job requeued that way,
by preemption or by `scontrol requeue`, or submitted again after a cancel (`sbatch <folder>/slurm/<name>.sbatch`)
continues the same sweep: the driver restores its Tune runs and every trial resumes from its newest checkpoint,
continuing its own MLflow run, so nothing is trained or logged twice.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SET_BY_LAUNCHER = ("cluster", "cluster.name", "cluster.address")  # the launcher points the driver at its Ray
TIME_FORMAT = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class LaunchError(RuntimeError):
    """The launch cannot be written or submitted as asked."""


@dataclass
class Launch:
    """What one allocation runs: its shape (nothing site-specific) and the sweep's overrides."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 8
    time: str = "24:00:00"  # SLURM's formats: minutes, H:M:S, D-H, D-H:M:S
    partition: str | None = None
    sbatch_options: list[str] = field(default_factory=list)  # passed as they are: --account=x, --mem=0, ...
    overrides: list[str] = field(default_factory=list)
    ray_port: int | None = None  # None: 20000 + 2 * (job id mod 6000), so two jobs on one node do not collide
    requeue_grace_s: int = 300  # USR1 this long before the time limit: the job requeues itself
    nodes_timeout_s: int = 300  # how long the nodes have to register with Ray

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_node < 1:
            raise LaunchError(f"--nodes must be >= 1, --gpus-per-node >= 0 and --cpus-per-node >= 1; got "
                              f"{self.nodes}, {self.gpus_per_node}, {self.cpus_per_node}")
        limit = time_limit_s(self.time)
        if not 0 < self.requeue_grace_s < limit:
            raise LaunchError(f"--requeue-grace={self.requeue_grace_s}: must be above 0 and below the time limit "
                              f"--time={self.time} ({limit} s)")
        for override in self.overrides:
            key = override.split("=", 1)[0].lstrip("+~")
            if key in SET_BY_LAUNCHER:
                raise LaunchError(f"override {override!r}: the launcher sets cluster=ray and cluster.address to "
                                  f"the Ray it starts in the allocation; leave them out")


def time_limit_s(value: str) -> int:
    """Seconds in a SLURM time limit (minutes | M:S | H:M:S | D-H | D-H:M | D-H:M:S)."""
    match = TIME_FORMAT.match(value)
    if not match:
        raise LaunchError(f"--time={value!r}: expected minutes, H:M:S or D-H:M:S (SLURM's --time formats)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    if third is not None:  # H:M:S
        return (first * 60 + second) * 60 + third
    if second is not None:  # M:S
        return first * 60 + second
    return first * 60  # minutes


def sweep_folder(overrides: list[str]) -> tuple[str, Path]:
    """The sweep's name and absolute folder, from the overrides as the driver will compose them; every check the
    driver makes before Ray starts happens here, so a bad value fails before anything is queued."""
    from experiments.compose import check_command_line, compose_config
    from orchestration.plan.sweep_plan import build_plan

    check_command_line(overrides)
    plan = build_plan(compose_config(["cluster=ray", *overrides]))
    return plan.name, (Path(plan.settings.sweep.root) / plan.name).resolve()


def sweep_status(folder: Path) -> str:
    """'new' (no plan.json), 'complete' or 'unfinished': what a job finds when it starts or restarts."""
    if not (folder / "plan.json").is_file():
        return "new"
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return "complete" if state.get("status") == "complete" else "unfinished"


def _directives(launch: Launch, name: str, folder: Path) -> list[str]:
    lines = [f"--job-name=lpt-{name}", f"--nodes={launch.nodes}", "--ntasks-per-node=1",
             f"--cpus-per-task={launch.cpus_per_node}", f"--time={launch.time}",
             "--requeue", f"--signal=B:USR1@{launch.requeue_grace_s}", "--open-mode=append",
             f"--output={folder}/slurm/job-%j.out"]
    if launch.gpus_per_node:
        lines.insert(4, f"--gres=gpu:{launch.gpus_per_node}")
    if launch.partition:
        lines.append(f"--partition={launch.partition}")
    lines += launch.sbatch_options
    return [f"#SBATCH {line}" for line in lines]


class _Script(string.Template):
    delimiter, idpattern, flags = "%", r"[A-Z_]+", re.ASCII  # bash keeps its $ and ${...}


BODY = r"""
set -uo pipefail
cd %WORKDIR || exit 1
export PYTHONUNBUFFERED=1
PY=%PYTHON
RAY=%RAY
LAUNCHER=%LAUNCHER
FOLDER=%FOLDER
PORT=%PORT
STEP=(--nodes=1 --ntasks=1 --overlap --cpus-per-task=%CPUS %GRES)
say() { echo "lpt-slurm: $*"; }
say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, sweep folder $FOLDER"

# Requeue on USR1: SLURM sends it %GRACE s before the time limit (--signal); SLURM then stops every process
# of the job and queues the same script again, which resumes the sweep.
trap 'say "USR1 (time limit or preemption notice): requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1

# One Ray cluster per job run: its own token (every node gets it through srun's environment, never a file)
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_IP=$(srun "${STEP[@]}" -w "$HEAD" "$PY" -c 'import ray.util; print(ray.util.get_node_ip_address())')
[ -n "$HEAD_IP" ] || { say "could not learn the IP address of $HEAD"; exit 1; }
RAY_STEPS=()
stop_ray() { kill "${RAY_STEPS[@]}" 2>/dev/null; wait "${RAY_STEPS[@]}" 2>/dev/null; say "ray stopped"; }
ray_node() {  # ray_node NODE ARGS...: a Ray node in the foreground of its own job step
    local node=$1; shift
    srun "${STEP[@]}" -w "$node" "$RAY" start --block --node-name="$node" --num-cpus=%CPUS --num-gpus=%GPUS \
        --disable-usage-stats "$@" &
    RAY_STEPS+=($!)
}
ray_node "$HEAD" --head --node-ip-address="$HEAD_IP" --port="$PORT" --include-dashboard=false
"$PY" "$LAUNCHER" wait-for-nodes --address "$HEAD_IP:$PORT" --cpus %CPUS --gpus %GPUS \
    --timeout %NODES_TIMEOUT "$HEAD" || { stop_ray; exit 1; }
if [ "${#NODES[@]}" -gt 1 ]; then
    for node in "${NODES[@]:1}"; do
        ray_node "$node" --address="$HEAD_IP:$PORT"
    done
    "$PY" "$LAUNCHER" wait-for-nodes --address "$HEAD_IP:$PORT" --cpus %CPUS --gpus %GPUS \
        --timeout %NODES_TIMEOUT "${NODES[@]}" || { stop_ray; exit 1; }
fi

RESUME=%RESUME
"$PY" %SWEEP cluster=ray "cluster.address=$HEAD_IP:$PORT" %OVERRIDES $RESUME &
DRIVER=$!
wait "$DRIVER"; CODE=$?
while kill -0 "$DRIVER" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the driver itself
    wait "$DRIVER"; CODE=$?
done
say "driver exited with code $CODE"
stop_ray
exit "$CODE"
"""


def render_script(launch: Launch, name: str, folder: Path, workdir: Path, python: str | None = None) -> str:
    python = python or sys.executable
    port = str(launch.ray_port) if launch.ray_port else "$((20000 + 2 * (SLURM_JOB_ID % 6000)))"
    user_resume = any(o.split("=", 1)[0] == "resume" for o in launch.overrides)
    body = _Script(BODY).substitute(
        WORKDIR=shlex.quote(str(workdir)), PYTHON=shlex.quote(python),
        RAY=shlex.quote(str(Path(python).parent / "ray")), LAUNCHER=shlex.quote(str(Path(__file__).resolve())),
        SWEEP=shlex.quote(str(REPO / "orchestration" / "sweep.py")), FOLDER=shlex.quote(str(folder)), PORT=port,
        CPUS=launch.cpus_per_node, GPUS=launch.gpus_per_node, GRACE=launch.requeue_grace_s,
        GRES=f"--gres=gpu:{launch.gpus_per_node}" if launch.gpus_per_node else "",
        NODES_TIMEOUT=launch.nodes_timeout_s, OVERRIDES=" ".join(shlex.quote(o) for o in launch.overrides),
        # resume=true among the overrides: the user decided, the job adds nothing
        RESUME='""' if user_resume else '$("$PY" "$LAUNCHER" resume-flag "$FOLDER")')
    header = ["#!/bin/bash", *_directives(launch, name, folder),
              f"# Sweep {name}, written by orchestration/cluster/slurm.py on {time.strftime('%Y-%m-%d %H:%M %Z')}.",
              f"# Submit again after a cancel, or to finish an unfinished sweep: sbatch {folder}/slurm/{name}.sbatch"]
    return "\n".join(header) + "\n" + body


def submit(launch: Launch, dry_run: bool = False, log=print) -> tuple[Path, str | None]:
    """Writes <sweep folder>/slurm/<name>.sbatch and submits it; returns the script and the job id."""
    launch.check()
    name, folder = sweep_folder(launch.overrides)
    status = sweep_status(folder)
    if status == "complete":
        log(f"sweep {name!r} in {folder} is complete; the job would only print its report "
            f"(python orchestration/report.py sweep={name})")
    script = folder / "slurm" / f"{name}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render_script(launch, name, folder, Path.cwd()))
    script.chmod(0o755)
    if dry_run:
        log(f"wrote {script} (not submitted)")
        return script, None
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError as err:
        raise LaunchError(f"sbatch not found: run this on a SLURM login node (the script is in {script})") from err
    if out.returncode != 0:
        raise LaunchError(f"sbatch refused {script}: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    log(f"submitted job {job_id} for sweep {name!r} ({status}); log: {folder}/slurm/job-{job_id}.out")
    if launch.nodes > 1:
        log(f"tracking: the job's first node runs the sweep's own mlflow server, the only writer of its store "
            f"(tracking.server=auto); `grep tracking: {folder}/slurm/job-{job_id}.out` shows its address and the "
            f"SSH tunnel to its UI")
    return script, job_id


def node_problems(nodes: list[dict[str, Any]], expected: list[str], cpus: float, gpus: float) -> list[str]:
    """What keeps the Ray cluster from matching the allocation: nodes not registered, or with other resources."""
    alive = {n["NodeName"]: n["Resources"] for n in nodes if n.get("Alive")}
    problems = []
    missing = [name for name in expected if name not in alive]
    if missing:
        problems.append(f"not registered: {', '.join(missing)} (registered: {', '.join(sorted(alive)) or 'none'})")
    for name in expected:
        have = alive.get(name)
        if have is not None and (have.get("CPU", 0.0) != cpus or have.get("GPU", 0.0) != gpus):
            problems.append(f"{name} registered with {have.get('CPU', 0.0):g} CPUs and {have.get('GPU', 0.0):g} "
                            f"GPUs, expected {cpus:g} and {gpus:g}")
    return problems


def wait_for_nodes(address: str, expected: list[str], cpus: float, gpus: float, timeout_s: float,
                   log=print) -> None:
    """Until every expected node is alive in Ray with its CPUs and GPUs; names what is missing on timeout."""
    import ray

    from orchestration.cluster.ray_connection import ClusterError, check_reachable

    deadline = time.monotonic() + timeout_s
    while True:  # the head's GCS may not listen yet
        try:
            check_reachable(address, timeout_s=5)
            break
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        while problems := node_problems(ray.nodes(), expected, cpus, gpus):
            if time.monotonic() > deadline:
                raise ClusterError(f"Ray at {address} after {timeout_s:g} s: {'; '.join(problems)}")
            time.sleep(1)
    finally:
        ray.shutdown()
    log(f"lpt-slurm: {len(expected)} Ray node(s) up with {cpus:g} CPUs and {gpus:g} GPUs each: "
        f"{', '.join(expected)}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("submit", help="write the sbatch script and submit it")
    sub.add_argument("--nodes", type=int, default=Launch.nodes)
    sub.add_argument("--gpus-per-node", type=int, default=Launch.gpus_per_node)
    sub.add_argument("--cpus-per-node", type=int, default=Launch.cpus_per_node)
    sub.add_argument("--time", default=Launch.time, help="SLURM time limit (default %(default)s)")
    sub.add_argument("--partition", default=None)
    sub.add_argument("--sbatch-option", action="append", default=[], dest="sbatch_options",
                     help="passed to #SBATCH as it is, e.g. --sbatch-option=--account=proj (repeatable)")
    sub.add_argument("--ray-port", type=int, default=None, help="Ray head port (default: derived from the job id)")
    sub.add_argument("--requeue-grace", type=int, default=Launch.requeue_grace_s, dest="requeue_grace_s",
                     help="seconds before the time limit at which the job requeues itself")
    sub.add_argument("--nodes-timeout", type=int, default=Launch.nodes_timeout_s, dest="nodes_timeout_s")
    sub.add_argument("--dry-run", action="store_true", help="write the script, do not submit it")
    sub.add_argument("overrides", nargs="*", help="the sweep's overrides, as for orchestration/sweep.py")
    wait = commands.add_parser("wait-for-nodes", help="(inside the job) until the nodes registered with Ray")
    wait.add_argument("--address", required=True)
    wait.add_argument("--cpus", type=float, required=True)
    wait.add_argument("--gpus", type=float, required=True)
    wait.add_argument("--timeout", type=float, required=True)
    wait.add_argument("nodes", nargs="+")
    flag = commands.add_parser("resume-flag", help="(inside the job) prints resume=true for an unfinished sweep")
    flag.add_argument("folder", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lpt_core.config import ConfigError
    from orchestration.cluster.ray_connection import ClusterError

    args = _parser().parse_args(argv)
    try:
        if args.command == "submit":
            fields = {k: v for k, v in vars(args).items() if k not in ("command", "dry_run")}
            submit(Launch(**fields), dry_run=args.dry_run)
        elif args.command == "wait-for-nodes":
            wait_for_nodes(args.address, args.nodes, args.cpus, args.gpus, args.timeout)
        elif sweep_status(args.folder) == "unfinished":
            print(f"lpt-slurm: {args.folder} holds an unfinished sweep: resuming it", file=sys.stderr)
            print("resume=true")
    except (LaunchError, ConfigError, ClusterError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
