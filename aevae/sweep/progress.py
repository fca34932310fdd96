"""A sweep's progress line: trials complete / pruned / failed of n, the best so far, and the time left."""

from __future__ import annotations

from collections import Counter

import optuna
from optuna.trial import FrozenTrial, TrialState

from aevae import console
from aevae.sweep.config import Sweep
from aevae.sweep.study import counted
from aevae.sweep.trials import USAGE_ERROR_ATTR


STATE_WORDS = ((TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"), (TrialState.FAIL, "failed"))


class SweepProgress:
    """Read from the study itself, so that it counts the trials of every worker (and of other machines)."""

    def __init__(self, sweep: Sweep, study: optuna.Study) -> None:
        self.study = study
        self.metrics = [o.metric for o in sweep.objectives]
        self.bar = console.bar(sweep.n_trials, "trial", f"sweep {sweep.study}")
        self.reported = {t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL}
        self.update()

    def update(self, *_: object) -> None:
        trials = self.study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished()]
        self.report_failures(finished)
        states = Counter(t.state for t in finished)
        counts = ", ".join(f"{states[state]} {word}" for state, word in STATE_WORDS)
        self.bar.set_postfix_str(f"{counts}{self.best(states[TrialState.COMPLETE])}", refresh=False)
        self.bar.update(counted(trials) - (len(trials) - len(finished)) - self.bar.n)  # re-queued trials once

    def report_failures(self, finished: list[FrozenTrial]) -> None:
        """Each failed trial once, in one line (bad input stops the sweep and is said by the command instead)."""
        for trial in finished:
            if trial.state != TrialState.FAIL or trial.number in self.reported:
                continue
            self.reported.add(trial.number)
            if USAGE_ERROR_ATTR not in trial.user_attrs:
                reason = trial.user_attrs.get("fail_reason", "the worker stopped")
                console.note(f"trial {trial.number} failed: {reason}", self.bar)

    def best(self, completed: int) -> str:
        if not completed:
            return ""
        if len(self.metrics) > 1:
            return f" | Pareto front: {len(self.study.best_trials)} trials"
        trial = self.study.best_trial
        return f" | best {self.metrics[0]}={trial.value:.4g} (trial {trial.number})"

    def close(self) -> None:
        self.update()
        self.bar.close()
