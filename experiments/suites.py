"""Suites: several ablations run as one sweep, reported as the paper lays them out, with a verdict on each claim.

A suite names the tables it is made of (each a registered ablation) and the orderings the paper states about
them (`Claim`). The driver plans the union of the tables' rows as one sweep: rows whose trials are the same
(the same stages, e.g. the reference configuration that five tables share) are trained once
(orchestration/plan/sweep_plan.py). Its rows are labelled `<ablation>:<row>`.

`find_ablation` is the one look-up of what `ablation=` names: a table, or a suite (its union as an Ablation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from experiments.ablations import ABLATIONS, Ablation, Point, changed_stages, get_ablation
from lpt_core.config import ConfigError
from lpt_core.suggest import did_you_mean

ROW_SEPARATOR = ":"  # the union's row labels: `<ablation>:<row>`


@dataclass(frozen=True)
class SuiteTable:
    ablation: str  # a registered ablation: its rows, reference, paper numbers and steps make the table
    title: str  # as the paper names it: "Tab. 8: the contribution of each phase"


ClaimKind = Literal["better", "increasing", "best", "within_noise"]


@dataclass(frozen=True)
class Claim:
    """An ordering the paper states about one of its tables, tested on paired differences.

    - better: rows (a, b), a - b > 0.
    - increasing: rows in the order the paper says they improve; each row minus the one before > 0.
    - best: (row,); the row minus every other row of the table > 0.
    - within_noise: (row,); the row is not significantly below the best other row of the table (the paper says
      the result is robust to the setting: no significant loss against the best is what it claims).

    Verdicts (statistics, over the Holm-adjusted p-values of the whole suite): `holds` when every difference is
    significant in the claimed direction (within_noise: when none is significantly negative), `contradicted` when
    one is significant against it, `not significant` otherwise."""

    text: str
    source: str  # where the paper states it: "Tab. 8, (c) - (b)"
    table: str  # the ablation whose rows it compares
    kind: ClaimKind
    rows: tuple[str, ...]
    key: str = "acc"  # the accuracy it is about: acc, few, few_std, query_knn_acc
    demo_rows: tuple[str, ...] | None = None  # the rows on the demo where its table has demo_points

    def rows_for(self, experiment: str) -> tuple[str, ...]:
        return self.demo_rows if experiment == "demo" and self.demo_rows is not None else self.rows


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tables: tuple[SuiteTable, ...]
    claims: tuple[Claim, ...]
    reference: tuple[str, str]  # (ablation, row): the configuration most tables share, its label kept when merged

    def label(self, ablation: str, row: str) -> str:
        return f"{ablation}{ROW_SEPARATOR}{row}"

    def union(self) -> Ablation:
        """The suite as one grid: every row of every table, labelled `<ablation>:<row>`."""
        def rows(experiment: str) -> tuple[Point, ...]:
            return tuple(Point(self.label(t.ablation, p.label), p.overrides) for t in self.tables
                         for p in get_ablation(t.ablation).points_for(experiment))

        demo_differs = any(get_ablation(t.ablation).demo_points is not None for t in self.tables)
        reference = self.label(*self.reference)
        draft = Ablation(self.name, self.description, "row", points=rows("places_lt"),
                         demo_points=rows("demo") if demo_differs else None, reference=reference,
                         demo_reference=reference if demo_differs else None,
                         compare=("acc", "few", "few_std", "query_knn_acc"))
        return Ablation(**{**vars(draft), "stages": changed_stages(draft)})


SUITES: dict[str, Suite] = {}
_UNIONS: dict[str, Ablation] = {}


def register_suite(suite: Suite) -> Suite:
    """Checks that every table is a registered ablation and every claim names rows of its table."""
    if suite.name in SUITES or suite.name in ABLATIONS:
        raise ValueError(f"suite {suite.name!r}: the name is taken")
    names = [t.ablation for t in suite.tables]
    for table in names:
        get_ablation(table)
    if suite.reference[0] not in names:
        raise ValueError(f"suite {suite.name!r}: reference {suite.reference} is not in one of its tables")
    for claim in suite.claims:
        if claim.table not in names:
            raise ValueError(f"suite {suite.name!r}: claim {claim.text!r} reads table {claim.table!r}, not in the suite")
        ablation = get_ablation(claim.table)
        for experiment in ("places_lt", "demo"):
            labels = {p.label for p in ablation.points_for(experiment)}
            wanted = claim.rows_for(experiment)
            size = {"better": 2, "best": 1, "within_noise": 1}.get(claim.kind)
            wrong_size = len(wanted) != size if size is not None else len(wanted) < 2  # increasing: 2 or more
            if not set(wanted) <= labels or wrong_size or len(set(wanted)) != len(wanted):
                raise ValueError(f"suite {suite.name!r}: claim {claim.text!r} ({claim.kind}) names rows {wanted}, "
                                 f"not rows of {claim.table!r} on {experiment}: {sorted(labels)}")
    SUITES[suite.name] = suite
    _UNIONS[suite.name] = suite.union()
    return suite


def find_ablation(name: str) -> Ablation:
    """What `ablation=<name>` runs: a registered ablation, or a suite's union of tables."""
    if name in _UNIONS:
        return _UNIONS[name]
    if name in ABLATIONS:
        return ABLATIONS[name]
    hint = did_you_mean(name, sorted({*ABLATIONS, *SUITES}), what="ablations and suites", list_all=True)
    raise ConfigError(f"ablation={name!r}: unknown ablation; {hint}")


