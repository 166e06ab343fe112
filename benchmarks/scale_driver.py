"""`python orchestration/sweep.py ARGS` with its Tune experiment snapshots, report and parent-run summary timed:
each call's seconds are appended to TIMINGS as `<what> <seconds>` lines, so a driver killed mid-sweep keeps what
it measured. benchmarks/scale.py runs it:

    python -m benchmarks.scale_driver TIMINGS ARGS...
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path


def _timed(owner: object, name: str, what: str, timings: Path) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        began = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            with open(timings, "a") as out:
                out.write(f"{what} {time.monotonic() - began:.6f}\n")

    setattr(owner, name, timed)


def main() -> None:
    timings, sys.argv = Path(sys.argv[1]), ["orchestration/sweep.py", *sys.argv[2:]]
    from ray.tune.execution.tune_controller import TuneController

    from orchestration.execute import driver
    from orchestration.sweep import cli

    _timed(TuneController, "checkpoint", "snapshot", timings)
    _timed(driver, "_report", "report", timings)
    _timed(driver, "_summarise", "summary", timings)
    cli()


if __name__ == "__main__":
    main()
