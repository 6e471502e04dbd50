"""The Ray Serve app over real HTTP (httpx and the `openai` client): answers, error shapes, auth.
References are computed in the test with PEFT directly (merged weights), not through the engine."""

import os

import httpx
import openai
import pytest
import torch
from conftest import API_KEY_ENV

from workers.stages import build_artifact, launch_training

from helpers import need_shared, spec_for

pytestmark = pytest.mark.slow

# the messages' contents joined by spaces (stories260K's tokenizer has no chat template of its own)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"


@pytest.fixture(scope="module")
def adapters(tiny_llama, toy_data, toy_instruct, tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("serve")
    cls_spec = spec_for(tiny_llama, toy_data, tmp / "cls", epochs=2, lr=1e-2)
    cls_spec.data.input_template = "{sentence}"
    out = launch_training(cls_spec, run_name="serve-cls")
    cls_dir = build_artifact(cls_spec, out.checkpoint, tmp / "cls-adapter")
    from helpers import adapter_spec

    unc_spec = cls_spec.model_copy(update={"adapter": adapter_spec(
        {"method": "pvera", "r": 8, "target_modules": ["q_proj", "v_proj"]})})
    unc_spec.workspace = str(tmp / "unc")
    out = launch_training(unc_spec, run_name="serve-unc")
    unc_dir = build_artifact(unc_spec, out.checkpoint, tmp / "unc-adapter")
    lm_spec = spec_for(need_shared("models", "stories260K"), toy_instruct, tmp / "lm", task="causal-lm",
                       epochs=2, lr=1e-2)
    out = launch_training(lm_spec, run_name="serve-lm")
    lm_dir = build_artifact(lm_spec, out.checkpoint, tmp / "lm-adapter")
    return {"cls": (cls_spec, cls_dir), "lm": (lm_spec, lm_dir), "unc": (unc_spec, unc_dir)}


@pytest.fixture(scope="module")
def server(adapters, serve_port, ray_session):
    from serve.deploy import deploy, shutdown

    def base(kind):  # the operator's base: the spec's model section (the LM's with a chat template)
        model = adapters[kind][0].model.model_dump(mode="json")
        return {**model, "chat_template": CHAT_TEMPLATE} if kind == "lm" else model

    url = deploy({"toy": str(adapters["cls"][1])}, port=serve_port, name="cls", route_prefix="/cls",
                 num_cpus=0.25, base=base("cls"))
    deploy({"story": str(adapters["lm"][1])}, port=serve_port, name="lm", route_prefix="/lm",
           num_cpus=0.25, api_key_env=API_KEY_ENV, base=base("lm"))
    deploy({"unc": str(adapters["unc"][1])}, port=serve_port, name="unc", route_prefix="/unc", num_cpus=0.25,
           base=base("unc"))
    root = url.rsplit("/cls", 1)[0]
    yield root
    shutdown("cls")
    shutdown("lm")
    shutdown("unc")


def reference_model(spec, adapter_dir):
    from peft import PeftModel

    from workers.models import load_model, load_tokenizer

    tok = load_tokenizer(spec.model)
    return tok, PeftModel.from_pretrained(load_model(spec.model, tok), str(adapter_dir)).merge_and_unload().eval()


def test_healthz_and_models(server):
    r = httpx.get(f"{server}/cls/healthz?replicas=true")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["adapters"] == ["toy"]
    assert r.json()["replica"] and r.json()["groups"] == {"lora": {"replica": r.json()["replica"], "adapters": ["toy"]}}
    assert httpx.get(f"{server}/cls/healthz").json() == {"status": "ok"}  # the probe's route asks no replica
    m = httpx.get(f"{server}/cls/v1/models").json()
    assert m["data"][0]["id"] == "toy" and m["data"][0]["task"] == "seq-cls" and m["data"][0]["method"] == "lora"


def test_classify_matches_a_merged_reference(server, adapters):
    spec, folder = adapters["cls"]
    texts = ["good great lovely movie", "bad awful dull plot", "the cast was fun"]
    r = httpx.post(f"{server}/cls/v1/classify", json={"adapter": "toy", "inputs": texts + [{"sentence": texts[0]}]},
                   timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    tok, ref = reference_model(spec, folder)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(ref(**tok(t, return_tensors="pt")).logits[0], -1) for t in texts])
    for row, p in zip(results, probs):
        assert row["probabilities"]["negative"] == pytest.approx(p[0].item(), abs=1e-5)
        assert row["probabilities"]["positive"] == pytest.approx(p[1].item(), abs=1e-5)
        assert row["label"] == ["negative", "positive"][int(p.argmax())]
    # a dict input goes through the adapter's input_template to the same text
    assert results[3]["probabilities"] == pytest.approx(results[0]["probabilities"], abs=1e-6)


