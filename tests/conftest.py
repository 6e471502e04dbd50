import os
import sys
from pathlib import Path

import pytest

for k, v in {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
             "DO_NOT_TRACK": "true", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(k, v)

API_KEY_ENV = "ADAPTERFLOW_TEST_API_KEY"
os.environ.setdefault(API_KEY_ENV, "test-" + os.urandom(8).hex())  # before Ray starts: replicas inherit it

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_tiny_llama, toy_instructions, toy_sentiment, write_jsonl, write_tsv  # noqa: E402


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
        env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", API_KEY_ENV)}
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": env})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()



@pytest.fixture(scope="session")
def serve_port() -> int:
    """One HTTP port for Ray Serve's proxy for the whole run (the proxy outlives apps)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
