import os
import sys
from pathlib import Path

import pytest

from workers.common import quiet_environment

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from a hub at run time
os.environ["ADAPTERFLOW_NO_UP"] = "1"  # a developer's `adapterflow up` head never runs the suite's jobs
quiet_environment()

API_KEY_ENV = "ADAPTERFLOW_TEST_API_KEY"
os.environ.setdefault(API_KEY_ENV, "test-" + os.urandom(8).hex())  # before Ray starts: replicas inherit it
ADMIN_KEY_ENV = "ADAPTERFLOW_TEST_ADMIN_KEY"
os.environ.setdefault(ADMIN_KEY_ENV, "admin-" + os.urandom(8).hex())

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "plugins"))  # the toy method plugin (tests/plugins/toy_gain)

import faults  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = _free_port()  # Ray's Prometheus endpoint for this test run
FAULT_PLAN = Path(os.environ.setdefault(faults.PLAN_ENV, f"/tmp/adapterflow-fault-plan-{os.getpid()}.json"))

from helpers import (  # noqa: E402
    make_tiny_llama,
    toy_instructions,
    toy_sentiment,
    train_method_case,
    write_jsonl,
    write_tsv,
)

# tests/cluster starts its own Ray cluster: it runs in a pytest process of its own (`make test`'s second step)
collect_ignore = ["cluster"]

RAY_FIXTURES = {"ray_session", "trained_adapters", "trained_causal", "serve_port"}


def pytest_collection_modifyitems(config, items):
    """Tiers: a test that needs the shared Ray instance is marked `ray` (modules that run 2-worker jobs
    or the end-to-end pipeline mark themselves `slow`). `make test` runs every tier; `make test-unit`
    runs what needs no Ray."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy-data")
    write_tsv(d / "train.tsv", toy_sentiment(256, seed=0))
    write_tsv(d / "validation.tsv", toy_sentiment(64, seed=1))
    return d


@pytest.fixture(scope="session")
def toy_instruct(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy-instruct")
    write_jsonl(d / "train.jsonl", toy_instructions(128, seed=0))
    write_jsonl(d / "validation.jsonl", toy_instructions(32, seed=1))
    return d


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test run (starting Ray here takes seconds)."""
    import ray

    if not ray.is_initialized():
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(faults)  # the hook travels by value: workers need no tests/
        env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", API_KEY_ENV, ADMIN_KEY_ENV,
                                             faults.PLAN_ENV)}
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 _metrics_export_port=METRICS_PORT,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": faults.worker_setup,
                              "py_modules": [str(TESTS / "plugins" / "toy_gain")]})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()



@pytest.fixture(scope="session")
def trained_adapters(tiny_llama, toy_data, toy_instruct, tmp_path_factory, ray_session):
    """`trained_adapters(method)`: that method's test case trained once per session (local mode)."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = train_method_case(name, tiny_llama, toy_data, toy_instruct, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def trained_causal(tiny_llama, toy_data, toy_instruct, tmp_path_factory, ray_session):
    """`trained_causal(method)`: that method's case trained as a causal-LM adapter, once per session."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = train_method_case(name, tiny_llama, toy_data, toy_instruct,
                                            tmp_path_factory.mktemp(f"{name}-lm"), task="causal-lm")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def sparse_base(tiny_llama, tmp_path_factory):
    """The tiny Llama Wanda-pruned to 50 % (unstructured), saved as a model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.wanda import Pattern, calibration_batches, sparsify

    from helpers import FILL, NEG, POS

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    texts = [" ".join((FILL + POS + NEG)[i:] + (FILL + POS + NEG)[:i]) for i in range(40)]
    report = sparsify(model, calibration_batches(tok, texts, seq_len=16, n_samples=32), Pattern(ratio=0.5))
    assert report["total"]["sparsity"] == pytest.approx(0.5)
    out = tmp_path_factory.mktemp("sparse-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def metrics_url(ray_session) -> str:
    """Ray's metrics endpoint (Prometheus text) of this test run's Ray instance."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


@pytest.fixture
def fault_plan():
    """Where a test writes a fault plan (tests/faults.py) for the Ray workers; cleared afterwards."""
    faults.clear(FAULT_PLAN)
    yield FAULT_PLAN
    faults.clear(FAULT_PLAN)


@pytest.fixture(scope="session")
def serve_port() -> int:
    """One HTTP port for Ray Serve's proxy for the whole run (the proxy outlives apps)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
