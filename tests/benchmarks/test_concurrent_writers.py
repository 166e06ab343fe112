"""Concurrent writers through the single-writer design at CI size (benchmarks/concurrent_writers.py runs 64 for ten
minutes): every step each writer logged is in the SQLite file exactly once, and no error reaches a writer."""
from __future__ import annotations

import pytest

from benchmarks.concurrent_writers import METRICS, run_writers

pytestmark = pytest.mark.slow


def test_eight_writers_through_one_server_lose_and_repeat_nothing(tmp_path) -> None:
    found = run_writers(writers=8, seconds=8, folder=tmp_path, interval_s=0.5)
    assert found["errors"] == [] and found["locked_errors"] == 0
    assert found["lost_rows"] == 0 and found["duplicated_rows"] == 0
    assert found["metric_rows"] == found["expected_rows"] == found["steps_logged"] * (len(METRICS) + 1)
    assert found["steps_logged"] >= 8  # every writer got at least its first step through