def split_label(label: str) -> tuple[str, str]:
    """`group_size:20` -> ('group_size', '20')."""
    ablation, _, row = label.partition(ROW_SEPARATOR)
    return ablation, row


register_suite(Suite(
    "paper", "The paper's ablation section: Tab. 1, 7, 8, 9, 10, the group size m and Fig. 4's top-k, as one sweep",
    tables=(
        SuiteTable("vpt_sampling", "Tab. 1: VPT vs linear probe, with and without class-balanced sampling"),
        SuiteTable("model_size", "Tab. 7: model size"),
        SuiteTable("per_phase", "Tab. 8: the contribution of each phase"),
        SuiteTable("decoupled_vs_joint", "Tab. 9: decoupled vs joint training"),
        SuiteTable("query_function", "Tab. 10: the query function"),
        SuiteTable("group_size", "Group size m of the prompt pool"),
        SuiteTable("topk", "Fig. 4: the number k of matched group prompts"),
    ),
    claims=(
        Claim("VPT beats the linear probe (instance-balanced sampling)", "Tab. 1", "vpt_sampling", "better",
              ("vpt_instance", "linear_probe_instance")),
        Claim("VPT beats the linear probe on few-shot classes (class-balanced sampling)", "Tab. 1", "vpt_sampling",
              "better", ("vpt_cb", "linear_probe_cb"), key="few"),
        Claim("Class-balanced sampling improves VPT", "Tab. 1", "vpt_sampling", "better",
              ("vpt_cb", "vpt_instance")),
        Claim("Larger backbones are better", "Tab. 7", "model_size", "increasing", ("vit_t", "vit_s", "vit_b"),
              demo_rows=("micro_s", "micro_m", "micro_l")),
        Claim("The shared prompt beats the linear probe", "Tab. 8, (b) - (a)", "per_phase", "better",
              ("phase1_ce", "linear_probe")),
        Claim("The shared prompt beats the linear probe on few-shot classes", "Tab. 8, (b) - (a)", "per_phase",
              "better", ("phase1_ce", "linear_probe"), key="few"),
        Claim("A-GCL beats CE on few-shot classes", "Tab. 8, (c) - (b)", "per_phase", "better",
              ("phase1_agcl", "phase1_ce"), key="few"),
        Claim("Full LPT beats phase 1 alone", "Tab. 8, (d) - (c)", "per_phase", "better",
              ("full_lpt", "phase1_agcl")),
        Claim("Decoupled training beats joint training", "Tab. 9", "decoupled_vs_joint", "better",
              ("decoupled", "joint")),
        Claim("The phase-1 query beats the pretrained one in K-NN accuracy", "Tab. 10", "query_function", "better",
              ("phase1", "pretrained"), key="query_knn_acc"),
        Claim("The phase-1 query beats the pretrained one in accuracy", "Tab. 10", "query_function", "better",
              ("phase1", "pretrained")),
        Claim("m = 20 is within noise of the best m", "group size, m = 5..40", "group_size", "within_noise",
              ("20",)),
        Claim("k = 2 is the best k", "Fig. 4", "topk", "best", ("2",)),
    ),
    reference=("group_size", "20"),
))
