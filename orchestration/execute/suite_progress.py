"""Where a suite stands while it runs: each time a trial ends, the distinct stages done out of all, the tables
whose every row is finished, and the time left (the elapsed time scaled by the estimated cost still to do).

Printed on the driver's stdout: the callback travels in Tune's snapshot of the run (a restored run brings it
back), so it holds no reference to a logger of the process that started it."""
from __future__ import annotations

import time
from ray.tune import Callback
from ray.tune.experiment import Trial

from experiments.suites import Suite
from lpt_core.cost import format_duration
from orchestration.execute.stage_store import StageStore
from orchestration.plan.sweep_plan import SweepPlan


class SuiteProgress(Callback):
    def __init__(self, plan: SweepPlan, suite: Suite, seconds: dict[str, float]) -> None:
        self.store, self.name = StageStore(plan.settings.stages.root), suite.name
        self.keys = set(plan.stage_keys())
        self.tables = plan.table_stage_keys()
        self.order = [table.ablation for table in suite.tables if table.ablation in self.tables]
        self.cost = {key: seconds.get(key, 1.0) for key in self.keys}  # 1 each where there is no estimate
        self.done: set[str] = set()
        self.start, self.at_start = 0.0, 0.0

    def setup(self, **info) -> None:
        """At the start of each Tune run (a restored one too: the callback comes back from its snapshot)."""
        self.done = self._done()
        self.start, self.at_start = time.time(), self._cost(self.done)

    def _done(self) -> set[str]:
        return {key for key in self.keys if self.store.marked_done(key)}

    def _cost(self, keys: set[str]) -> float:
        return sum(self.cost[key] for key in keys)

    def line(self) -> str:
        complete = [name for name in self.order if self.tables[name] <= self.done]
        made = self._cost(self.done) - self.at_start
        left = self._cost(self.keys - self.done)
        eta = (f"about {format_duration((time.time() - self.start) * left / made)} left" if made > 0 and left
               else "done" if not left else "time left: after the first stage")
        return (f"{self.name}: {len(self.done)}/{len(self.keys)} distinct stages done; tables complete "
                f"{len(complete)}/{len(self.order)}" + (f" ({', '.join(complete)})" if complete else "") + f"; {eta}")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        done = self._done()
        if done != self.done:
            self.done = done
            print(self.line(), flush=True)
