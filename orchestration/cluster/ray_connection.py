"""Starting or joining Ray: in-process on this machine (cluster=local) or an existing cluster (cluster=ray), and what
its live nodes hold. No torch here: the SLURM job's wait for its nodes and the node checks import this module.

An unreachable address fails within the timeout with a message that names it, instead of ray.init's long retry.
Everything started locally binds to 127.0.0.1 and the dashboard stays off unless asked for.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

from experiments.schema import ClusterSettings
from lpt_core.config import ConfigError

RAY_DEFAULT_PORT, RAY_CLIENT_PORT = 6379, 10001


class ClusterError(RuntimeError):
    """Ray could not be started or reached."""


def _host_port(address: str) -> tuple[str, int]:
    if address.startswith("ray://"):
        rest = address[len("ray://"):]
        host, _, port = rest.partition(":")
        return host, int(port or RAY_CLIENT_PORT)
    host, _, port = address.partition(":")
    return host, int(port or RAY_DEFAULT_PORT)


def check_reachable(address: str, timeout_s: float) -> None:
    """A TCP connect to the head before handing the address to ray.init (which would retry for minutes)."""
    try:
        host, port = _host_port(address)
    except ValueError as err:
        raise ConfigError(f"cluster.address={address!r}: expected host:port or ray://host:port") from err
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as err:
        raise ClusterError(
            f"cluster.address={address!r}: cannot reach the Ray head at {host}:{port} within {timeout_s:g}s ({err}). "
            f"Is `ray start --head` running there, and is the port open from this machine?"
        ) from err


def connect(settings: ClusterSettings, log=print) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()),
                                                                            os.environ.get("PYTHONPATH")]))}}
    if settings.name == "local":
        ray.init(address="local", num_cpus=settings.num_cpus, num_gpus=settings.num_gpus,
                 include_dashboard=settings.dashboard,
                 dashboard_host="127.0.0.1", configure_logging=False, runtime_env=runtime_env)
        resources = ray.cluster_resources()
        log(f"ray: local, {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
        return
    address = settings.address or "auto"
    if address != "auto":
        check_reachable(address, settings.connect_timeout_s)
    try:
        ray.init(address=address, runtime_env=runtime_env, configure_logging=False)
    except ConnectionError as err:
        raise ClusterError(f"cluster.address={address!r}: {err}. Start a head with `ray start --head` "
                           f"or pass cluster.address=<head>:6379") from err
    resources = ray.cluster_resources()
    log(f"ray: joined {address}, {len(ray.nodes())} nodes, {resources.get('CPU', 0):g} CPUs, "
        f"{resources.get('GPU', 0):g} GPUs")


def alive_nodes() -> list[dict]:
    """The live nodes of the cluster Ray is connected to, as ray.nodes() describes them."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def check_resources(cpu: float, gpu: float) -> None:
    """A trial asking for more than any node has would wait forever: refuse it with the numbers."""
    nodes = [n["Resources"] for n in alive_nodes()]
    most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    most_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if gpu > most_gpus:
        raise ClusterError(f"resources.gpu={gpu:g}: no node of the cluster has that many GPUs (most: {most_gpus:g})")
    if cpu > most_cpus:
        raise ClusterError(f"resources.cpu={cpu:g}: no node of the cluster has that many CPUs (most: {most_cpus:g})")


def trial_slots(cpu: float, gpu: float, max_concurrent_trials: int) -> int:
    """How many trials of `cpu` CPUs and `gpu` GPUs the live nodes run at once (capped by max_concurrent_trials,
    0 = no cap): a trial fits on one node, so each node contributes what fits on it alone."""
    slots = 0
    for node in (n["Resources"] for n in alive_nodes()):
        fits = math.floor(node.get("CPU", 0.0) / cpu + 1e-9)
        if gpu > 0:
            fits = min(fits, math.floor(node.get("GPU", 0.0) / gpu + 1e-9))
        slots += fits
    return max(1, min(slots, max_concurrent_trials) if max_concurrent_trials else slots)

