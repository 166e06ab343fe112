"""Measured speed of the LPT method and of the sweep orchestration, side by side with the naive way.

    python benchmarks/run.py                    # full mode: writes benchmarks/results.json + benchmarks/RESULTS.md
    python benchmarks/run.py --quick            # < 3 min on 2 CPU cores: outputs/bench/{results.json,RESULTS.md}
    python benchmarks/run.py --device cuda      # on a GPU machine (adds measure 6)
    python benchmarks/run.py --quick --only throughput,phase2 --out /tmp/bench

Measures (benchmarks/measures/): 1 train-step throughput, 2 phase 2 against the naive reference with a profile,
3 orchestration overhead, 4 stage reuse, 5 data pipeline against model consumption, 6 GPU (bf16 ViT-B, MFU,
packing). Benchmarks measure; nothing here asserts a duration.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.context import PLANS, Context
from benchmarks import gpu_section, scale
from benchmarks.machine import describe, load_average
from benchmarks.measures import MEASURES
from benchmarks.results_table import render

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches and short trials (< 3 min on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="where results.json and RESULTS.md go (default: benchmarks/, or outputs/bench/ "
                             "with --quick so a quick run never replaces the published full results)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, fixed for the whole run (default 1: on a shared machine a "
                             "second thread that has to wait for a busy core makes every op wait)")
    parser.add_argument("--only", default=",".join(MEASURES),
                        help=f"comma-separated subset of {','.join(MEASURES)}")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "outputs" / "cache",
                        help="data.cache_dir of the demo runs (the micro ViT is pretrained there once)")
    parser.add_argument("--fixed-costs", action=argparse.BooleanOptionalAction, default=None,
                        help="run the fixed-cost probe of measure 3 (default: in full mode only)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (logs, sweep folders)")
    parser.add_argument("--merge", action="store_true",
                        help="re-measure only the --only measures and keep the other sections of <out>/results.json "
                             "(same mode and device), saying so in the notes")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(MEASURES)
    if unknown:
        parser.error(f"--only: unknown measure(s) {sorted(unknown)}; valid: {','.join(MEASURES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine; run with --device cpu "
                     "(measure 6 is then reported as skipped)")
    if args.out is None:
        args.out = REPO / ("outputs/bench" if args.quick else "benchmarks")
    return args


def notes(ctx: Context) -> list[str]:
    plan = ctx.plan
    quick = ["Quick mode: no ViT-B (it is in the full run), two of the four group sizes in measures 3-4, no "
             "fixed-cost probe; it checks that everything runs and gives rough ratios."] if ctx.quick else []
    return quick + [
        f"Batches per branch (a dual step trains on twice as many): measure 1 {plan.throughput}, measure 2 "
        f"{plan.naive}; images/s hardly depend on the batch on CPU, which is compute bound.",
        f"Demo runs of measures 3-4: group sizes {plan.demo_rows or 'all four (5, 10, 20, 40)'}, "
        f"{' '.join(plan.demo_overrides)}.",
        "Random-weight models: speed does not depend on the weights; no download is needed.",
        "The machine may be shared: the load average above says how busy it was; interleaving A and B keeps the "
        "ratios fair even when absolute numbers move.",
    ]


def keep_earlier(out: Path, mode: str, device: str, selected: list[str]) -> dict:
    """--merge: the sections of the earlier results.json that this run does not re-measure (each carries where
    and when it was measured, which the report lists)."""
    path = out / "results.json"
    if not path.is_file():
        raise SystemExit(f"--merge: no earlier {path} to merge into")
    earlier = json.loads(path.read_text())
    run = earlier["run"]
    if (run["mode"], run["device"]) != (mode, device):
        raise SystemExit(f"--merge: {path} holds a {run['mode']} run on {run['device']}; this is a {mode} run "
                         f"on {device}")
    return {name: section for name, section in earlier["sections"].items() if name not in selected}


def write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = args.only.split(",")
    mode = "quick" if args.quick else "full"
    kept = keep_earlier(args.out, mode, args.device, selected) if args.merge else {}
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="lpt-bench-"))
    plan = PLANS[(args.quick, device.type)]
    ctx = Context(quick=args.quick, device=device, threads=args.threads, out=args.out, work=work, plan=plan,
                  cache_dir=args.cache_dir,
                  fixed_costs=not args.quick if args.fixed_costs is None else args.fixed_costs)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    ctx.sections.update(kept)
    results = {"run": {"command": command.strip(), "mode": mode,
                       "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                       "warmup": plan.warmup, "repeats": plan.repeats},
               "machine": describe(args.threads), "sections": ctx.sections, "notes": notes(ctx)}
    try:
        for name in selected:
            ctx.stamp(f"measure {name}")
            try:
                ctx.sections[name] = MEASURES[name].run(ctx)
            except Exception:  # one measure failing must not lose the others
                ctx.sections[name] = {"title": MEASURES[name].TITLE, "error": traceback.format_exc(limit=8)}
                ctx.log(ctx.sections[name]["error"])
            ctx.sections[name]["measured"] = {"command": results["run"]["command"],
                                              "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                                              "load_average_1_5_15": load_average()}
            results["run"]["wall_s"] = time.perf_counter() - started
            write(args.out, results)
    finally:
        ctx.release_models()
        if args.keep_work:
            ctx.log(f"scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["run"]["wall_s"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = load_average()
    write(args.out, results)
    (args.out / "RESULTS.md").write_text(render(results))
    gpu_section.keep_section(args.out)  # the last `make gpu-check` stays in RESULTS.md
    scale.keep_section(args.out)  # and the last `python -m benchmarks.scale`
    ctx.log(f"wrote {args.out / 'results.json'} and {args.out / 'RESULTS.md'} "
            f"({results['run']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
