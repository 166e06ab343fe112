"""The sweep's own typed settings (everything in the composed config that is not an LPTConfig field)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lpt_core.config import ConfigError, build_dataclass


@dataclass
class AblationChoice:
    name: str
    values: list[Any] | None = None  # row labels to keep (None = all)


@dataclass
class SearchSettings:
    name: Literal["grid", "optuna"] = "grid"
    num_samples: int = 8
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    max_concurrent: int = 2
    mode: Literal["max", "min"] = "max"


@dataclass
class ClusterSettings:
    name: Literal["local", "ray"] = "local"
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: float | None = None
    dashboard: bool = False
    connect_timeout_s: float = 60.0


@dataclass
class SweepLocation:
    name: str | None = None
    root: str = "outputs/sweeps"
    storage: str | None = None


@dataclass
class StageSettings:
    cache: bool = True
    root: str = "outputs/stages"


@dataclass
class TrackingSettings:
    uri: str | None = None
    experiment: str = "lpt"
    flush_timeout_s: float = 120.0  # how long a finished stage waits for an unreachable server before moving on


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class DebugSettings:
    fail_at_epoch: int | None = None
    fail_stage: Literal["phase1", "phase2", "joint"] = "phase2"
    fail_times: int = 1
    oom_at_epoch: int | None = None  # a real allocator failure (an impossible allocation) after this epoch
    fail_row: str | int | float | None = None  # inject faults into this row's trials only (None: every trial)
    epoch_sleep_s: float = 0.0  # stretch every epoch (tests that must catch a trial mid-training)
    event_dir: str | None = None  # a trial writes <stage>.<row>.seed<s>.epoch<n> here after each epoch's checkpoint
    hold_at_epoch: int | None = None  # after that event (fail_stage, fail_row), wait for <event_dir>/release


@dataclass
class SweepSettings:
    ablation: AblationChoice | None = None
    search: SearchSettings = field(default_factory=SearchSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    sweep: SweepLocation = field(default_factory=SweepLocation)
    stages: StageSettings = field(default_factory=StageSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    resources: Resources = field(default_factory=Resources)
    seeds: list[int] = field(default_factory=lambda: [0])
    resume: bool = False
    max_concurrent_trials: int = 0
    scheduler: Literal["fifo", "asha"] = "fifo"
    max_failures: int = 2
    min_free_disk_gb: float = 1.0
    debug: DebugSettings = field(default_factory=DebugSettings)
    # experiments/run.py's keys, ignored by the sweep
    phase: Any = 1
    init_from: str | None = None
    evaluate: str | None = None  # the authors' released checkpoint: evaluate it instead of training
    workdir: str | None = None


def parse_settings(values: dict[str, Any]) -> SweepSettings:
    settings: SweepSettings = build_dataclass(SweepSettings, values)
    if settings.ablation is None:
        raise ConfigError("ablation: missing; pick one, e.g. `python orchestration/sweep.py ablation=group_size`")
    if not settings.seeds:
        raise ConfigError("seeds: needs at least one seed")
    if settings.resources.cpu <= 0 or settings.resources.gpu < 0:
        raise ConfigError(f"resources: cpu must be > 0 and gpu >= 0, got {settings.resources}")
    if settings.max_failures < 0 or settings.max_concurrent_trials < 0:
        raise ConfigError("max_failures and max_concurrent_trials must be >= 0")
    if settings.debug.hold_at_epoch is not None and not settings.debug.event_dir:
        raise ConfigError("debug.hold_at_epoch needs debug.event_dir (where the trial signals it holds and waits "
                          "for the release file)")
    if settings.search.num_samples < 1 or settings.search.max_concurrent < 1:
        raise ConfigError("search.num_samples and search.max_concurrent must be >= 1")
    return settings
