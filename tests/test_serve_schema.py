"""The served API against its own OpenAPI schema: schemathesis sends generated requests (bounded)
and no input gives a 5xx, every status is declared, every body conforms to its declared schema
(errors included); request limits answer 413 in the declared error shape."""

import os

import httpx
import jsonschema
import pytest
import schemathesis
from conftest import ADMIN_KEY_ENV
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

LIMITS = {"max_inputs": 8, "max_body_bytes": 4096, "max_prompt_tokens": 12, "max_tokens": 48}


@pytest.fixture(scope="module")
def apps(trained_adapters, serve_port, ray_session):
    from serve.deploy import deploy, shutdown

    cls, lm = trained_adapters("lora"), trained_adapters("alora")
    url = deploy({"toy": str(cls["folder"])}, port=serve_port, name="schema-cls", route_prefix="/sc",
                 num_cpus=0.25, base=cls["spec"].model.model_dump(mode="json"), limits=LIMITS)
    lm_url = deploy({"lm": str(lm["folder"])}, port=serve_port, name="schema-lm", route_prefix="/sl",
                    num_cpus=0.25, base=lm["spec"].model.model_dump(mode="json"), limits=LIMITS,
                    admin_key_env=ADMIN_KEY_ENV)
    yield {"cls": url, "lm": lm_url}
    shutdown("schema-cls")
    shutdown("schema-lm")


@pytest.mark.parametrize("app", ["cls", "lm"])
def test_no_input_gives_a_server_error_and_responses_conform(apps, app):
    """Every operation of the app's schema, 30 generated requests each (15 on the language model; bounded): a
    classifier app, and a language-model app with the admin routes on (requests carry the admin key half of
    the time)."""
    api = schemathesis.openapi.from_url(f"{apps[app]}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/classify", "/v1/completions", "/v1/models", "/healthz"}
    seen = []
    for op in operations:

        @settings(max_examples=30 if app == "cls" else 15, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(case=op.as_strategy())
        def check(case):
            if isinstance(case.body, dict) and case.body.get("stream"):
                case.body["stream"] = False  # streaming is tested on its own (test_serve_http)
            if app == "lm" and len(seen) % 2 and case.method != "DELETE":  # (never unload the app's adapter)
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {os.environ[ADMIN_KEY_ENV]}"}
            response = case.call(timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                     response_schema_conformance])

        check()
    assert len(seen) >= 4 * 10 and {200, 404, 422} <= set(seen), sorted(set(seen))


def _validate_error(url, payload):
    """`payload` against the ErrorBody the app's own schema declares."""
    components = httpx.get(f"{url}/openapi.json", timeout=30).json()["components"]
    schema_ = {"$ref": "#/components/schemas/ErrorBody", "components": components}
    jsonschema.validate(payload, schema_)


@pytest.mark.parametrize("body,what", [
    ({"adapter": "toy", "inputs": ["good"] * 9}, "9 inputs in one request, over this server's limit of 8"),
    ({"adapter": "toy", "inputs": ["good " * 1000]}, "over this server's limit of 4096 (serve.max_body_bytes)"),
])
def test_limits_answer_413_in_the_declared_shape(apps, body, what):
    r = httpx.post(f"{apps['cls']}/v1/classify", json=body, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
    assert what in r.json()["error"]["message"]
    _validate_error(apps["cls"], r.json())


def test_a_long_prompt_answers_413(apps):
    r = httpx.post(f"{apps['lm']}/v1/completions", json={"model": "lm", "prompt": "say the word good " * 10,
                                                          "max_tokens": 2}, timeout=60)
    assert r.status_code == 413 and "over this server's limit of 12 (serve.max_prompt_tokens)" in r.text
    ok = httpx.post(f"{apps['lm']}/v1/completions", json={"model": "lm", "prompt": "say", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_every_error_status_is_declared(apps):
    spec = httpx.get(f"{apps['cls']}/openapi.json", timeout=30).json()
    for path in ("/v1/classify", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "409", "413", "422", "500", "503"} <= set(responses), responses
        for code in ("400", "404", "409", "413", "422", "500", "503"):
            assert responses[code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


def test_a_chunked_body_over_the_limit_answers_413(apps):
    """A body sent in chunks (no content-length) is read only up to serve.max_body_bytes."""
    def chunks(n):
        yield b'{"adapter": "toy", "inputs": ["'
        for _ in range(n):
            yield b"good " * 100
        yield b'"]}'

    r = httpx.post(f"{apps['cls']}/v1/classify", content=chunks(20), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["error"]["message"], r.text
    _validate_error(apps["cls"], r.json())
    small = httpx.post(f"{apps['cls']}/v1/classify", content=chunks(1), headers={"content-type": "application/json"},
                       timeout=60)
    assert small.status_code == 200, small.text


def test_max_tokens_over_the_limit_answers_413(apps):
    url = f"{apps['lm']}/v1/completions"
    r = httpx.post(url, json={"model": "lm", "prompt": "say", "max_tokens": 49}, timeout=60)
    assert r.status_code == 413 and "limit of 48 (serve.max_tokens)" in r.json()["error"]["message"], r.text
    chat = httpx.post(f"{apps['lm']}/v1/chat/completions", timeout=60, json={
        "model": "lm", "messages": [{"role": "user", "content": "say"}], "max_completion_tokens": 49})
    assert chat.status_code == 413, chat.text
    _validate_error(apps["lm"], r.json())


def test_a_malformed_field_is_named_in_param(apps):
    r = httpx.post(f"{apps['cls']}/v1/classify", json={"adapter": "toy", "inputs": "not a list"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == "inputs", r.text
    _validate_error(apps["cls"], r.json())
