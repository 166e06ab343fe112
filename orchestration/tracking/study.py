"""The Optuna study of a search=optuna sweep, persisted in its folder (optuna.journal: Optuna's journal file,
safe for several processes on one filesystem) under the sweep's name.

OptunaSearch writes every trial to it as the search runs, and a restored Tune run's searcher goes on writing to
the same study (trial numbers continue, the sampler sees every earlier trial), so `optuna.load_study` and
`optuna-dashboard <sweep folder>/optuna.journal` open it while the sweep runs and after, and the report's
importances read it.

The study is written as trials go, Tune's experiment snapshot (which a restore starts from) every ten seconds or
more: a driver killed in between leaves the study ahead of the snapshot. `StudySearch` reconciles the two on a
restore, so that a resumed search ends with exactly search.num_samples trials in the study and in MLflow.
"""
from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from ray.tune.search.optuna import OptunaSearch

STUDY_FILE = "optuna.journal"


def study_storage(folder: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(folder / STUDY_FILE)))


def load_sweep_study(folder: Path, name: str) -> optuna.Study | None:
    """The sweep's study, None where there is none (a grid, or a search of a version that kept it in memory)."""
    if not (folder / STUDY_FILE).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=study_storage(folder))


class StudySearch(OptunaSearch):
    """OptunaSearch over a persistent study that may be ahead of the Tune snapshot it was restored from.

    Trials the study holds but the snapshot's searcher never handed out (sampled after the snapshot; some finished,
    with their stages in the stage store and their MLflow runs) are handed out again, oldest first, as the next
    trials Tune asks for: the same parameters, so the trial reuses its stages (or continues from its checkpoint) and
    its MLflow run (found by sweep and stage key), and is told to the study once; the sampler is reseeded, so that it
    does not draw their values again. Trials the snapshot holds as running but the study has finished are not told
    again (Optuna refuses to update a finished trial)."""

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # the sampler's random state is the snapshot's: it would draw again the values it drew for the trials sampled
        # after the snapshot, which are handed out again below, and two trials would share their parameters (and
        # their stage key: one MLflow run for two trials)
        self._ot_study.sampler.reseed_rng()

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials and not callable(self._space):
            orphan = self._orphan()
            if orphan is not None:
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, orphan._trial_id)
        return super().suggest(trial_id)

    def _orphan(self) -> optuna.trial.FrozenTrial | None:
        handed_out = {trial.number for trial in self._ot_trials.values()}
        return next((t for t in self._ot_study.get_trials(deepcopy=False) if t.number not in handed_out), None)

    def _finished_in_study(self, trial_id: str) -> bool:
        trial = self._ot_trials.get(trial_id)
        return trial is not None and self._ot_study._storage.get_trial(trial._trial_id).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._finished_in_study(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._finished_in_study(trial_id):
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)
