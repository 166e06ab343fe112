"""The "GPU check" section of benchmarks/RESULTS.md: written by `make gpu-check` (benchmarks/gpu_check.py), kept by
`make bench` (benchmarks/run.py), which rewrites the rest of the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.measures import fused_rows, gpu
from benchmarks.section import with_section

START, END = "<!-- gpu-check: start -->", "<!-- gpu-check: end -->"


def markdown(check: dict[str, Any]) -> str:
    run, sweep = check["run"], check["sweep"]
    lines = [START, "## GPU check (`make gpu-check`)", "",
             f"Measured by `{run['command']}` on {run['device_name']} ({run['date']}).", ""]
    if check.get("measure") is not None:
        lines += ["### Measure 6", "", gpu.markdown(check["measure"]), ""]
    if check.get("fused") is not None:
        lines += ["### Measure 7", "", fused_rows.markdown(check["fused"]), ""]
    acc = ", ".join(f"m = {row}: " + ("n/a" if value is None else f"{value:.1f} %")
                    for row, value in sorted(sweep["acc"].items(), key=lambda item: int(item[0])))
    lines += ["### Sweep", "", f"`python {sweep['command']}`", "",
              f"- {sweep['status']} in {sweep['wall_s']:.0f} s; phase-2 trials from first start to last end "
              f"{sweep['window_s']:.1f} s, at most {sweep['trials_at_once']} at once",
              f"- phase-2 training {sweep['phase2_images_per_s_median']:.0f} images/s per trial (median over epochs)",
              f"- accuracy: {acc}", f"- trials' lpt.device: {'; '.join(sweep['devices'])}", END]
    return "\n".join(lines)


def keep_section(out: Path) -> None:
    """After benchmarks/run.py rewrote <out>/RESULTS.md: put the last GPU check back in."""
    check = out / "gpu_check.json"
    results_md = out / "RESULTS.md"
    if check.is_file() and results_md.is_file():
        results_md.write_text(with_section(results_md.read_text(), markdown(json.loads(check.read_text())),
                                           START, END))
