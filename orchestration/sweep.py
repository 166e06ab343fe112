"""`python orchestration/sweep.py ablation=<name>` (or `lpt-sweep`): an ablation of the paper on Ray Tune, tracked
in MLflow.

    python orchestration/sweep.py ablation=group_size                       # demo: local Ray, local MLflow
    python orchestration/sweep.py ablation=loss search=optuna search.num_samples=16
    python orchestration/sweep.py ablation=group_size experiment=places_lt data.root=/data/places365 cluster=ray
    python orchestration/sweep.py ablation=group_size resume=true            # finish an interrupted sweep

Two Tune runs per sweep: first the distinct upstream stages that several trials start from (each phase 1 once),
then the trials on top of them (phase-2 rows fused where the cluster has fewer trial slots than rows).
Everything is validated before Ray starts; the sweep folder is locked against a second driver of the same name.
"""
from __future__ import annotations

import sys
import traceback

import hydra
from omegaconf import DictConfig

from experiments.compose import CONF_DIR, start_cli
from lpt_core.config import ConfigError


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # the driver brings torch, Ray and MLflow (seconds of imports): loaded once the command line has passed
    # start_cli's check, so that a mistyped key or option is refused at once
    from orchestration.cluster.ray_connection import ClusterError
    from orchestration.execute.driver import SweepError, run_sweep
    from orchestration.tracking.registry import redact
    from orchestration.tracking.single_writer import TrackingError

    try:
        code = run_sweep(cfg)
    except (ConfigError, SweepError, ClusterError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception:  # noqa: BLE001 - Hydra would print it after the command line's overrides, credentials and all
        print(redact(traceback.format_exc()).rstrip(), file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code)


def cli() -> None:
    start_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
