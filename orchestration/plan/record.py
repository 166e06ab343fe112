"""plan.json and state.json: what a sweep computes and where it stands.

- `PlanRecord`: plan.json, what a sweep computes (its fingerprint and, key by key, its content) and what its
  report needs; written by the driver, read back by a resume and by the report.
- state.json: complete or not, the failed trials, those scheduler=asha stopped early (written by the driver).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.suites import find_ablation
from lpt_core.config import ConfigError
from lpt_core.files import atomic_write_bytes
from orchestration.tracking.run_names import metric_name

PLAN_FILE = "plan.json"
STATE_FILE = "state.json"


def read_state(folder: Path) -> dict[str, Any]:
    """state.json of a sweep folder (status, failed and stopped trials); {} before the driver has written one."""
    path = folder / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass(frozen=True)
class PlanRecord:
    fingerprint: str
    name: str
    ablation: str
    experiment: str
    axis: str
    rows: list[str]
    seeds: list[int]
    search: str  # grid | optuna
    metric: str
    stage_root: str
    content: dict[str, Any] | None = None  # None: written by a version that kept only the fingerprint
    mode: str = "max"  # search.mode: whether a larger metric is better
    tracking_experiment: str = "lpt"  # the MLflow experiment (the default where an earlier version wrote none)
    tracking_uri: str | None = None  # the store its runs are in, credentials redacted; None: an earlier version

    def tracking_changes(self, other: PlanRecord) -> list[str]:
        """`key=saved -> given` for each tracking setting in which `other` differs (none for a plan.json of an
        earlier version, which did not record where it tracked)."""
        if self.tracking_uri is None:
            return []
        pairs = [("tracking.uri", self.tracking_uri, other.tracking_uri),
                 ("tracking.experiment", self.tracking_experiment, other.tracking_experiment)]
        return [f"{key}={saved!r} -> {given!r}" for key, saved, given in pairs if saved != given]

    def write(self, folder: Path) -> None:
        payload = json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True, default=str)
        atomic_write_bytes(folder / PLAN_FILE, payload.encode())

    @classmethod
    def read(cls, folder: Path) -> PlanRecord:
        """The record of an existing sweep; a damaged or foreign plan.json is refused, never overwritten."""
        path = folder / PLAN_FILE
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: unreadable ({err}); it was left unchanged. Use another sweep.name") from err
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing = [name for name in required if not isinstance(values, dict) or name not in values]
        if missing:
            raise ConfigError(f"{path}: not a sweep plan (missing {missing}); it was left unchanged. "
                              f"Use another sweep.name")
        return cls(**{f.name: values[f.name] for f in fields if f.name in values})

    def parent_params(self) -> dict[str, Any]:
        """The parent run's params: what the sweep varies and how it was run (the rows of a grid with its reference
        row, or the settings of a search)."""
        params = {"ablation": self.ablation, "experiment": self.experiment, "axis": self.axis, "search": self.search,
                  "seeds": ",".join(str(seed) for seed in self.seeds), "metric": metric_name(self.metric)}
        if self.search != "grid":
            return {**params, **{key: value for key, value in (self.content or {}).items()
                                 if key.startswith("search.") and key != "search.name"}}
        reference = find_ablation(self.ablation).reference_for(self.experiment)
        return {**params, "rows": ",".join(self.rows),
                "reference": f"{self.axis}={reference}" if reference in self.rows else "(not in this sweep)"}
