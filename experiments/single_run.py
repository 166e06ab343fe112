"""One LPT stage in a plain process, no Ray, no MLflow (`lpt-run`, or `python experiments/single_run.py`).

    python experiments/single_run.py                                            # phase 1 on the demo
    python experiments/single_run.py stage=phase2 init_from=<phase-1 checkpoint>  # phase 2 on top of it
    python experiments/single_run.py training=joint                             # joint training, one stage
    python experiments/single_run.py experiment=places_lt data.root=<places365> evaluate=<released checkpoint>
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.compose import CONF_DIR, split, start_cli
from lpt_core.config import ConfigError, LPTConfig

# torch, timm and the training code (seconds of imports) are loaded inside run() and evaluate_release(), as
# sweep.py loads its driver: a mistyped key or option is refused by start_cli at once


def run(cfg: DictConfig) -> dict:
    from experiments.pretrain_demo import resolve_backbone
    from lpt_core.train import run_stage

    spec = split(cfg)  # the same checks as sweep.py's, all before any work
    settings, lpt = spec.settings, spec.lpt
    if settings.evaluate:
        return evaluate_release(lpt, settings.evaluate, settings.workdir)
    stage = "joint" if lpt.training == "joint" else settings.stage
    if stage == "phase2" and not settings.init_from:
        raise ConfigError("stage=phase2 needs init_from=<phase-1 checkpoint folder> (printed at the end of phase 1)")
    lpt = resolve_backbone(lpt, spec.pretrain)
    workdir = Path(settings.workdir or f"outputs/runs/{spec.name}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run_stage(lpt, stage, workdir, init_from=settings.init_from)
    result.per_class.to_pandas().to_csv(workdir / "per_class.csv", index=False)
    result.predictions.to_pandas().to_parquet(workdir / "predictions.parquet", index=False)
    summary = {"stage": stage, "checkpoint": str(result.checkpoint_dir), **result.metrics}
    (workdir / "result.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


def evaluate_release(lpt: LPTConfig, checkpoint: str, workdir: str | None) -> dict:
    """`evaluate=<file>`: the authors' released checkpoint on the experiment's eval split, nothing trained; prints
    overall / many / medium / few under both split rules (and writes result.json, per_class.csv to workdir=)."""
    from lpt_core.checkpoint import CheckpointError
    from lpt_core.data.manifest import DatasetError
    from lpt_core.official import evaluate_official, format_evaluation

    try:
        result = evaluate_official(lpt, checkpoint)
    except CheckpointError as err:  # its message starts with the file
        raise ConfigError(f"evaluate: {err}") from err
    except DatasetError as err:  # its message names the dataset and the data.* key
        raise ConfigError(str(err)) from err
    print(format_evaluation(result))
    summary = {"evaluate": checkpoint, "dataset": result.dataset, "images": result.num_images, **result.prompt,
               **result.metrics, "counts": result.counts}
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        result.per_class.to_pandas().to_csv(Path(workdir) / "per_class.csv", index=False)
        (Path(workdir) / "result.json").write_text(json.dumps(summary, indent=1))
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    start_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
