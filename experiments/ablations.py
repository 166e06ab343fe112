"""The paper's ablations as data: each is an axis over dotted config keys, the metric it reports and the stages
it changes. The sweep driver expands them without knowing anything about LPT.

Adding an ablation = one `register(Ablation(...))` here: experiments.compose.register_configs makes every
registered name a choice of the `ablation` config group. `register` checks the stages an entry names against the
stages its keys change (lpt_core.stages.STAGE_FIELDS; PRETRAIN_FIELDS for the demo's pretrained backbone).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from experiments.schema import PRETRAIN_FIELDS
from lpt_core.suggest import did_you_mean
from lpt_core.config import ConfigError
from lpt_core.stages import stages_changed_by, touches

ABLATION_STAGES = ("pretrain", "phase1", "phase2", "joint")
PAPER_EXPERIMENT = "places_lt"  # the dataset of the paper's ablation numbers (`Ablation.paper`)
RUN_UNTIL = "run_until"  # reserved point key: the last stage a row runs (Tab. 8 rows that stop after phase 1)


@dataclass(frozen=True)
class Point:
    """One row of an ablation table: a label and the config overrides (dotted keys) that make it."""

    label: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Distribution:
    """A continuous (or integer) Optuna axis."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Ablation:
    name: str
    description: str
    axis: str  # the column name of the report table (labels of crossed axes are joined with ",")
    points: tuple[Point, ...] = ()
    space: dict[str, Distribution] = field(default_factory=dict)  # non-empty = searchable with Optuna
    # which stages the axis changes (the others are shared by all rows); register() refuses a tuple that is not
    # what the axis's keys change
    stages: tuple[str, ...] = ("phase2",)
    metric: str = "acc"
    demo_points: tuple[Point, ...] | None = None  # replaces `points` on the demo experiment (e.g. micro sizes)
    paper: dict[str, float] = field(default_factory=dict)  # the paper's overall accuracy per row (PAPER_EXPERIMENT)
    # the row every other row is compared with (paired differences): the paper's default configuration
    reference: str | None = None
    demo_reference: str | None = None  # the reference among demo_points (the demo's default model, ...)
    # accuracies whose paired difference to the reference a report shows (report keys: acc, few, few_std, ...)
    compare: tuple[str, ...] = ("acc", "few", "few_std")
    # (row, baseline) pairs compared besides the reference: the paper's step-by-step contributions (Tab. 8), which a
    # difference to one reference row cannot show; rows of `points` (and of `demo_points` where it has them)
    steps: tuple[tuple[str, str], ...] = ()

    def points_for(self, experiment: str) -> tuple[Point, ...]:
        return self.demo_points if experiment == "demo" and self.demo_points is not None else self.points

    def reference_for(self, experiment: str) -> str | None:
        if experiment == "demo" and self.demo_points is not None:
            return self.demo_reference
        return self.reference


def sweep(key: str, values: list[Any], label: str | None = None) -> list[Point]:
    """Points that set `key` to each value: sweep('prompt.pool_size', [5, 10])."""
    return [Point(f"{value}" if label is None else label.format(value), {key: value}) for value in values]


def zipit(*sweeps: list[Point]) -> list[Point]:
    """Axes that move together: point i of every sweep merged."""
    if len({len(s) for s in sweeps}) != 1:
        raise ValueError("zipit needs sweeps of equal length")
    return [Point(parts[0].label, {k: v for p in parts for k, v in p.overrides.items()}) for parts in zip(*sweeps)]


def product(*sweeps: list[Point]) -> list[Point]:
    return [Point(",".join(p.label for p in parts), {k: v for p in parts for k, v in p.overrides.items()})
            for parts in itertools.product(*sweeps)]


ABLATIONS: dict[str, Ablation] = {}


def register(ablation: Ablation) -> Ablation:
    if ablation.name in ABLATIONS:
        raise ValueError(f"ablation {ablation.name!r} registered twice")
    unknown = set(ablation.stages) - set(ABLATION_STAGES)
    if unknown:
        raise ValueError(f"ablation {ablation.name!r}: unknown stages {sorted(unknown)}")
    _check_reference(ablation, ablation.points, ablation.reference, "reference")
    if ablation.demo_points is not None:
        _check_reference(ablation, ablation.demo_points, ablation.demo_reference, "demo_reference")
    for points in filter(None, (ablation.points, ablation.demo_points)):
        labels = [p.label for p in points]
        for step in ablation.steps:
            if len(step) != 2 or step[0] == step[1] or not set(step) <= set(labels):
                raise ValueError(f"ablation {ablation.name!r}: step {step!r} must be two different rows of {labels}")
    changed = changed_stages(ablation)
    if set(ablation.stages) != set(changed):
        raise ValueError(f"ablation {ablation.name!r}: stages={ablation.stages}, but its axis changes {changed} "
                         f"({_explain(ablation)})")
    ABLATIONS[ablation.name] = ablation
    return ablation


