"""`make gpu-check`, on a machine with a GPU: the GPU benchmark measures (measure 6 of benchmarks/run.py: ViT-B/16
bf16 images/s and MFU, four demo trials packed on one GPU against one at a time; measure 7: fused phase-2 rows
against the same rows one by one, bf16, R = 1, 2, 4, 8, goal >= 2x for R = 4) and a small GPU sweep through the
real orchestration (the demo's group-size ablation, four trials at resources.gpu=0.25). The numbers go to
benchmarks/gpu_check.json and into benchmarks/RESULTS.md, section "GPU check" (kept when `make bench` rewrites it).

    python benchmarks/gpu_check.py                                 # needs CUDA; about 10 minutes on one GPU
    python benchmarks/gpu_check.py --dry-run                       # what it would run, on any machine
    python benchmarks/gpu_check.py --device cpu --sweep-only --out /tmp/gpu-check   # the sweep, on a declared GPU

With --device cpu the sweep runs on the CPU with one GPU declared to Ray (cluster.num_gpus=1): the same scheduling,
no CUDA; the trials' lpt.device tags then say the GPU went unused. Nothing here asserts a duration.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_section import END, START, markdown
from benchmarks.section import with_section
from benchmarks.run import main as run_benchmarks

REPO = Path(__file__).resolve().parents[1]
SWEEP_NAME = "gpu-check"
SWEEP_LENGTH = ("phase1.epochs=2", "phase2.epochs=2", "phase1.steps_per_epoch=20", "phase2.steps_per_epoch=20",
                "eval.every_epochs=1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--sweep-only", action="store_true", help="skip measures 6 and 7 (the benchmark measures)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks",
                        help="where gpu_check.json goes and whose RESULTS.md gets the section (default benchmarks/)")
    parser.add_argument("--rows", default="5,10,20,40", help="group sizes of the sweep (default %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "outputs" / "cache",
                        help="data.cache_dir of the demo (the micro ViT is pretrained there once)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="more sweep overrides (e.g. a shorter demo for a smoke run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False); "
                     "make gpu-check needs a GPU. --dry-run shows what it runs, --device cpu --sweep-only runs the "
                     "sweep on a declared GPU")
    return args


def sweep_overrides(args: argparse.Namespace, work: Path) -> list[str]:
    declared = ["cluster.num_gpus=1"] if args.device == "cpu" else []  # on a GPU machine Ray finds the GPUs
    return ["ablation=group_size", f"ablation.values=[{args.rows}]", f"device={args.device}", "resources.gpu=0.25",
            *declared, *SWEEP_LENGTH, f"data.cache_dir={args.cache_dir.resolve()}", f"sweep.name={SWEEP_NAME}",
            f"sweep.root={work / 'sweeps'}", f"stages.root={work / 'stages'}", *args.overrides]


def measure_command(work: Path) -> list[str]:
    return [sys.executable, str(REPO / "benchmarks" / "run.py"), "--device", "cuda", "--only", "gpu,fused",
            "--out", str(work / "bench")]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one instant (one ending as another starts: not together)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, change in edges:
        open_now += change
        peak = max(peak, open_now)
    return peak


def sweep_numbers(folder: Path, stage_root: Path, wall_s: float) -> dict[str, Any]:
    """What the sweep did, from its folder, its MLflow store and the stage store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder.parent / 'mlflow.db'}")  # the default store, beside the sweep folder
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id], f"tags.`lpt.sweep` = '{folder.name}' and "
                                                          f"tags.`lpt.stage` = 'phase2'", max_results=1000)
    images_per_s = []
    for run in runs:
        result = json.loads((stage_root / run.data.tags["lpt.stage_key"] / "result.json").read_text())
        images_per_s += [h["train_images_per_s"] for h in result["history"]]
    return {
        "status": json.loads((folder / "state.json").read_text())["status"], "wall_s": wall_s,
        "acc": {r.data.tags["lpt.row"]: r.data.metrics.get("acc") for r in runs},
        "devices": sorted({r.data.tags.get("lpt.device", "?") for r in runs}),
        "trials_at_once": most_at_once([(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs]),
        "window_s": (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000,
        "phase2_images_per_s_median": statistics.median(images_per_s),
    }


def run_sweep(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import subprocess

    cmd = [sys.executable, str(REPO / "orchestration" / "sweep.py"), *sweep_overrides(args, work)]
    start = time.perf_counter()
    with open(work / "sweep.log", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        tail = (work / "sweep.log").read_text().splitlines()[-30:]
        raise SystemExit(f"gpu-check sweep failed (exit {code}):\n" + "\n".join(tail))
    command = shlex.join(["orchestration/sweep.py", *cmd[2:]])
    return {"command": command, **sweep_numbers(work / "sweeps" / SWEEP_NAME, work / "stages", wall)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lpt-gpu-check-"))
    work = work.resolve()
    steps = ([] if args.sweep_only else [measure_command(work)]) + \
        [[sys.executable, str(REPO / "orchestration" / "sweep.py"), *sweep_overrides(args, work)]]
    if args.dry_run:
        for cmd in steps:
            print(shlex.join(cmd))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "the CPU (one GPU declared to Ray)"
    check: dict[str, Any] = {"run": {"command": shlex.join(["python", "benchmarks/gpu_check.py", *argv]),
                                     "device_name": device_name, "date": time.strftime("%Y-%m-%d %H:%M %Z")},
                             "measure": None}
    if not args.sweep_only:
        run_benchmarks(measure_command(work)[2:])
        sections = json.loads((work / "bench" / "results.json").read_text())["sections"]
        check["measure"], check["fused"] = sections["gpu"], sections["fused"]
    check["sweep"] = run_sweep(args, work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(check, indent=1) + "\n")
    results_md = args.out / "RESULTS.md"
    results_md.write_text(with_section(results_md.read_text() if results_md.is_file() else "", markdown(check),
                                       START, END))
    print(markdown(check))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
