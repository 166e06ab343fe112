"""Whether a stage's inputs can be had on this machine: the dataset's files (data.root, its split lists) and the
backbone's weights. A sweep asks this on every node before it trains anything, so that a missing input is named
with its key and the place looked at, instead of surfacing as a hub error inside a trial hours later."""
from __future__ import annotations

from lpt_core.config import ConfigError, LPTConfig
from lpt_core.data import build_dataset
from lpt_core.data.manifest import DatasetError


def input_problems(cfg: LPTConfig, check_weights: bool = True) -> list[str]:
    """What is missing for `cfg` here (empty: nothing). The dataset is opened as a stage opens it (its manifest
    built and cached, so the trials find it ready); check_weights=False where the weights are made by the driver
    (the demo's pretrained micro ViT)."""
    problems = []
    try:
        build_dataset(cfg.data)
    except (ConfigError, DatasetError, OSError) as err:
        problems.append(str(err))
    if check_weights:
        from lpt_core.backbone import weights_problem  # timm: only where weights are checked, not for the demo's

        if (problem := weights_problem(cfg.backbone)) is not None:
            problems.append(problem)
    return problems