def _row_stages(point: Point) -> frozenset[str]:
    """The stages a row runs after the demo's pretraining: joint, phase 1 alone (run_until), or phase 1 and 2."""
    if point.overrides.get("training") == "joint":
        return frozenset({"joint"})
    return frozenset({"phase1"} if point.overrides.get(RUN_UNTIL) == "phase1" else {"phase1", "phase2"})


def _stage_changes(ablation: Ablation) -> tuple[dict[str, set[str]], set[str]]:
    """Per axis key, the stages it changes among those the rows run; and the stages only some rows run."""
    rows = (*ablation.points, *(ablation.demo_points or ()))
    runs = {_row_stages(p) for p in rows} or {_row_stages(Point("", {}))}  # a space alone: the default chain
    ran = frozenset().union(*runs)
    keys = sorted({key for p in rows for key in p.overrides if key != RUN_UNTIL} | set(ablation.space))
    by_key = {key: (stages_changed_by([key]) & ran) | ({"pretrain"} if touches(key, PRETRAIN_FIELDS) else set())
              for key in keys}
    return by_key, set(ran - frozenset.intersection(*runs))


def changed_stages(ablation: Ablation) -> tuple[str, ...]:
    """The stages whose result differs between the rows, in ABLATION_STAGES order: those that depend on an axis key
    (lpt_core.stages.STAGE_FIELDS; PRETRAIN_FIELDS for the demo's pretraining) and those only some rows run."""
    by_key, partial = _stage_changes(ablation)
    changed = partial.union(*by_key.values())
    return tuple(stage for stage in ABLATION_STAGES if stage in changed)


def _explain(ablation: Ablation) -> str:
    by_key, partial = _stage_changes(ablation)
    parts = [f"{key} changes {', '.join(sorted(stages)) or 'no stage'}" for key, stages in by_key.items()]
    if partial:
        parts.append(f"only some rows run {', '.join(sorted(partial))}")
    return "; ".join(parts) or "no key"


def _check_reference(ablation: Ablation, points: tuple[Point, ...], reference: str | None, field_name: str) -> None:
    """A grid must name the row its other rows are compared with, and that row must be one of its rows."""
    if not points:
        return
    labels = [p.label for p in points]
    if reference not in labels:
        raise ValueError(f"ablation {ablation.name!r}: {field_name}={reference!r} must be one of its rows {labels}")


def get_ablation(name: str) -> Ablation:
    if name not in ABLATIONS:
        hint = did_you_mean(name, sorted(ABLATIONS), what="ablations", list_all=True)
        raise ConfigError(f"ablation={name!r}: unknown ablation; {hint}")
    return ABLATIONS[name]


