"""`python orchestration/sweep.py ablation=<name>`: an ablation of the paper on Ray Tune, tracked in MLflow.

    python orchestration/sweep.py ablation=group_size                       # demo: local Ray, local MLflow
    python orchestration/sweep.py ablation=loss search=optuna search.num_samples=16
    python orchestration/sweep.py ablation=group_size experiment=places_lt data.root=/data/places365 cluster=ray
    python orchestration/sweep.py ablation=group_size resume=true            # finish an interrupted sweep

Two Tune runs per sweep: first the distinct upstream stages (each phase 1 once), then the trials on top of them.
Everything is validated before Ray starts; the sweep folder is locked against a second driver of the same name.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the concise CLIReporter table below, not the verbose engine
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the tracker; no TensorBoard/CSV

import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments.settings import CONF_DIR, register_configs  # noqa: E402
from lpt_core.config import ConfigError  # noqa: E402
from orchestration.cluster import ClusterError  # noqa: E402
from orchestration.driver import SweepError, run_sweep  # noqa: E402


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        code = run_sweep(cfg)
    except (ConfigError, SweepError, ClusterError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    register_configs()
    main()
