"""A real single-node SLURM (Debian's slurm-wlm: munged, slurmctld, slurmd) started as root from one folder, on
free ports, for the launcher's tests; `stop` cancels what is left of its jobs and ends the three daemons.

The node declares one GPU as a count-only generic resource (no device file): sbatch --gres=gpu:1 is scheduled as
on a GPU cluster, and Ray is told of the GPU by the launcher, which is how a CPU host tests GPU scheduling.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
GPUS = 1


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [s.getsockname()[1] for s in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def slurm_conf(root: Path, ctld_port: int, slurmd_port: int, cpus: int) -> str:
    node = (f"NodeName=localhost NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={cpus} "
            f"RealMemory=4000 Gres=gpu:{GPUS} State=UNKNOWN")
    return f"""\
ClusterName=lpttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/ctld.pid
SlurmdPidFile={root}/d.pid
SlurmctldLogFile={root}/log/ctld.log
SlurmdLogFile={root}/log/d.log
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
KillWait=10
MinJobAge=3600
GresTypes=gpu
{node}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    root: Path
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(cls, root: Path, cpus: int) -> "LocalSlurm":
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, slurmd_port = _free_ports(2)
        (root / "slurm.conf").write_text(slurm_conf(root, ctld_port, slurmd_port, cpus))
        (root / "dev").mkdir(exist_ok=True)
        for index in range(GPUS):  # slurmd only needs the files to exist; nothing opens them
            (root / "dev" / f"nvidia{index}").touch()
        (root / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={root}/dev/nvidia[0-{GPUS - 1}]\n")
        cluster = cls(root, {**os.environ, "SLURM_CONF": str(root / "slurm.conf")})
        try:
            cluster._launch([_binary("munged"), "-F", f"--key-file={key}", f"--socket={root}/munge/sock",
                             f"--pid-file={root}/munge/pid", f"--log-file={root}/munge/log",
                             f"--seed-file={root}/munge/seed", "-f"], "munged")
            cluster._until(lambda: (root / "munge" / "sock").exists(), "munged's socket")
            cluster._launch([_binary("slurmctld"), "-D", "-c"], "slurmctld")
            cluster._until(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") == 1,
                           "slurmctld answering scontrol ping")
            cluster._launch([_binary("slurmd"), "-D"], "slurmd")
            cluster._until(lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                           "the node idle in sinfo")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _launch(self, argv: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _until(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited (rc {proc.returncode}) while waiting for {what}; "
                                       f"logs in {self.root / 'log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout:.0f} s; logs in {self.root / 'log'}")
            time.sleep(0.2)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o`: JobState, Restarts, ... (kept for MinJobAge after the job ends)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_for_state(self, job_id: str, states: set[str], timeout: float = 900) -> dict[str, str]:
        return self.wait_for(job_id, lambda info: info["JobState"] in states, f"state {sorted(states)}", timeout)

    def wait_for(self, job_id: str, ready, what: str, timeout: float = 900) -> dict[str, str]:
        """Polls the job until ready(info); fails at once if it ends in a final state that is not what we wait for."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if ready(info):
                return info
            if info["JobState"] in final:
                raise AssertionError(f"job {job_id} ended {info['JobState']} before {what}: {info}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info['JobState']}, not {what}, after {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.procs and self.procs[0].poll() is None and len(self.procs) == 3:
            self.run("scancel", "--full", "--user=root", check=False)
            self._until(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), "the jobs cancelled")
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
