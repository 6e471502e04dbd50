"""Continuous batching of completions, in one engine (no HTTP): for every family with a trained
causal-LM adapter, concurrent requests over two adapters, greedy and seeded sampling, different
lengths, half of them joining while the others decode, each equal to the same request alone; and
the alone answers equal PEFT's own `generate` with that adapter (greedy)."""

import queue
import threading

import pytest
import torch
from test_serve_batching import perturbed_copy

pytestmark = pytest.mark.slow

# the weights file a second adapter is derived from (None: one adapter per replica)
FAMILIES = {"lora": "adapter_model.safetensors", "ia3": "adapter_model.safetensors",
            "pvera": "adapter_model.safetensors", "sparta": "sparse_deltas.safetensors",
            "nls": "adapter_model.safetensors", "sparsepeft": "adapter_model.safetensors",
            "alora": "adapter_model.safetensors", "qa-sparsepeft": None}
PROMPTS = ["good great lovely", "bad awful dull", "say the word warm", "a cold grim story", "fun fun", "plot"]


def requests_for(names):
    """16 requests: adapters alternating, greedy and seeded sampling, lengths 3..10."""
    out = []
    for i in range(16):
        sampled = i % 3 == 2
        out.append({"name": names[i % len(names)], "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": 3 + (i * 5) % 8, "temperature": 0.9 if sampled else 0.0,
                    "top_p": 0.9 if i % 2 else 1.0, "seed": 100 + i if sampled else None,
                    "ignore_eos": i % 4 != 3})
    return out


def run_batched(engine, reqs):
    """Half submitted at once; the rest once the first tokens are out (they join mid-decode)."""
    results, done = [None] * len(reqs), threading.Semaphore(0)
    first = threading.Event()

    def submit(i):
        pieces = []

        def emit(event, i=i, pieces=pieces):
            if "error" in event:
                results[i] = event["error"]
                done.release()
                return
            pieces.append(event["text"])
            first.set()
            if "finish_reason" in event:
                results[i] = ("".join(pieces), event["finish_reason"], event["completion_tokens"], rows[i].out)
                done.release()

        r = reqs[i]
        rows[i] = engine.start_completion(r["name"], r["prompt"], emit=emit, max_tokens=r["max_tokens"],
                                          temperature=r["temperature"], top_p=r["top_p"], seed=r["seed"],
                                          ignore_eos=r["ignore_eos"])

    rows = [None] * len(reqs)
    half = len(reqs) // 2
    for i in range(half):
        submit(i)
    assert first.wait(60)
    for i in range(half, len(reqs)):
        submit(i)
    for _ in reqs:
        assert done.acquire(timeout=120)
    return results


@pytest.fixture(scope="module")
def engines(trained_causal, tmp_path_factory):
    from serve.app import build_engine

    made = {}

    def get(method):
        if method not in made:
            trained = trained_causal(method)
            adapters = {"x1": str(trained["folder"])}
            if FAMILIES[method]:
                tmp = tmp_path_factory.mktemp(f"gen-{method}")
                adapters["x2"] = str(perturbed_copy(trained["folder"], tmp / "x2", FAMILIES[method], scale=-1.5))
            engine = build_engine(adapters, trained["spec"].model.model_dump(mode="json"))
            engine.max_decode_rows = 12  # fewer than the requests: some wait for room
            made[method] = (engine, trained)
        return made[method]

    return get


@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_batched_completions_equal_each_request_alone(engines, method):
    engine, _ = engines(method)
    names = sorted(engine.adapters)
    reqs = requests_for(names)
    alone = []
    for r in reqs:
        out = engine.complete(r["name"], r["prompt"], max_tokens=r["max_tokens"], temperature=r["temperature"],
                              top_p=r["top_p"], seed=r["seed"], ignore_eos=r["ignore_eos"])
        alone.append((out["text"], out["finish_reason"], out["completion_tokens"]))
    stats0 = dict(engine.decoder.stats)
    batched = run_batched(engine, reqs)
    for r, a, b in zip(reqs, alone, batched):
        assert not isinstance(b, Exception), b
        assert b[:3] == a, (r, a, b)
    stats = engine.decoder.stats
    assert stats["joined_mid_decode"] > stats0["joined_mid_decode"], stats
    assert stats["decode_rows"] - stats0["decode_rows"] > 2 * (stats["decode_forwards"] - stats0["decode_forwards"])
    if len(names) > 1:  # the two adapters answer differently, so a mix-up would show
        greedy = [(r["prompt"], r["max_tokens"], a) for r, a in zip(reqs, alone) if not r["temperature"]]
        by_name = {n: [a for r, a in zip(reqs, alone) if r["name"] == n and not r["temperature"]] for n in names}
        assert by_name[names[0]] != by_name[names[1]], greedy
        mixed = stats["mixed_decode_forwards"] > stats0["mixed_decode_forwards"]
        from workers.methods import get_method

        assert mixed == get_method(method).shares_forward, stats