@pytest.mark.parametrize("body,status,kind", [
    ({"adapter": "nope", "inputs": ["x"]}, 404, "adapter_not_found"),
    ({"adapter": "toy"}, 422, "invalid_request"),
    ({"adapter": "toy", "inputs": []}, 422, "invalid_request"),
    ({"adapter": "toy", "inputs": [1]}, 422, "invalid_request"),
    ({"adapter": "toy", "inputs": ["x"], "extra": 1}, 422, "invalid_request"),
    ({"adapter": "toy", "inputs": ["x"], "samples": -1}, 422, "invalid_request"),
    ({"adapter": "toy", "inputs": ["x"], "samples": 8}, 400, "wrong_task"),  # Monte-Carlo: PVeRA only
    # a record without the adapter's input_template field: a user error (it was a 500 before)
    ({"adapter": "toy", "inputs": [{"text": "x"}]}, 400, "invalid_request"),
])
def test_classify_errors_have_a_stable_shape(server, body, status, kind):
    r = httpx.post(f"{server}/cls/v1/classify", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["code"] == status and err["message"]


def test_malformed_json_is_422(server):
    r = httpx.post(f"{server}/cls/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"


def test_wrong_task_is_400(server):
    r = httpx.post(f"{server}/cls/v1/completions", json={"model": "toy", "prompt": "hi"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "wrong_task"


def test_completions_with_the_openai_client_match_a_merged_reference(server, adapters):
    spec, folder = adapters["lm"]
    client = openai.OpenAI(base_url=f"{server}/lm/v1", api_key=os.environ[API_KEY_ENV], max_retries=0)
    prompt = "say the word good"
    out = client.completions.create(model="story", prompt=prompt, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == "story"
    choice = out.choices[0]
    tok, ref = reference_model(spec, folder)
    enc = tok(spec.model.prompt_format.format(prompt=prompt), return_tensors="pt")
    with torch.no_grad():
        ids = ref.generate(**enc, max_new_tokens=12, do_sample=False,
                           pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:]
    ids = ids.tolist()
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    assert choice.text == tok.decode(ids, skip_special_tokens=True)
    assert out.usage.prompt_tokens == enc["input_ids"].shape[1]
    assert out.usage.completion_tokens == len(ids)
    assert choice.finish_reason in ("stop", "length")


def test_completion_sampling_is_seeded(server):
    headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"}
    body = {"model": "story", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    a = httpx.post(f"{server}/lm/v1/completions", json=body, headers=headers, timeout=60).json()
    b = httpx.post(f"{server}/lm/v1/completions", json=body, headers=headers, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_auth_is_enforced_when_configured(server):
    body = {"model": "story", "prompt": "hi", "max_tokens": 2}
    r = httpx.post(f"{server}/lm/v1/completions", json=body, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    r = httpx.post(f"{server}/lm/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/lm/v1", api_key="wrong", max_retries=0).completions.create(
            model="story", prompt="hi", max_tokens=2)
    assert httpx.get(f"{server}/lm/healthz").status_code == 200  # health needs no key


@pytest.mark.parametrize("body", [
    {"model": "story", "prompt": "hi", "max_tokens": 0},
    {"model": "story", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
    {"model": "story", "prompt": "hi", "stop": ""},
    {"model": "story"},
])
def test_completion_validation_is_422(server, body):
    headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"}
    r = httpx.post(f"{server}/lm/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"


def test_serve_command_serves_an_adapter_folder(adapters, server, ray_session):
    """`adapterflow serve FOLDER` as a user runs it, joined to this test run's Ray instance."""
    import signal
    import subprocess
    import sys
    import time

    from ray import serve

    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    # two adapters on one base: the folder under two names (NAME=REF)
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", f"folder-toy={adapters['cls'][1]}",
           f"twin={adapters['cls'][1]}", "--base", adapters["cls"][0].model.name]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{server}/healthz?replicas=true", timeout=5)
                if r.status_code == 200 and r.json().get("adapters") == ["folder-toy", "twin"]:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("adapterflow serve did not come up in 120 s")
        r = httpx.post(f"{server}/v1/classify", json={"adapter": "folder-toy", "inputs": ["good great"]}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["label"] in ("negative", "positive")
        twin = httpx.post(f"{server}/v1/classify", json={"adapter": "twin", "inputs": ["good great"]}, timeout=60)
        assert twin.json()["results"] == r.json()["results"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        serve.delete("adapterflow")


def test_pvera_monte_carlo_over_http(server):
    """A served PVeRA adapter: `samples` returns the Monte-Carlo mean and 95 % interval per label,
    seeded; the same request for a LoRA classifier or a LoRA completion is a 400."""
    body = {"adapter": "unc", "inputs": ["good great lovely movie", "bad awful dull plot"], "samples": 16, "seed": 3}
    r = httpx.post(f"{server}/unc/v1/classify", json=body, timeout=120)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for item in results:
        mc = item["monte_carlo"]
        assert mc["samples"] == 16 and set(mc["mean"]) == {"negative", "positive"}
        assert sum(mc["mean"].values()) == pytest.approx(1.0, abs=1e-5)
        assert all(mc["low"][k] <= mc["mean"][k] <= mc["high"][k] for k in mc["mean"])
        assert all(abs(mc["mean"][k] - item["probabilities"][k]) < 0.2 for k in mc["mean"])
    assert httpx.post(f"{server}/unc/v1/classify", json=body, timeout=120).json()["results"] == results
    plain = httpx.post(f"{server}/unc/v1/classify", json={**body, "samples": None}, timeout=120).json()
    assert "monte_carlo" not in plain["results"][0]
    lora = httpx.post(f"{server}/cls/v1/classify", json={**body, "adapter": "toy"}, timeout=120)
    assert lora.status_code == 400 and "Monte-Carlo" in lora.json()["error"]["message"]
    headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"}
    lm = httpx.post(f"{server}/lm/v1/completions", json={"model": "story", "prompt": "hi", "samples": 4},
                    headers=headers, timeout=120)
    assert lm.status_code == 400 and lm.json()["error"]["type"] == "wrong_task"


def test_chat_completions_with_the_openai_client(server):
    """The official client's chat call: the messages rendered by the operator's chat template, then
    answered exactly as /v1/completions answers the rendered prompt."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/lm/v1", api_key=os.environ[API_KEY_ENV])
    chat = client.chat.completions.create(model="story", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "Once upon"},
                                                    {"role": "user", "content": "a time"}])
    plain = client.completions.create(model="story", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text and plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
    assert chat.choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_without_a_template_is_a_clear_400(trained_adapters):
    from workers.artifact import verify
    from workers.errors import WrongTaskError
    from workers.inference import Engine

    trained = trained_adapters("alora")  # the tiny Llama's tokenizer has no chat template
    engine = Engine(trained["spec"].model)
    engine.add_adapter("a", trained["folder"], verify(trained["folder"]))
    with pytest.raises(WrongTaskError, match="no chat template.*set model.chat_template"):
        engine.chat_prompt("a", [{"role": "user", "content": "hi"}])


def test_streaming_with_the_openai_client_equals_the_whole_answer(server):
    """`stream: true` on completions and chat: server-sent chunks through the official client whose
    text joins to the non-streamed answer, one finish reason at the end, usage when asked."""
    client = openai.OpenAI(base_url=f"{server}/lm/v1", api_key=os.environ[API_KEY_ENV], max_retries=0)
    args = {"model": "story", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.8, "seed": 11}
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].text and sum(1 for p in pieces if p) > 2, pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices

    messages = [{"role": "user", "content": "Once upon"}, {"role": "user", "content": "a time"}]
    chat = client.chat.completions.create(model="story", messages=messages, max_tokens=16, temperature=0)
    stream = list(client.chat.completions.create(model="story", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stop_strings_cut_the_text_streamed_or_not(server):
    headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"}
    body = {"model": "story", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    full = httpx.post(f"{server}/lm/v1/completions", json=body, headers=headers, timeout=60).json()["choices"][0]
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a string from the middle of the answer
    assert len(stop) == 3 and stop.strip()
    cut = httpx.post(f"{server}/lm/v1/completions", json={**body, "stop": [stop]}, headers=headers,
                     timeout=60).json()["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    with httpx.stream("POST", f"{server}/lm/v1/completions", json={**body, "stop": stop, "stream": True},
                      headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_streamed_request_with_an_error_answers_json_before_any_chunk(server):
    headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"}
    r = httpx.post(f"{server}/lm/v1/completions", json={"model": "nope", "prompt": "hi", "stream": True},
                   headers=headers, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == "adapter_not_found"


def test_concurrent_completions_over_http_equal_each_alone(server):
    """16 concurrent requests (greedy and seeded sampling, different lengths) share decode forwards
    and each answer equals the same request sent alone."""
    import asyncio

    headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"}
    url = f"{server}/lm/v1/completions"
    prompts = ["Once upon a time", "The little dog", "She saw a big", "Tom and Lily"]
    bodies = [{"model": "story", "prompt": prompts[i % 4], "max_tokens": 4 + (i * 7) % 20, "ignore_eos": True,
               **({"temperature": 0.9, "seed": i} if i % 2 else {"temperature": 0})} for i in range(16)]
    alone = [httpx.post(url, json=b, headers=headers, timeout=60).json()["choices"][0]["text"] for b in bodies]
    before = httpx.get(f"{server}/lm/v1/stats", headers=headers, timeout=30).json()

    async def together():
        async with httpx.AsyncClient(timeout=120, headers=headers) as client:
            return await asyncio.gather(*(client.post(url, json=b) for b in bodies))

    got = asyncio.run(together())
    after = httpx.get(f"{server}/lm/v1/stats", headers=headers, timeout=30).json()
    assert [r.json()["choices"][0]["text"] for r in got] == alone
    rows = after["decode_rows"] - before["decode_rows"]
    forwards = after["decode_forwards"] - before["decode_forwards"]
    assert rows > 3 * forwards, (rows, forwards)  # rows shared forwards


def test_a_prompt_past_the_models_positions_answers_413(server):
    """stories260K has 512 positions: a prompt plus max_tokens beyond them is refused before decoding."""
    headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"}
    r = httpx.post(f"{server}/lm/v1/completions", json={"model": "story", "prompt": "Once upon a time",
                                                         "max_tokens": 510}, headers=headers, timeout=60)
    assert r.status_code == 413 and "model's 512 positions" in r.json()["error"]["message"], r.text
    ok = httpx.post(f"{server}/lm/v1/completions", json={"model": "story", "prompt": "Once upon a time",
                                                          "max_tokens": 2}, headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text


def _drawing_copy(folder, dst):
    """The PVeRA adapter set to draw at inference (PEFT's sample_at_inference only changes inference),
    with its own manifest."""
    import json
    import shutil

    from workers.artifact import MANIFEST, write_manifest

    shutil.copytree(folder, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "sample_at_inference": True}))
    manifest = json.loads((dst / MANIFEST).read_text())
    (dst / MANIFEST).unlink()
    keep = {k: manifest[k] for k in ("adapter", "input_template", "max_length")}
    keep["adapter"] = {**keep["adapter"], "sample_at_inference": True}
    write_manifest(dst, method=manifest["method"], model=manifest["model"], base_sha256=manifest["base_model"]["sha256"],
                   extra=keep)
    return dst


def test_pvera_draws_are_seeded_per_request_under_concurrency(adapters, server, serve_port, tmp_path):
    """Concurrent PVeRA requests, Monte-Carlo ones and plain ones of an adapter that draws at inference:
    each answer equals the same request sent alone (its own seed), and different seeds differ."""
    import asyncio

    from serve.deploy import deploy, shutdown

    spec, folder = adapters["unc"]
    url = deploy({"draw": str(_drawing_copy(folder, tmp_path / "draw"))}, port=serve_port, name="draw",
                 route_prefix="/draw", num_cpus=0.25, base=spec.model.model_dump(mode="json"))
    texts = ["good great lovely movie", "bad awful dull plot"]
    bodies = [("unc", {"adapter": "unc", "inputs": texts, "samples": 8, "seed": s}) for s in range(6)]
    bodies += [("draw", {"adapter": "draw", "inputs": texts, "seed": s}) for s in range(6)]
    targets = {"unc": f"{server}/unc/v1/classify", "draw": f"{url}/v1/classify"}
    try:
        alone = [httpx.post(targets[app], json=b, timeout=120).json()["results"] for app, b in bodies]

        async def together():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(targets[app], json=b) for app, b in bodies * 2))

        responses = asyncio.run(together())
    finally:
        shutdown("draw")
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for r, want in zip(responses, alone * 2):
        for got, ref in zip(r.json()["results"], want):
            assert got["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-6)
            if "monte_carlo" in ref:
                assert got["monte_carlo"]["mean"] == pytest.approx(ref["monte_carlo"]["mean"], abs=1e-6)
    draws = [a[0]["probabilities"]["positive"] for a in alone[6:]]
    assert max(draws) - min(draws) > 1e-4, draws  # the plain forwards really draw
    mc = [a[0]["monte_carlo"]["mean"]["positive"] for a in alone[:6]]
    assert max(mc) - min(mc) > 1e-5, mc
