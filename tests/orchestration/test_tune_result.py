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


def test_a_restored_checkpoint_is_read_where_tune_keeps_it_not_copied_to_tmp(tmp_path, monkeypatch) -> None:
    """Tune hands a restored trial its checkpoint; to_directory() would copy it to a new /tmp folder per restore,
    left behind on every node. On a local or shared filesystem it is read in place; elsewhere it is copied once
    into the stage's work folder."""
    import pyarrow.fs
    from ray import tune

    from lpt_core.checkpoint import save_checkpoint, verify_checkpoint
    from orchestration.execute.trainable import restored_checkpoint

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))  # what to_directory() would write into
    kept = save_checkpoint(tmp_path / "trial" / "checkpoint_000001", {"epoch": 1}, {"stage": "phase2", "epoch": 1})
    checkpoint = tune.Checkpoint.from_directory(str(kept))
    assert restored_checkpoint(checkpoint, tmp_path / "work") == kept
    assert list(scratch.iterdir()) == [] and not (tmp_path / "work").exists()

    elsewhere = tune.Checkpoint(str(kept), filesystem=pyarrow.fs.SubTreeFileSystem("/", pyarrow.fs.LocalFileSystem()))
    copied = restored_checkpoint(elsewhere, tmp_path / "work")
    assert copied == tmp_path / "work" / "tune_restored" and verify_checkpoint(copied)["epoch"] == 1
    assert list(scratch.iterdir()) == []
