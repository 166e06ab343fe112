"""What a trial reports to Tune: the numbers Tune reads as keys, every other number packed in one string (Tune
analyses each numeric key of each trial in the driver's memory), and the driver reads back every value."""
from __future__ import annotations

import math

from orchestration.execute.trainable import LPT_METRICS, tune_result, unpacked


def test_only_the_metric_the_progress_columns_and_strings_stay_keys() -> None:
    values = {"acc": 61.5, "few": 40.0, "epoch": 2, "many": 70.25, "query_knn_acc": 55.0, "loss": math.nan,
              "seed": 0, "trial_complete": True, "stage": "phase2", "run_id": "abc"}
    result = tune_result(values, metric="query_knn_acc")
    assert set(result) == {"acc", "few", "epoch", "query_knn_acc", "stage", "run_id", LPT_METRICS}
    back = unpacked(result)
    assert back.keys() == values.keys() and math.isnan(back.pop("loss"))
    assert back == {k: v for k, v in values.items() if k != "loss"}
    assert back["trial_complete"] is True and back["seed"] == 0


def test_a_result_of_an_earlier_version_passes_as_it_is() -> None:
    assert unpacked({"acc": 1.0, "many": 2.0}) == {"acc": 1.0, "many": 2.0}
