"""Tune's logger callbacks as searches use them (imported only when a search builds its Tuner)."""

from __future__ import annotations

from ray.tune.logger import TBXLoggerCallback


class TrialEventFiles(TBXLoggerCallback):
    """Tune's TensorBoard logger (one event file per trial, under `<workspace>/tune/<search>/<trial>`,
    every reported scalar as `ray/tune/<name>` at its training iteration) with each report flushed at
    once. Tune's own flushes every 30 s, so a driver killed before that loses the reports of its running
    trials from their event files, though the resumed trials go on after them."""

    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, result)
        writer = self._trial_writer.get(trial)
        if writer is not None:
            writer.flush()
