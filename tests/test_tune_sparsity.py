"""Sparsity sweeps on Ray Tune: a SpaRTA sparsity grid whose trials' trainable-parameter counts follow
SpaRTA's draw; a Wanda ratio grid of SparsePEFT trials, each training on a base Wanda-pruned with its
sampled ratio (zeros counted in the saved weights), the winner registered on the sparse base it trained
on; the metric-vs-sparsity plot in the parent run; the sweep's spec rules."""

import json
import math

import pytest

from workers.errors import SpecError

from helpers import HEAD, METHOD_CASES, SPARTA_POOL, mlflow_client, spec_for


def _sweep(tiny_llama, toy_data, tmp, adapter: dict, space: dict, **tune) -> dict:
    d = spec_for(tiny_llama, toy_data, tmp, epochs=1, checkpoint_every=7).model_dump(mode="json", exclude={"tune"})
    d["adapter"] = adapter
    d["tune"] = {"space": space, "num_samples": 1, "selection_fraction": 0.1, **tune}
    return d


@pytest.mark.parametrize("change,message", [
    (lambda d: d["tune"]["space"].update({"sparsify.output": {"choice": ["/tmp/x"]}}),
     "tune.space.sparsify.output: cannot be searched"),
    (lambda d: d["sparsify"].update(output="/tmp/x"), "sparsify.output: with sparsify.* keys in tune.space"),
    (lambda d: d["sparsify"].update(split="validation"), "sparsify.split: 'validation' is the evaluation split"),
])
def test_a_sweep_refuses_what_would_mix_trials_or_splits(tiny_llama, toy_data, tmp_path, change, message):
    from pipelines.spec import parse_spec

    d = _sweep(tiny_llama, toy_data, tmp_path, {"method": "lora"}, {"sparsify.ratio": {"grid": [0.3, 0.5]}})
    parse_spec(d)  # valid as it is
    change(d)
    with pytest.raises(SpecError) as err:
        parse_spec(d)
    assert message in str(err.value), str(err.value)


def test_a_calibration_split_the_data_lacks_is_refused_before_any_trial(tiny_llama, toy_data, tmp_path):
    from pipelines.search import check_search
    from pipelines.spec import parse_spec
    from workers.errors import DataError

    d = _sweep(tiny_llama, toy_data, tmp_path, {"method": "lora"}, {"sparsify.ratio": {"grid": [0.3, 0.5]}})
    d["sparsify"]["split"] = "unlabelled"
    with pytest.raises(DataError, match="sparsify.split 'unlabelled' is missing or empty"):
        check_search(parse_spec(d))


def _parent(spec, run_id):

    client = mlflow_client(spec.workspace_path())
    exp = client.get_experiment_by_name(spec.track.experiment)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    return client, {a.path for a in client.list_artifacts(run_id)}, children


def test_a_sparta_sweep_reports_each_levels_trainable_parameters(tiny_llama, toy_data, tmp_path, ray_session):
    from rich.console import Console
    from safetensors.torch import load_file

    from pipelines.search import run_search
    from pipelines.spec import parse_spec

    levels = [0.95, 0.9]
    d = _sweep(tiny_llama, toy_data, tmp_path, METHOD_CASES["sparta"]["adapter"],
               {"adapter.sparsity": {"grid": levels}}, register_winner=False)
    spec = parse_spec(d)
    res = run_search(spec, d, Console(record=True, width=120))
    assert res.counts["finished"] == 2, res.counts
    counts = {}
    for row in res.trials:
        m, s = row["metrics"], row["config"]["adapter.sparsity"]
        assert m["adapter_sparsity"] == s and "base_sparsity" not in m and 0 <= m["held_out_accuracy"] <= 1
        target = (1 - s) * m["total_params"]  # SpaRTA's draw: the head counts in its budget
        p = (target - HEAD) / SPARTA_POOL
        assert 0 < p < 1 and abs(m["trainable_params"] - target) < 4 * math.sqrt(SPARTA_POOL * p * (1 - p)), (s, m)
        deltas = load_file(f"{row['checkpoint']}/adapter/sparse_deltas.safetensors")
        assert sum(t.numel() for k, t in deltas.items() if k.startswith("deltas.")) == m["trainable_params"]
        counts[s] = m["trainable_params"]
    assert counts[0.95] < counts[0.9]
    _, artifacts, children = _parent(spec, res.run_id)
    assert "metric_vs_sparsity.png" in artifacts and "metric_vs_sparsity.png" in res.plots
    assert sorted(r.data.metrics["adapter_sparsity"] for r in children) == levels[::-1]


