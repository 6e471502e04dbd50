"""Driver-side Tune callbacks of a search: a child MLflow run per trial (the driver is the only
writer, so SQLite holds), and a live table of the trials in the terminal."""

from __future__ import annotations

import time

from ray.tune import Callback

CHILD_TAG = "adapterflow.trial_id"
PARENT_TAG = "mlflow.parentRunId"


def _scalars(result: dict) -> dict:
    skip = {"step", "total_steps", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp",
            "time_since_restore", "iterations_since_restore", "pid", "done", "resumed_from_step"}
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


class TrialRuns(Callback):
    """Every trial is a child run of the search's parent run: its sampled values as params, each
    report's metrics at its step, and how it ended (finished, stopped early by the scheduler, failed
    with its error).

    A resumed search (its driver was killed) starts from what MLflow holds, not from what Tune's last
    experiment snapshot says: the child runs made before are found by their trial tag, a report at a
    step already logged (a trial resumed from a checkpoint older than its last report) is not logged
    again, and a run that already ended is not ended again (Tune's snapshot can trail a trial's end, so
    such a trial comes back, restores its final checkpoint and ends with nothing left to train)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.runs: dict[str, str] = {}
        self.logged: dict[str, int] = {}  # trial id -> last step logged
        self.ended: set[str] = set()
        self.last: dict[str, dict] = {}
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            self._load(self._client)
        return self._client

    def _load(self, client) -> None:
        for run in client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'"):
            trial = run.data.tags.get(CHILD_TAG)
            if trial is None:
                continue
            self.runs[trial] = run.info.run_id
            if run.info.status != "RUNNING":
                self.ended.add(trial)
            if run.data.metrics:
                key = "loss" if "loss" in run.data.metrics else next(iter(run.data.metrics))
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                if steps:
                    self.logged[trial] = max(steps)

    def _run(self, trial) -> str:
        client = self.client
        if trial.trial_id not in self.runs:
            run = client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}",
                                    tags={PARENT_TAG: self.parent_run_id, CHILD_TAG: trial.trial_id})
            self.runs[trial.trial_id] = run.info.run_id
            client.log_batch(run.info.run_id, params=_params(trial.config))
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self._run(trial)
        self.last[trial.trial_id] = dict(result)
        step = int(result.get("step", result.get("training_iteration", 0)))
        if step <= self.logged.get(trial.trial_id, -1):
            return  # logged before the driver stopped
        ts = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in _scalars(result).items()])
        self.logged[trial.trial_id] = step

    def _end(self, trial, status: str, tags: dict) -> None:
        run_id = self._run(trial)
        if trial.trial_id in self.ended:
            return
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, status)
        self.ended.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last.get(trial.trial_id) or trial.last_result or {}
        early = last.get("step") is not None and last.get("step") < last.get("total_steps", 0)
        self._end(trial, "KILLED" if early else "FINISHED",
                  {"adapterflow.trial_status": "stopped early" if early else "finished"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED", {"adapterflow.trial_status": "failed",
                                    "adapterflow.error": trial_error(trial)[:5000]})


def _params(config: dict):
    import json

    from mlflow.entities import Param

    return [Param(k, json.dumps(v) if isinstance(v, (list, dict, bool, type(None))) else str(v))
            for k, v in config.items()]


def trial_error(trial) -> str:
    """The last line of a failed trial's error (the exception), else what Tune recorded."""
    text = ""
    path = getattr(trial, "error_file", None) or ""
    try:
        if path:
            with open(path) as fh:
                text = fh.read()
    except OSError:
        text = ""
    text = text or str(getattr(trial, "error_msg", "") or "failed")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


class Progress(Callback):
    """The trials as a live table: status, step, training loss and the held-out metric; the best so far."""

    def __init__(self, console, metric: str, mode: str, total: int | None, columns: tuple[str, ...] = ("step", "loss")):
        self.console, self.metric, self.mode, self.total = console, metric, mode, total
        self.columns = columns  # what a row shows before the metric: training progress, or e.g. ranks and size
        self.rows: dict[str, dict] = {}
        self.status: dict[str, str] = {}
        self._seen_restored = False
        self._live = None

    def __getstate__(self):
        return {**self.__dict__, "_live": None, "console": None}

    def setup(self, **info):
        from rich.console import Console
        from rich.live import Live

        self.console = self.console or Console()
        self._live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
        self._live.start()

    def _table(self):
        from rich.table import Table

        counts = {s: list(self.status.values()).count(s) for s in ("running", "finished", "stopped", "failed")}
        best = self.best()
        title = (f"trials: {counts['finished']} finished, {counts['stopped']} stopped early, {counts['failed']} "
                 f"failed, {counts['running']} running" + (f" of {self.total}" if self.total else ""))
        caption = f"best so far: {self.metric} {best[1]:.4f} (trial {best[0]})" if best else None
        table = Table(title=title, caption=caption)
        for col in ("trial", "status", *self.columns, self.metric):
            table.add_column(col, justify="right" if col != "status" else "left")
        for tid, r in list(self.rows.items())[-12:]:
            m = r.get(self.metric)
            table.add_row(tid, self.status.get(tid, ""), *(self._cell(c, r) for c in self.columns),
                          f"{m:.4f}" if m is not None else "")
        return table

    @staticmethod
    def _cell(column: str, r: dict) -> str:
        if column == "step":
            return f"{r.get('step', '')}/{r.get('total_steps', '')}"
        v = r.get(column)
        if isinstance(v, float):
            return f"{v:.4f}"
        return " ".join(map(str, v)) if isinstance(v, list) else "" if v is None else str(v)

    def best(self):
        scored = [(t, r[self.metric]) for t, r in self.rows.items() if self.metric in r]
        if not scored:
            return None
        return (max if self.mode == "max" else min)(scored, key=lambda x: x[1])

    def _update(self):
        if self._live is not None:
            self._live.update(self._table())

    def on_step_begin(self, iteration, trials, **info):
        """A resumed search's first step: the trials that ended before the driver stopped, as they ended."""
        if self._seen_restored:
            return
        self._seen_restored = True
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self.status:
                r = dict(trial.last_result or {})
                early = r.get("step") is not None and r.get("step") < r.get("total_steps", 0)
                self.rows[trial.trial_id] = r
                self.status[trial.trial_id] = "failed" if trial.status == "ERROR" else "stopped" if early else "finished"
        self._update()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.status[trial.trial_id] = "running"
        self.rows.setdefault(trial.trial_id, {})
        self._update()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.rows[trial.trial_id] = dict(result)
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = self.rows.get(trial.trial_id, {})
        early = r.get("step") is not None and r.get("step") < r.get("total_steps", 0)
        self.status[trial.trial_id] = "stopped" if early else "finished"
        self._update()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.status[trial.trial_id] = "failed"
        self._update()

    def on_experiment_end(self, trials, **info):
        if self._live is not None:
            self._update()
            self._live.stop()
            self._live = None
