"""Shared storage, checked rather than assumed: on a Ray cluster of several nodes, every node must see the sweep
folder and the stage store as one filesystem (trials write checkpoints there, the stage store's flock makes two
trials that need one phase 1 train it once, a resumed trial reads what another node wrote).

Before any training the driver writes a probe file with a random token under each root, and a task pinned to
every alive node (NodeAffinitySchedulingStrategy, not soft) reads them back. A node that cannot read a probe, or
reads another token (another filesystem mounted at the same path), stops the sweep with the node and the path.
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from orchestration.cluster.ray_connection import ClusterError

PROBE_PREFIX = ".lpt-storage-probe-"
# Tests only: a node whose raylet runs with this variable sees every checked path under that folder instead, which
# is how a test on one host gives one node of a ray.cluster_utils.Cluster a different view of the filesystem.
TEST_VIEW_ENV = "LPT_TEST_STORAGE_VIEW"


class StorageError(ClusterError):
    """A node of the Ray cluster does not see the sweep's storage as the driver does."""


def read_probes(probes: dict[str, tuple[str, str]]) -> dict[str, object]:
    """On one node: {label: problem} for each probe (path, token) that this node cannot read back."""
    view = os.environ.get(TEST_VIEW_ENV)
    problems = {}
    for label, (path, token) in probes.items():
        seen = Path(view) / Path(path).relative_to("/") if view else Path(path)
        try:
            content = seen.read_text()
        except OSError as err:
            problems[label] = f"cannot read {path} ({err.strerror})"
            continue
        if content != token:
            problems[label] = f"{path} holds another probe (another filesystem is mounted there)"
    return {"host": socket.gethostname(), "problems": problems}


def check_shared_storage(roots: dict[str, str | Path], timeout_s: float = 120.0, log=print) -> None:
    """roots: {config key: folder}. Nothing to check on a single node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = secrets.token_hex(16)
    probes = {}
    for label, root in roots.items():
        folder = Path(root).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        probes[label] = (str(folder / f"{PROBE_PREFIX}{token}"), token)
        Path(probes[label][0]).write_text(token)
    reader = ray.remote(num_cpus=0, max_retries=0)(read_probes)
    try:
        pending = {n["NodeID"]: reader.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(probes) for n in nodes}
        answers = collect_answers(pending, timeout_s, "the storage check")
    finally:
        for path, _ in probes.values():
            Path(path).unlink(missing_ok=True)
    problems = []
    for node in nodes:
        where = f"node {node['NodeName']} ({node['NodeManagerHostname']}, id {node['NodeID'][:12]})"
        answer = answers[node["NodeID"]]
        if isinstance(answer, str):
            problems.append(f"{where} {answer}")
        else:
            problems += [f"{where}: {label}: {problem}" for label, problem in answer["problems"].items()]
    if problems:
        raise StorageError("the sweep's storage must be one filesystem that every node sees at the same path; "
                           + "; ".join(problems) + ". Point " + " and ".join(roots) + " at a shared filesystem")
    log(f"storage: {', '.join(f'{k}={Path(v).resolve()}' for k, v in roots.items())} seen by all "
        f"{len(nodes)} nodes")


def collect_answers(pending: dict[str, object], timeout_s: float, check: str) -> dict[str, dict | str]:
    """Each node's answer to a check pinned to it, or why there is none (no answer in time, or the check failed
    there)."""
    import ray

    ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout_s)
    answers: dict[str, dict | str] = {}
    for node, ref in pending.items():
        if ref not in ready:
            answers[node] = f"did not answer {check} within {timeout_s:g} s"
            continue
        try:
            answers[node] = ray.get(ref)
        except ray.exceptions.RayError as err:  # e.g. the project is not importable there
            answers[node] = f"could not run {check} ({(str(err).strip().splitlines() or ['?'])[-1]})"
    return answers

