"""The NLS sub-adapter search: a super-adapter trained with the selection slice held out, its rank
configurations evaluated (no training) by Ray Tune trials with Optuna's multi-objective TPE and SQFT's
reference configurations, the Pareto front as CSV and PNG, the chosen sub-adapter extracted (stock
PEFT loads it) and registered with its lineage; a grid over a given super-adapter; bad sections."""

import csv
import json

import pytest

from workers.errors import SpecError

from helpers import mlflow_client, spec_for

SPACE = [4, 3, 2]
TARGETS = ["q_proj", "v_proj", "down_proj"]
COST = (32 + 32) + (32 + 16) + (64 + 32)  # (in + out) of q, v, down in one layer of the tiny Llama


def _spec_dict(tiny_llama, toy_data, tmp, **tune):
    spec = spec_for(tiny_llama, toy_data, tmp, epochs=2, lr=3e-2)
    d = spec.model_dump(mode="json", exclude={"tune"})
    d["name"] = "nls-search"
    d["adapter"] = {"method": "nls", "alpha": 8, "search_space": SPACE, "target_modules": TARGETS, "dropout": 0.0}
    d["tune"] = {"nls": {}, "searcher": "optuna", "num_samples": 4, "selection_fraction": 0.2, "seed": 2, **tune}
    return d


@pytest.mark.parametrize("tune,adapter,message", [
    ({"space": {"train.lr": {"choice": [0.1]}}}, None, "tune.space: an NLS search's space is the super-adapter's"),
    ({"searcher": "hyperopt"}, None, "hyperopt has one objective"),
    ({"nls": {"grid": True}}, None, "tune.nls.grid: every configuration is evaluated; set searcher: random"),
    ({"scheduler": "asha"}, None, "nothing to stop early; use fifo"),
    ({}, {"method": "lora", "r": 4}, "adapter.method lora has no sub-adapters to search: use one that has (nls)"),
])
def test_a_bad_nls_section_is_one_clear_error(tiny_llama, toy_data, tmp_path, tune, adapter, message):
    from pipelines.spec import parse_spec

    d = _spec_dict(tiny_llama, toy_data, tmp_path, **tune)
    if adapter:
        d["adapter"] = adapter
    with pytest.raises(SpecError) as err:
        parse_spec(d)
    assert message in str(err.value), str(err.value)


def test_a_missing_super_adapter_folder_fails_before_anything_runs(tiny_llama, toy_data, tmp_path):
    from rich.console import Console

    from pipelines.nls_search import run_nls_search
    from pipelines.spec import parse_spec

    d = _spec_dict(tiny_llama, toy_data, tmp_path, nls={"super_adapter": str(tmp_path / "nowhere")})
    with pytest.raises(SpecError, match="tune.nls.super_adapter: .* is not a folder"):
        run_nls_search(parse_spec(d), d, Console(record=True))
    assert not (tmp_path / "ws" / "tune").exists()


@pytest.fixture(scope="module")
def searched(tiny_llama, toy_data, tmp_path_factory, ray_session):
    from rich.console import Console

    from pipelines.nls_search import run_nls_search
    from pipelines.spec import parse_spec

    d = _spec_dict(tiny_llama, toy_data, tmp_path_factory.mktemp("nls-search"))
    spec = parse_spec(d)
    console = Console(record=True, width=140)
    return spec, run_nls_search(spec, d, console), console


def _client(spec):

    return mlflow_client(spec.workspace_path())


def _holdout_accuracy(spec, folder):
    """A configuration's held-out accuracy recomputed through stock PEFT on its extracted sub-adapter."""
    from peft import PeftModel

    from workers.data import encode, load_holdout
    from workers.evaluate import evaluate_model
    from workers.models import load_model, load_tokenizer

    data = spec.data.model_copy(update={"holdout_fraction": 0.2, "holdout_seed": 0})
    tok = load_tokenizer(spec.model)
    model = PeftModel.from_pretrained(load_model(spec.model, tok), str(folder)).eval()
    return evaluate_model(model, tok, encode(load_holdout(data), data, spec.model, tok), "seq-cls", 2)["accuracy"]


def _front(rows):
    """Non-dominated rows by brute force: higher accuracy, fewer parameters."""
    return {tuple(r["ranks"]) for r in rows
            if not any(o["metric"] >= r["metric"] and o["params"] <= r["params"]
                       and (o["metric"] > r["metric"] or o["params"] < r["params"]) for o in rows)}


