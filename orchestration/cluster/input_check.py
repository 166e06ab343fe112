"""The sweep's inputs, checked where its trials will run before anything is trained: every distinct dataset and
backbone of the plan, on every alive node of the Ray cluster (on one node: in the driver's process).

A node that lacks data.root or a split list, or cannot get the backbone's weights (a missing weights_file, a hub
tag neither cached nor downloadable), stops the sweep with exit 2 and one line per problem, naming the node, the
key and where it looked, before the sweep writes its plan (lpt_core.inputs says what is missing).

node_problems runs in a fresh Ray worker on every node, which imports this module: its imports stay as light as the
check allows (the dataset code, not timm, MLflow, Tune or Hydra), so that asking a node costs seconds of CPU less.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from lpt_core.config import ConfigError, LPTConfig, to_dict
from lpt_core.inputs import input_problems
from orchestration.cluster.storage_check import TEST_VIEW_ENV, collect_answers

if TYPE_CHECKING:
    from orchestration.plan.sweep_plan import SweepPlan


class MissingInputError(ConfigError):
    """An input of the sweep (data, weights) cannot be had on a node where its trials may run."""


def distinct_inputs(plan: SweepPlan) -> list[tuple[LPTConfig, bool]]:
    """One config per distinct (data, backbone) of the plan's trials, and whether its weights are checked (not
    where the driver pretrains them: the demo's micro ViT)."""
    from experiments.pretrain_demo import pretrained_here  # the driver's side only: timm and Hydra stay off the nodes

    found: dict[str, tuple[LPTConfig, bool]] = {}
    for trial in plan.trials.values():
        cfg = trial.config
        key = json.dumps([to_dict(cfg)["data"], to_dict(cfg)["backbone"]], sort_keys=True, default=str)
        found.setdefault(key, (cfg, not pretrained_here(cfg, plan.pretrain)))
    return list(found.values())


def node_problems(inputs: list[tuple[LPTConfig, bool]]) -> dict[str, object]:
    """On one node: its host name and what is missing there."""
    view = os.environ.get(TEST_VIEW_ENV)
    problems: list[str] = []
    for cfg, check_weights in inputs:
        if view and cfg.data.root:  # tests only: this node sees data.root under another folder
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, root=str(Path(view) / Path(cfg.data.root).relative_to("/"))))
        problems += [p for p in input_problems(cfg, check_weights) if p not in problems]
    return {"host": socket.gethostname(), "problems": problems}


def check_inputs(plan: SweepPlan, timeout_s: float = 600.0, log=print) -> None:
    """Raises MissingInputError naming every node and missing input; on one node it checks in this process."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    inputs = distinct_inputs(plan)
    nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    if len(nodes) < 2:
        problems = node_problems(inputs)["problems"]
        where = "here"
    else:
        checker = ray.remote(num_cpus=0, max_retries=0)(node_problems)
        pending = {n["NodeID"]: checker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(inputs) for n in nodes}
        answers = collect_answers(pending, timeout_s, "the input check")
        problems = []
        for node in nodes:
            name = f"node {node['NodeName']} ({node['NodeManagerHostname']})"
            answer = answers[node["NodeID"]]
            problems += [f"{name} {answer}"] if isinstance(answer, str) else \
                [f"{name}: {problem}" for problem in answer["problems"]]
        where = f"on all {len(nodes)} nodes"
    if problems:
        raise MissingInputError("inputs missing before any training; nothing was trained or written: "
                                + "; ".join(problems))
    log(f"inputs: {len(inputs)} distinct dataset/backbone pair(s) found {where}")
