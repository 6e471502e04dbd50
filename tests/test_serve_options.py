"""How the Serve application is composed from the spec, without starting it: an ingress over one
model deployment per replica group, each with the spec's replicas, autoscaling, resources and device.
(There is no GPU here: the GPU options are checked as the deployment Ray would start, not run.)"""

from serve.config import ServeSpec
from serve.deploy import build_app

BASE = {"name": "some/model", "task": "seq-cls"}


def _models(app) -> dict:
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    return {group: bound._bound_deployment for group, bound in ingress.init_args[0].items()}


def test_one_model_deployment_per_replica_group():
    groups = {"l1": "lora", "i1": "ia3", "l2": "lora", "s1": "sparta"}
    app = build_app(dict.fromkeys(groups, "/unused"), base=BASE, groups=groups, num_replicas=3, num_cpus=0.25)
    models = _models(app)
    assert list(models) == ["lora", "ia3", "sparta"]  # the first group takes the base model's requests
    assert {g: sorted(d.init_args[0]) for g, d in models.items()} == {
        "lora": ["l1", "l2"], "ia3": ["i1"], "sparta": ["s1"]}
    for group, d in models.items():
        assert d.name == f"Model-{group}" and d.init_args[-1] == group
        assert d.num_replicas == 3 and d.ray_actor_options == {"num_cpus": 0.25}
        assert d.max_ongoing_requests == 64
    assert app._bound_deployment.init_args[1] == groups
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 0.0}


def test_gpu_replicas_and_autoscaling_are_selected_by_config():
    app = build_app({"a": "/unused"}, base=BASE, groups={"a": "lora"}, num_gpus=1,
                    autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
    (d,) = _models(app).values()
    assert d.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 1.0}
    cfg = d._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 4, 8)
    options = ServeSpec.model_validate(d.init_args[3])
    assert options.resolved_device() == "cuda"  # what the replica's Engine is built on
    assert ServeSpec().resolved_device() == "cpu" and ServeSpec(num_gpus=0.5, device="cpu").resolved_device() == "cpu"


def test_autoscaling_bounds_are_checked():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_replicas"):
        ServeSpec(autoscaling={"min_replicas": 3, "max_replicas": 2})