def test_the_search_evaluates_configurations_and_registers_the_chosen_subadapter(searched, tmp_path):
    from peft import PeftModel

    from workers.artifact import verify
    from workers.methods.nls import extract_subadapter
    from workers.models import load_model, load_tokenizer

    spec, res, console = searched
    assert res.counts["failed"] == 0 and len(res.trials) == 3 + 4, res.counts  # references + proposals
    rows = {tuple(r["ranks"]): r for r in res.rows}
    assert {r["reference"] for r in res.rows} >= {"maximal", "heuristic", "minimal"}
    assert rows[(4, 4)]["reference"] == "maximal" and rows[(3, 3)]["reference"] == "heuristic"
    assert rows[(2, 2)]["reference"] == "minimal"
    for ranks, r in rows.items():
        assert r["params"] == COST * sum(ranks)  # one layer per group: r * (in + out) summed
    accuracies = {r["metric"] for r in res.rows}
    assert len(accuracies) > 1, accuracies  # the configurations really are different models
    # two configurations' held-out scores, recomputed through stock PEFT on their extracted sub-adapters
    for ranks in [(4, 4), (2, 2)]:
        sub = extract_subadapter(res.super_adapter, tmp_path / "-".join(map(str, ranks)), list(ranks))
        assert sub["lora_params"] == rows[ranks]["params"]
        assert _holdout_accuracy(spec, tmp_path / "-".join(map(str, ranks))) == pytest.approx(rows[ranks]["metric"])

    # the front, by brute force; the chosen one: the smallest on it within max_drop (0.01) of the best
    front = _front(res.rows)
    assert {tuple(r["ranks"]) for r in res.rows if r["on_front"]} == front
    best = max(r["metric"] for r in res.rows)
    within = [r for r in res.rows if tuple(r["ranks"]) in front and r["metric"] >= best - 0.01]
    assert res.chosen["params"] == min(r["params"] for r in within)
    with open(res.pareto_csv) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(res.rows) and {int(t["lora_params"]) for t in table} == {r["params"] for r in res.rows}
    assert {t["ranks"] for t in table if t["on_front"] == "1"} == {" ".join(map(str, f)) for f in front}
    assert [t for t in table if t["chosen"] == "1"][0]["ranks"] == " ".join(map(str, res.chosen["ranks"]))
    assert res.pareto_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pareto front" in console.export_text()

    # the super-adapter: its own run under the search's, trained without the selection slice
    client = _client(spec)
    super_run = client.get_run(res.super_run_id)
    assert super_run.data.tags["mlflow.parentRunId"] == res.run_id
    assert verify(res.super_adapter)["holdout"] == {"fraction": 0.2, "seed": 0}
    children = [r for r in client.search_runs([super_run.info.experiment_id],
                                              f"tags.`mlflow.parentRunId` = '{res.run_id}'")
                if "adapterflow.trial_id" in r.data.tags]
    assert len(children) == len(res.trials)
    assert all("held_out_accuracy" in r.data.metrics and "lora_params" in r.data.metrics for r in children)
    assert {"pareto_front.png", "pareto_front.csv", "trials.json", "evaluation.json"} <= {
        a.path for a in client.list_artifacts(res.run_id)}

    # the chosen sub-adapter: plain LoRA at its ranks, evaluated on the evaluation split, registered
    manifest = verify(res.adapter_dir)
    assert manifest["method"] == "lora" and manifest["nls"]["ranks"] == res.chosen["ranks"]
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert sorted(set(cfg["rank_pattern"].values())) == sorted(set(res.chosen["ranks"]))
    tok = load_tokenizer(spec.model)
    PeftModel.from_pretrained(load_model(spec.model, tok), str(res.adapter_dir))  # stock PEFT loads it
    assert res.report["split"] == "validation" and res.report["n"] == 64
    assert set(res.references) == {"maximal", "heuristic", "minimal"}
    reg = res.registration
    version = client.get_model_version(reg.name, reg.version)
    assert json.loads(version.tags["adapterflow.nls_ranks"]) == res.chosen["ranks"]
    assert version.tags["adapterflow.super_adapter_run_id"] == res.super_run_id
    assert version.tags["adapterflow.search_run_id"] == res.run_id
    assert int(version.tags["adapterflow.lora_params"]) == res.chosen["params"]


def test_a_grid_over_a_given_super_adapter_evaluates_every_configuration(searched, tmp_path):
    from rich.console import Console

    from pipelines.nls_search import run_nls_search
    from pipelines.spec import parse_spec

    spec, first, _ = searched
    d = spec.model_dump(mode="json")
    d["workspace"] = str(tmp_path / "ws")
    d["tune"] = {"nls": {"super_adapter": str(first.super_adapter), "grid": True, "max_drop": 0.0},
                 "selection_fraction": 0.2, "register_winner": False}
    res = run_nls_search(parse_spec(d), d, Console(record=True, width=140))
    assert len(res.rows) == 9 and res.counts["finished"] == 9  # 3 x 3 rank configurations
    assert {tuple(r["ranks"]) for r in res.rows if r["on_front"]} == _front(res.rows)
    best = max(r["metric"] for r in res.rows)
    assert res.chosen["metric"] == best  # max_drop 0: the best, the smallest of those
    assert res.chosen["params"] == min(r["params"] for r in res.rows if r["metric"] == best)
    # the same configurations score the same as in the first search (one super-adapter, one slice)
    firsts = {tuple(r["ranks"]): r["metric"] for r in first.rows}
    for r in res.rows:
        if tuple(r["ranks"]) in firsts:
            assert r["metric"] == pytest.approx(firsts[tuple(r["ranks"])])
    assert res.registration is None