register(Ablation(
    "group_size", "Group size m of the prompt pool (paper: best at m = 20, robust from 5 to 40)", "m",
    points=tuple(sweep("prompt.pool_size", [5, 10, 20, 40])), paper={"20": 50.07}, reference="20",
))
register(Ablation(
    "topk", "Number k of matched group prompts (Fig. 4 supports k = 2)", "k",
    points=tuple(sweep("prompt.top_k", [1, 2, 3, 4])), paper={"2": 50.07}, reference="2",
))
register(Ablation(
    "routing", "Control: group routing (m = 20, k = 2) vs one second-stage prompt for every image (m = k = 1). Not "
    "in the paper; it says whether phase 2's gain comes from the groups or from the extra prompt", "routing",
    points=(Point("routed", {}), Point("unrouted", {"prompt.pool_size": 1, "prompt.top_k": 1})), reference="routed",
))
register(Ablation(
    "ensemble", "How the k matched prompts are combined: mean (authors' code) or concatenation", "ensemble",
    points=tuple(sweep("prompt.ensemble", ["mean", "concat"])), reference="mean",
))
register(Ablation(
    "query_function", "Query for prompt matching: phase-1 model (default) vs the plain pretrained ViT (Tab. 10)",
    "query", points=tuple(sweep("prompt.query", ["phase1", "pretrained"])), paper={"phase1": 50.07},
    reference="phase1", compare=("acc", "few", "few_std", "query_knn_acc"),
))
register(Ablation(
    "decoupled_vs_joint", "Decoupled two-phase training vs all prompts trained together (Tab. 9)", "training",
    points=tuple(sweep("training", ["decoupled", "joint"])), stages=("phase1", "phase2", "joint"),
    paper={"decoupled": 50.07, "joint": 47.48}, reference="decoupled",
))
register(Ablation(
    "prompt_length", "Prompt length P of the shared and group prompts", "P",
    points=tuple(sweep("prompt.length", [1, 5, 10, 20])), stages=("phase1", "phase2"), reference="10",
))
register(Ablation(
    "sampling", "Batch sampling in both phases: dual vs class-balanced only vs instance-balanced only", "sampling",
    points=tuple(zipit(sweep("phase1.sampling", ["dual", "class_balanced", "instance"]),
                       sweep("phase2.sampling", ["dual", "class_balanced", "instance"]))),
    stages=("phase1", "phase2"), reference="dual",
))
register(Ablation(
    "model_size", "Backbone size (Tab. 7): ViT-T / S / B on the paper's data, micro widths on the demo", "model",
    points=(
        Point("vit_t", {"backbone.name": "vit_tiny_patch16_224.augreg_in21k"}),
        Point("vit_s", {"backbone.name": "vit_small_patch16_224.augreg_in21k"}),
        Point("vit_b", {"backbone.name": "vit_base_patch16_224.augreg_in21k"}),
    ),
    demo_points=(
        Point("micro_s", {"backbone.model_kwargs.embed_dim": 64, "backbone.model_kwargs.num_heads": 2}),
        Point("micro_m", {"backbone.model_kwargs.embed_dim": 128, "backbone.model_kwargs.num_heads": 4}),
        Point("micro_l", {"backbone.model_kwargs.embed_dim": 192, "backbone.model_kwargs.num_heads": 6}),
    ),
    stages=("pretrain", "phase1", "phase2"), paper={"vit_t": 37.40, "vit_s": 44.66, "vit_b": 50.07},
    reference="vit_b", demo_reference="micro_m",  # micro_m is the demo's default micro ViT (width 128)
))
register(Ablation(
    "vpt_sampling", "VPT (the shared prompt) vs linear probe, with instance-balanced or class-balanced sampling, "
    "both with CE (Tab. 1)", "row",
    points=(
        Point("linear_probe_instance", {"prompt.shared": False, "phase1.loss.name": "ce",
                                        "phase1.sampling": "instance", RUN_UNTIL: "phase1"}),
        Point("vpt_instance", {"phase1.loss.name": "ce", "phase1.sampling": "instance", RUN_UNTIL: "phase1"}),
        Point("linear_probe_cb", {"prompt.shared": False, "phase1.loss.name": "ce",
                                  "phase1.sampling": "class_balanced", RUN_UNTIL: "phase1"}),
        Point("vpt_cb", {"phase1.loss.name": "ce", "phase1.sampling": "class_balanced", RUN_UNTIL: "phase1"}),
    ),
    stages=("phase1",), paper={"vpt_instance": 37.52, "vpt_cb": 44.17}, reference="vpt_cb",
    steps=(("vpt_instance", "linear_probe_instance"), ("vpt_cb", "linear_probe_cb")),
))
register(Ablation(
    "per_phase", "Contribution of each part (Tab. 8 rows, plus Tab. 1's VPT without class-balanced sampling)", "row",
    points=(
        Point("linear_probe", {"prompt.shared": False, "phase1.loss.name": "ce", RUN_UNTIL: "phase1"}),
        Point("vpt_ce_instance", {"phase1.loss.name": "ce", "phase1.sampling": "instance", RUN_UNTIL: "phase1"}),
        Point("phase1_ce", {"phase1.loss.name": "ce", RUN_UNTIL: "phase1"}),
        Point("phase1_agcl", {RUN_UNTIL: "phase1"}),
        Point("full_lpt", {}),
    ),
    stages=("phase1", "phase2"), paper={"vpt_ce_instance": 37.52, "phase1_agcl": 49.41, "full_lpt": 50.07},
    reference="full_lpt",
    # Tab. 8's steps: (b) - (a) the shared prompt, (c) - (b) A-GCL instead of CE; (d) - (c) is the reference's own
    steps=(("phase1_ce", "linear_probe"), ("phase1_agcl", "phase1_ce")),
))
register(Ablation(
    "loss", "A-GCL focusing and the instance-branch weight: lambda+, lambda- and eta (Optuna, or a small grid)",
    "lambda+/lambda-/eta",
    points=tuple(product(sweep("phase2.loss.lambda_pos_ib", [0.0, 0.5]), sweep("phase2.loss.lambda_neg_ib", [4.0, 8.0]),
                         sweep("phase2.loss.eta", [0.5]))),
    reference="0.5,8.0,0.5",  # the code's instance-branch defaults; Optuna trials have no reference row
    space={
        "phase2.loss.lambda_pos_ib": Distribution(0.0, 2.0),
        "phase2.loss.lambda_neg_ib": Distribution(1.0, 12.0),
        "phase2.loss.eta": Distribution(0.05, 1.0),
    },
))
