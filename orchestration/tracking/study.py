"""The Optuna study of a search=optuna sweep, persisted in its folder (optuna.journal: Optuna's journal file,
safe for several processes on one filesystem) under the sweep's name.

OptunaSearch writes every trial to it as the search runs, and a restored Tune run's searcher goes on writing to
the same study (trial numbers continue, the sampler sees every earlier trial), so `optuna.load_study` and
`optuna-dashboard <sweep folder>/optuna.journal` open it while the sweep runs and after, and the report's
importances read it.
"""
from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

STUDY_FILE = "optuna.journal"


def study_storage(folder: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(folder / STUDY_FILE)))


def load_sweep_study(folder: Path, name: str) -> optuna.Study | None:
    """The sweep's study, None where there is none (a grid, or a search of a version that kept it in memory)."""
    if not (folder / STUDY_FILE).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=study_storage(folder))
