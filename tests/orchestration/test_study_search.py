"""StudySearch after a restore from a Tune snapshot older than its study: the trials sampled after the snapshot are
handed out again (not sampled anew), the ones the study already finished are not told twice, and the study ends
with exactly as many trials as were asked for."""
from __future__ import annotations

from pathlib import Path

import optuna
from ray import tune

from orchestration.tracking.study import StudySearch, study_storage

SPACE = StudySearch.convert_search_space({"eta": tune.uniform(0.0, 1.0), "lambda_neg_ib": tune.uniform(0.0, 12.0)})


def _search(folder: Path) -> StudySearch:
    return StudySearch(space=SPACE, metric="acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                       study_name="s", storage=study_storage(folder))


def test_a_restored_search_adopts_what_the_study_holds_beyond_its_snapshot(tmp_path: Path) -> None:
    search = _search(tmp_path)
    first = search.suggest("t1")
    second = search.suggest("t2")
    search.on_trial_complete("t2", {"acc": 20.0, "training_iteration": 1})
    search.save(str(tmp_path / "snapshot.pkl"))  # Tune's snapshot: t1 running, t2 done
    search.on_trial_result("t1", {"acc": 10.0, "training_iteration": 1})
    search.on_trial_complete("t1", {"acc": 10.0, "training_iteration": 1})  # done after the snapshot
    third = search.suggest("t3")  # sampled after the snapshot, its training killed with the driver
    fourth = search.suggest("t4")
    search.on_trial_complete("t4", {"acc": 40.0, "training_iteration": 1})  # finished after the snapshot

    restored = _search(tmp_path)
    restored.restore(str(tmp_path / "snapshot.pkl"))  # the driver killed; the resume starts from the snapshot
    restored.on_trial_result("t1", {"acc": 10.0, "training_iteration": 1})  # Tune runs t1 again: already told
    restored.on_trial_complete("t1", {"acc": 10.0, "training_iteration": 1})
    assert restored.suggest("t5") == third  # the orphans, oldest first, with their own parameters
    assert restored.suggest("t6") == fourth
    restored.on_trial_complete("t6", {"acc": 40.0, "training_iteration": 1})  # finished before: not told again
    restored.on_trial_complete("t5", {"acc": 30.0, "training_iteration": 1})
    fifth = restored.suggest("t7")  # then new samples
    assert fifth not in (first, second, third, fourth)
    restored.on_trial_complete("t7", {"acc": 50.0, "training_iteration": 1})

    study = optuna.load_study(study_name="s", storage=study_storage(tmp_path))
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]  # five trials asked for, five in the study
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5
    assert [t.value for t in trials] == [10.0, 20.0, 30.0, 40.0, 50.0]


def test_a_search_that_was_never_interrupted_samples_every_trial_anew(tmp_path: Path) -> None:
    search = _search(tmp_path)
    configs = [search.suggest(f"t{i}") for i in range(4)]
    assert len({tuple(sorted(c.items())) for c in configs}) == 4
    assert len(optuna.load_study(study_name="s", storage=study_storage(tmp_path)).trials) == 4
