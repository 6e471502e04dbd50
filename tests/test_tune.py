"""Searches on Ray Tune: the `tune:` section's checks before any trial starts; an ASHA search of
single-process trials that finishes with trials stopped early and its resources released; a search
whose trials run Ray Train workers (FIFO); a failing trial recorded with its error while the search
goes on; the parent and child MLflow runs, plots and the winner registered with its lineage."""

import json

import pytest

from workers.errors import SpecError

from helpers import mlflow_client, spec_for


def _spec_dict(tiny_llama, toy_data, tmp, **tune):
    spec = spec_for(tiny_llama, toy_data, tmp, epochs=2, checkpoint_every=4)
    d = spec.model_dump(mode="json", exclude={"tune"})
    d["tune"] = {"space": {"train.lr": {"loguniform": [1e-4, 1e-1]}}, **tune}
    return d


@pytest.mark.parametrize("space,tune,message", [
    ({"adapter.rank": {"choice": [4]}}, {}, "tune.space.adapter.rank: not a key of this spec (keys here: alpha"),
    ({"adapter.r": {"choice": [4, "eight"]}}, {}, "'eight' does not make a valid spec: adapter.r: expected an integer"),
    ({"train.lr": {"uniform": [0.1, 0.01]}}, {}, "tune.space.train.lr: uniform: [lo, hi] needs lo < hi"),
    ({"train.lr": {"uniform": [0.1, 0.2], "choice": [1]}}, {}, "a distribution is one of"),
    ({"track.alias": {"choice": ["x"]}}, {}, "only keys under model, data, adapter, train, sparsify"),
    ({"train.lr": {"grid": [0.1, 0.2]}}, {"searcher": "optuna"}, "grid axes need searcher: random"),
])
def test_a_bad_space_is_one_clear_error_before_anything_runs(tiny_llama, toy_data, tmp_path, space, tune, message):
    from pipelines.spec import parse_spec

    d = _spec_dict(tiny_llama, toy_data, tmp_path, **tune)
    d["tune"]["space"] = space
    with pytest.raises(SpecError) as err:
        parse_spec(d)
    assert message in str(err.value), str(err.value)


def test_asha_needs_single_process_trials_and_budgets_are_checked(tiny_llama, toy_data, tmp_path):
    from pipelines.search import check_search
    from pipelines.spec import parse_spec

    d = _spec_dict(tiny_llama, toy_data, tmp_path, scheduler="asha")
    d["train"]["num_workers"] = 2
    with pytest.raises(SpecError, match="set train.num_workers: 0"):
        parse_spec(d)
    d["train"]["num_workers"] = 0
    d["tune"]["report_every"] = 100  # 2 epochs of 230 examples at 16 a step: 28 steps
    with pytest.raises(SpecError, match="first rung .* comes after its last step"):
        check_search(parse_spec(d))
    d["tune"].update(report_every=4, space={})
    with pytest.raises(SpecError, match="no tune.space to search"):
        check_search(parse_spec(d))


def _runs(spec, parent):

    client = mlflow_client(spec.workspace_path())
    exp = client.get_experiment_by_name(spec.track.experiment)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return client, children


def test_an_asha_search_stops_trials_early_and_registers_its_winner(tiny_llama, toy_data, tmp_path, ray_session):
    from rich.console import Console

    from pipelines.search import run_search
    from pipelines.spec import parse_spec

    d = _spec_dict(tiny_llama, toy_data, tmp_path, scheduler="asha", num_samples=6, report_every=4,
                   asha={"grace_period": 1, "reduction_factor": 2}, seed=1)
    d["tune"]["space"]["adapter.r"] = {"choice": [2, 4]}
    spec = parse_spec(d)
    free = ray_session.available_resources().get("CPU", 0)
    res = run_search(spec, d, Console(record=True, width=120))
    c = res.counts
    assert len(res.trials) == 6 and c["failed"] == 0 and c["finished"] + c["stopped_early"] == 6, c
    assert c["stopped_early"] >= 1 and c["finished"] >= 1, c  # ASHA stopped some, the best went on
    for row in res.trials:
        steps = [h["step"] for h in row["history"]]
        assert steps == sorted(steps) and steps[0] == 4  # reported every 4 steps
        assert (steps[-1] == 28) == (row["status"] == "finished")
    best = max((r for r in res.trials if r["status"] == "finished"), key=lambda r: r["metrics"]["held_out_accuracy"])
    assert res.best["trial"] == best["trial"]
    assert res.report["split"] == "validation" and res.report["n"] == 64  # the winner on the evaluation split
    import time

    deadline = time.monotonic() + 30  # the trials' actors are gone: their CPUs are free again
    while ray_session.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources().get("CPU", 0) >= free

    client, children = _runs(spec, res.run_id)
    assert len(children) == 6
    statuses = sorted(r.data.tags["adapterflow.trial_status"] for r in children)
    assert statuses.count("stopped early") == c["stopped_early"] and statuses.count("finished") == c["finished"]
    for run in children:
        assert {"train.lr", "adapter.r"} <= set(run.data.params)
        assert run.data.metrics["held_out_accuracy"] >= 0
    parent = client.get_run(res.run_id)
    assert parent.data.params["best.train.lr"] == str(res.best["config"]["train.lr"])
    assert {"trial_curves.png", "parallel_coordinates.png", "trials.json", "evaluation.json"} <= {
        a.path for a in client.list_artifacts(res.run_id)}
    reg = res.registration
    version = client.get_model_version(reg.name, reg.version)
    assert version.tags["adapterflow.search_run_id"] == res.run_id
    assert json.loads(version.tags["adapterflow.trial_config"]) == res.best["config"]
    assert reg.moved  # the first version takes the alias


def test_trials_with_train_workers_and_a_failing_trial(tiny_llama, toy_data, tmp_path, ray_session):
    """FIFO trials that each launch a Ray Train job (1 DeepSpeed worker); a trial whose target modules the
    model does not have fails with its error (PEFT's) recorded, and the search finishes with the other."""
    from rich.console import Console

    from pipelines.search import run_search
    from pipelines.spec import parse_spec

    d = _spec_dict(tiny_llama, toy_data, tmp_path)
    d["train"].update(num_workers=1, epochs=1)
    d["tune"].update(num_samples=1, space={"adapter.target_modules": {"grid": [["q_proj", "v_proj"], ["no_such_proj"]]}})
    spec = parse_spec(d)
    res = run_search(spec, d, Console(record=True, width=120))
    assert res.counts["finished"] == 1 and res.counts["failed"] == 1, res.counts
    (failed,) = [r for r in res.trials if r["status"] == "failed"]
    assert failed["config"] == {"adapter.target_modules": ["no_such_proj"]}
    assert "No modules were targeted" in failed["error"], failed["error"]
    assert res.best["config"] == {"adapter.target_modules": ["q_proj", "v_proj"]}
    _, children = _runs(spec, res.run_id)
    by_status = {r.data.tags["adapterflow.trial_status"]: r for r in children}
    assert set(by_status) == {"finished", "failed"}
    assert "No modules were targeted" in by_status["failed"].data.tags["adapterflow.error"]