def test_a_wanda_sweep_trains_sparsepeft_on_each_trials_sparse_base(tiny_llama, toy_data, tmp_path, ray_session):
    from rich.console import Console
    from safetensors.torch import load_file

    from pipelines.search import run_search
    from pipelines.spec import parse_spec
    from tune.sparsity import discard_sparse_bases
    from workers.config import ModelSpec
    from workers.models import base_fingerprint
    from workers.store import registered_base, resolve

    ratios = [0.25, 0.5]
    d = _sweep(tiny_llama, toy_data, tmp_path, METHOD_CASES["sparsepeft"]["adapter"],
               {"sparsify.ratio": {"grid": ratios}}, keep_sparse_bases="all")
    d["sparsify"].update(n_samples=32, seq_len=16)
    spec = parse_spec(d)
    res = run_search(spec, d, Console(record=True, width=120))
    assert res.counts["finished"] == 2, res.counts
    root = spec.workspace_path() / "sparse" / f"{spec.name}-search"
    bases = {}
    for row in res.trials:
        m, ratio = row["metrics"], row["config"]["sparsify.ratio"]
        base = m["sparse_base"]
        assert base == str(root / row["trial"]) and 0 <= m["held_out_accuracy"] <= 1
        assert m["trainable_params"] == METHOD_CASES["sparsepeft"]["trainable"]
        weights = load_file(f"{base}/model.safetensors")
        pruned = {k: w for k, w in weights.items() if k.startswith("model.layers.") and w.dim() == 2}
        assert len(pruned) == 2 * 7  # q k v o gate up down of both blocks
        zeros = sum(int((w == 0).sum()) for w in pruned.values())
        for name, w in pruned.items():  # Wanda zeroes int(ratio * in) of every row
            assert ((w == 0).sum(1) == int(w.shape[1] * ratio)).all(), (ratio, name)
        assert m["base_sparsity"] == pytest.approx(zeros / sum(w.numel() for w in pruned.values()))
        assert m["base_sparsity"] == pytest.approx(ratio)
        assert int((weights["score.weight"] == 0).sum()) == 0  # the head stays dense
        bases[ratio] = base

    winner = res.best["metrics"]["sparse_base"]
    manifest = json.loads((res.adapter_dir / "adapterflow.json").read_text())
    assert manifest["base_model"] == {"name": winner, "sha256": base_fingerprint(ModelSpec(name=winner))}
    reg = res.registration
    uri = f"sqlite:///{spec.workspace_path() / 'mlflow.db'}"
    _, resolved = resolve(f"models:/{reg.name}@{reg.alias}", tracking_uri=uri, dst=tmp_path / "dl")
    assert resolved["base_model"]["name"] == winner and registered_base(f"models:/{reg.name}/{reg.version}", uri)[
        "name"] == winner
    assert res.report["split"] == "validation"  # the winner scored on the evaluation split, on its sparse base
    _, artifacts, children = _parent(spec, res.run_id)
    assert "metric_vs_sparsity.png" in artifacts
    assert sorted(round(r.data.metrics["base_sparsity"], 2) for r in children) == ratios

    earlier = root / "an-earlier-search-trial"  # a base another search of this name registered
    earlier.mkdir()
    gone = discard_sparse_bases(res.trials, res.best, "winner")  # what keep_sparse_bases: winner does
    assert [str(g) for g in gone] == [b for b in bases.values() if b != winner]
    assert sorted(p.name for p in root.iterdir()) == sorted([res.best["trial"], earlier.name])