@pytest.mark.parametrize("method", ["lora", "ia3", "alora", "nls"])
def test_greedy_answers_equal_peft_generate(engines, method):
    """The reference is PEFT's own `generate` with the adapter loaded the plain way."""
    from peft import PeftModel

    from workers.models import load_model, load_tokenizer

    engine, trained = engines(method)
    spec = trained["spec"]
    tok = load_tokenizer(spec.model)
    ref = PeftModel.from_pretrained(load_model(spec.model, tok), str(trained["folder"])).eval()
    fmt = spec.model.prompt_format
    for prompt in PROMPTS[:4]:
        enc = tok(fmt.format(prompt=prompt), return_tensors="pt")
        with torch.no_grad():
            ids = ref.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        ids = ids[0, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id)]
        got = engine.complete("x1", prompt, max_tokens=8)
        assert got["text"] == tok.decode(ids, skip_special_tokens=True), prompt
        assert got["completion_tokens"] == len(ids)


def test_a_seed_gives_the_same_tokens_and_no_seed_varies(engines):
    engine, _ = engines("lora")
    a = [engine.complete("x1", "good", max_tokens=10, temperature=1.5, seed=7)["text"] for _ in range(2)]
    assert a[0] == a[1]
    free = {engine.complete("x1", "good", max_tokens=10, temperature=1.5)["text"] for _ in range(6)}
    assert len(free) > 1, free


def test_a_cancelled_row_leaves_and_the_others_finish(engines):
    engine, _ = engines("lora")
    long_events: queue.Queue = queue.Queue()
    events: queue.Queue = queue.Queue()
    long = engine.start_completion("x1", "good", emit=long_events.put, max_tokens=120, ignore_eos=True,
                                   temperature=1.5, seed=1)  # sampled: visible words, not end tokens
    long_events.get(timeout=60)  # it is decoding
    long.cancel()
    engine.start_completion("x2", "bad", emit=events.put, max_tokens=5, ignore_eos=True)
    while "finish_reason" not in (e := events.get(timeout=60)):
        pass
    assert e["completion_tokens"] == 5
    assert len(long.out) < 120 and not any(lane.rows for lane in engine.decoder.lanes.values())


@pytest.mark.parametrize("method", ["lora", "ia3", "sparta"])
def test_the_base_model_is_served_by_its_name(engines, method):
    """`model` = the base's name: the base alone (the reference: the plain model re-run on the whole
    sequence each token, no cache, argmax), also inside a batch of adapter rows (a shared lane for
    LoRA, a lane of its own otherwise)."""
    from workers.models import load_model, load_tokenizer

    engine, trained = engines(method)
    spec = trained["spec"]
    assert engine.base_id == spec.model.name.rstrip("/").rsplit("/", 1)[-1] and engine.serves_base(engine.base_id)
    tok = load_tokenizer(spec.model)
    plain = load_model(spec.model, tok).eval()
    want = []
    for prompt in PROMPTS[:3]:
        ids = tok(spec.model.prompt_format.format(prompt=prompt))["input_ids"]
        n = len(ids)
        with torch.no_grad():
            for _ in range(6):
                ids = ids + [int(plain(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
        want.append(tok.decode(ids[n:], skip_special_tokens=True))
    reqs = [{"name": engine.base_id if i % 2 == 0 else "x1", "prompt": PROMPTS[(i // 2) % 3], "max_tokens": 6,
             "temperature": 0.0, "top_p": 1.0, "seed": None, "ignore_eos": True} for i in range(6)]
    batched = run_batched(engine, reqs)
    assert [b[0] for b in batched[0::2]] == want
    adapter = engine.complete("x1", PROMPTS[0], max_tokens=6, ignore_eos=True)["text"]
    assert batched[1][0] == adapter
