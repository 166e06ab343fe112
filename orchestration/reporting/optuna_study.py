"""The Optuna part of a report: which searched parameter matters (Optuna's own importance evaluator on the
sweep's study, orchestration/tracking/study.py) and the metric against each parameter (optuna.png).

A sweep of an earlier version kept its study in memory only: its study is rebuilt from the finished trials.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
import numpy as np
import optuna

from experiments.ablations import Distribution
from orchestration.reporting.plots import REFERENCE, ROW, error_bars
from orchestration.reporting.statistics import Tables
from orchestration.tracking.study import STUDY_FILE

IMPORTANCE_SEED = 0


def distributions(space: dict[str, Distribution]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The ablation's search space as Optuna distributions (what the searcher sampled from)."""
    return {key: (optuna.distributions.IntDistribution(int(d.low), int(d.high), log=d.log) if d.integer
                  else optuna.distributions.FloatDistribution(d.low, d.high, log=d.log)) for key, d in space.items()}


def rebuild_study(space: dict[str, Distribution], trials: list[tuple[dict, float]], mode: str) -> optuna.Study:
    """An in-memory study holding the given (sampled values, metric) pairs as complete trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    dists = distributions(space)
    for params, value in trials:
        study.add_trial(optuna.trial.create_trial(params={k: params[k] for k in dists}, distributions=dists,
                                                  value=value))
    return study


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's fANOVA importances (normalised to sum 1), seeded so the report is reproducible."""
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)
    return optuna.importance.get_param_importances(study, evaluator=evaluator)


def _trials(tables: Tables) -> list[tuple[dict, float]]:
    metric, space = tables.plan.metric, tables.ablation.space
    pairs = []
    for line in tables.lines:
        run = line.runs[0]
        value = line.point.get(metric, math.nan)
        if line.role != "upstream" and set(space) <= set(run.config) and not math.isnan(value):
            pairs.append((run.config, value))
    return pairs


def plot(path: Path, tables: Tables, scores: dict[str, float]) -> None:
    """Metric (with its 95 % interval) against each searched parameter, best trial in red; importances last."""
    space, metric = tables.ablation.space, tables.plan.metric
    rows = [ln for ln in tables.lines if ln.role != "upstream" and set(space) <= set(ln.runs[0].config)]
    panels = len(space) + (1 if scores else 0)
    fig = Figure(figsize=(3.6 * panels, 3.8))
    axes = fig.subplots(1, panels, squeeze=False)
    points, bars = error_bars(rows, metric)
    for axis, key in zip(axes[0], space):
        xs = np.array([ln.runs[0].config[key] for ln in rows])
        axis.errorbar(xs, points, yerr=bars, fmt="o", color=ROW, capsize=3, alpha=0.8)
        if rows:
            axis.plot(xs[:1], points[:1], "*", color=REFERENCE, markersize=14)
        axis.set(xlabel=key, ylabel=f"{metric} (%)" if key == next(iter(space)) else None)
        axis.set_xscale("log" if space[key].log else "linear")
    if scores:
        names = list(scores)
        axes[0][-1].barh(range(len(names)), [scores[n] for n in names][::-1], color=ROW)
        axes[0][-1].set_yticks(range(len(names)), [n.split(".")[-1] for n in names][::-1])
        axes[0][-1].set(xlabel="importance (fANOVA)", xlim=(0, 1))
    fig.suptitle(f"{tables.plan.name}: {metric} vs each searched parameter, 95 % intervals "
                 f"(red star = best trial)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def section(tables: Tables, out: Path, study: optuna.Study | None) -> tuple[list[str], list[Path]]:
    """(report.md lines, files) of the Optuna part; study: the sweep's own (None: rebuilt from the trials)."""
    trials = _trials(tables)
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) if study \
        else len(trials)
    source = (f"the sweep's study ({STUDY_FILE} in its folder, {finished} complete trials)" if study else
              f"a study rebuilt from the {finished} finished trials (distributions from the ablation's search space)")
    lines = ["", f"### parameter importances for {tables.plan.metric}", ""]
    scores: dict[str, float] = {}
    if finished < 2:
        lines.append(f"Not computable: {finished} finished trial(s); importances need at least 2.")
    else:
        try:
            scores = importances(study or rebuild_study(tables.ablation.space, trials, tables.plan.mode))
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            lines.append(f"Not computable on these {finished} trials: {err}")
    if scores:
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in scores.items()]
        lines += ["", f"optuna.importance with the fANOVA evaluator (seed {IMPORTANCE_SEED}) on {source}; with few "
                      f"trials these are rough."]
    plot(out / "optuna.png", tables, scores)
    return lines, [out / "optuna.png"]
