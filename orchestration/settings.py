"""The sweep's own checks on its settings. Their schema (every key of the composed config that is not an LPTConfig
field) is experiments.settings.SweepSettings, shared with experiments/run.py and checked by `split`."""
from __future__ import annotations

from experiments.settings import SweepSettings
from lpt_core.config import ConfigError


def check_sweep_settings(settings: SweepSettings) -> SweepSettings:
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
