"""The orchestration's fixed costs, one by one, in a fresh process (so Ray starts cold):

    python -m benchmarks.fixed_costs --workdir DIR [--epochs 2]

- import: ray, ray.tune, mlflow and the orchestration package;
- Ray start: orchestration.cluster.ray_connection.connect with the local cluster settings (what sweep.py does);
- Tune: a run of 3 no-op trials, one at a time: from fit() to the first trial, between trials (a trial's
  process, placement and bookkeeping), from the last trial to the end of fit();
- checkpoint: tune.report with a checkpoint folder of a demo phase-2 checkpoint's size, per epoch, timed inside
  the trial (the persist Tune does on top of run_stage's own checkpoint), and the stage store's final copy +
  checksum;
- MLflow: the tracker calls of one stage (run with the flattened config as params, per-epoch metrics, final
  metrics, checkpoint artifact, finish) on a SQLite store like the sweep's default.
Prints one JSON line of seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path



def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def demo_checkpoint(folder: Path) -> Path:
    """A phase-2 checkpoint of the demo's micro model (trainable tensors + SGD state), as run_stage writes it."""
    import torch

    from benchmarks.steps import build_model
    from lpt_core.checkpoint import save_checkpoint
    from lpt_core.config import StageConfig
    from lpt_core.schedule import build_optimizer

    model = build_model("micro", torch.device("cpu"))
    optimizer = build_optimizer(model.set_trainable("phase2"), StageConfig())
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return save_checkpoint(folder, {"model": model.trainable_state(), "optimizer": optimizer.state_dict()},
                           {"phase": "phase2", "epoch": 0})


def _noop_trial(config: dict) -> None:
    """Reports `epochs` times with a checkpoint, like a trial's final stage; records when it ran and how long
    the reports took."""
    from ray import tune

    begin, spent = time.time(), 0.0
    for epoch in range(config["epochs"]):
        start = time.perf_counter()
        tune.report({"epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(config["checkpoint"]))
        spent += time.perf_counter() - start
    Path(config["out"], f"{config['i']}.json").write_text(json.dumps({"begin": begin, "end": time.time(),
                                                                       "report_s": spent}))


def tune_run(storage: Path, trials: int, checkpoint: Path, epochs: int) -> dict[str, float]:
    """One Tune run of `trials` no-op trials, one at a time: its start, the gap between trials, its end."""
    from ray import tune

    out = storage / "trials"
    out.mkdir(parents=True)
    space = {"i": tune.grid_search(list(range(trials))), "checkpoint": str(checkpoint), "epochs": epochs,
             "out": str(out)}
    tuner = tune.Tuner(tune.with_resources(_noop_trial, {"cpu": 1}), param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=1),
                       run_config=tune.RunConfig(name="noop", storage_path=str(storage), verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    begin = time.time()
    tuner.fit()
    end = time.time()
    runs = sorted((json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda r: r["begin"])
    gaps = [b["begin"] - a["end"] for a, b in zip(runs, runs[1:])]
    return {"tune_run_start_s": runs[0]["begin"] - begin, "tune_trial_start_s": sum(gaps) / len(gaps),
            "tune_run_end_s": end - runs[-1]["end"],
            "checkpoint_report_per_epoch_s": sum(r["report_s"] for r in runs) / len(runs) / epochs}


def mlflow_stage(work: Path, checkpoint: Path, epochs: int) -> dict[str, float]:
    from lpt_core.config import LPTConfig, flatten, to_dict
    from orchestration.tracking.registry import MetricSpool, RunRegistry, default_tracking_uri

    params = flatten(to_dict(LPTConfig()))  # a stage run's params: the flattened config
    setup, runs = _timed(lambda: RunRegistry(default_tracking_uri(work), "bench"))
    parent_s, parent = _timed(lambda: runs.parent_run("bench", {"lpt.ablation": "bench"}))
    start = time.perf_counter()
    run_id = runs.stage_run(parent, "bench", "phase2-bench", "phase2 bench", params, {"lpt.stage": "phase2"})
    spool = MetricSpool(runs.client)
    epoch_s = 0.0
    for epoch in range(epochs):
        spent, _ = _timed(lambda: spool.log_epoch(run_id, epoch, {"loss": 1.0, "lr": 0.1, "acc": 50.0}))
        epoch_s += spent
    runs.log_final(run_id, epochs, {"acc": 50.0, "few": 40.0})
    runs.log_artifacts(run_id, [checkpoint])
    runs.finish(run_id)
    stage = time.perf_counter() - start
    return {"mlflow_setup_and_parent_s": setup + parent_s, "mlflow_per_stage_s": stage - epoch_s,
            "mlflow_per_epoch_s": epoch_s / epochs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--epochs", type=int, default=2, help="epochs (reports with a checkpoint) per trial")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    result: dict[str, float] = {}
    result["import_s"], _ = _timed(lambda: (__import__("ray.tune"), __import__("mlflow"),
                                            __import__("orchestration.execute.driver")))
    checkpoint = demo_checkpoint(work / "checkpoint")
    from lpt_core.checkpoint import verify_checkpoint
    from orchestration.cluster.ray_connection import connect
    from experiments.schema import ClusterSettings

    def finalize_copy() -> None:
        tmp = Path(tempfile.mkdtemp(dir=work))
        shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
        verify_checkpoint(tmp)

    result["stage_finalize_s"], _ = _timed(finalize_copy)
    result["ray_start_s"], _ = _timed(lambda: connect(ClusterSettings(), log=lambda m: None))
    result.update(tune_run(work / "tune", 3, checkpoint, args.epochs))
    result.update(mlflow_stage(work, checkpoint, args.epochs))
    import ray

    result["ray_shutdown_s"], _ = _timed(ray.shutdown)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
