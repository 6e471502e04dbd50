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
SCALE = 8.0  # the second adapter: the trained one with its weights scaled (a clearly different adapter)
PROMPTS = ["good great lovely", "bad awful dull", "say the word warm", "a cold grim story", "fun fun", "plot"]


def requests_for(names):
    """16 requests in pairs: the same request to each adapter in turn; greedy and seeded sampling,
    lengths 3..10, most decoding past end tokens."""
    out = []
    for i in range(16):
        k = i // 2
        sampled = k % 3 != 0
        out.append({"name": names[i % len(names)], "prompt": PROMPTS[k % len(PROMPTS)],
                    "max_tokens": 3 + (k * 5) % 8, "temperature": 1.2 if sampled else 0.0,
                    "top_p": 0.9 if k % 2 else 1.0, "seed": 100 + k if sampled else None,
                    "ignore_eos": k % 4 != 3})
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
                results[i] = ("".join(pieces), event["finish_reason"], event["completion_tokens"], list(rows[i].out))
                done.release()

        r = reqs[i]
        rows[i] = engine.start_completion(r["name"], r["prompt"], emit=emit, max_tokens=r["max_tokens"],
                                          temperature=r["temperature"], top_p=r["top_p"], seed=r["seed"],
                                          ignore_eos=r["ignore_eos"])

    rows = [None] * len(reqs)
    half = max(1, len(reqs) // 2)
    for i in range(half):
        submit(i)
    assert first.wait(60) or len(reqs) == 1
    for i in range(half, len(reqs)):
        submit(i)
    for _ in reqs:
        assert done.acquire(timeout=120)
    return results


@pytest.fixture(scope="module")
def engines(trained_causal, tmp_path_factory):
    from serve.deploy import build_engine

    made = {}

    def get(method):
        if method not in made:
            trained = trained_causal(method)
            adapters = {"x1": str(trained["folder"])}
            if FAMILIES[method]:
                tmp = tmp_path_factory.mktemp(f"gen-{method}")
                adapters["x2"] = str(perturbed_copy(trained["folder"], tmp / "x2", FAMILIES[method], scale=SCALE))
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
    alone = [run_batched(engine, [r])[0] for r in reqs]  # (text, finish, tokens, token ids)
    stats0 = dict(engine.decoder.stats)
    batched = run_batched(engine, reqs)
    for r, a, b in zip(reqs, alone, batched):
        assert not isinstance(b, Exception), b
        assert b == a, (r, a, b)
    stats = engine.decoder.stats
    assert stats["joined_mid_decode"] > stats0["joined_mid_decode"], stats
    assert stats["decode_rows"] - stats0["decode_rows"] > 2 * (stats["decode_forwards"] - stats0["decode_forwards"])
    if len(names) > 1:  # the two adapters answer the same request differently, so a mix-up would show
        differ = sum(a != b for a, b in zip(alone[0::2], alone[1::2]))
        assert differ >= 2, alone
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


def token_ids(engine, name, prompt, n=40):
    """The token ids a seeded sampled request decodes (end tokens included: `ignore_eos`)."""
    done: queue.Queue = queue.Queue()
    row = engine.start_completion(name, prompt, emit=lambda e: "finish_reason" in e and done.put(e), max_tokens=n,
                                  ignore_eos=True, temperature=1.0, seed=3)
    done.get(timeout=60)
    return list(row.out)


def test_replacing_an_adapter_mid_decode_keeps_running_rows_on_the_old_version(trained_causal, tmp_path):
    """A new version under the same name (a registry alias moved): the row already decoding finishes
    on the version it started with, a new request gets the new one, and the old weights are unloaded
    once no row holds them; an unloaded name is then unknown."""
    from serve.deploy import build_engine
    from workers.artifact import verify
    from workers.errors import UnknownAdapterError

    trained = trained_causal("ia3")  # its scaled copy answers clearly differently
    v2 = perturbed_copy(trained["folder"], tmp_path / "v2", "adapter_model.safetensors", scale=SCALE)
    base = trained["spec"].model.model_dump(mode="json")
    ref = build_engine({"v1": str(trained["folder"]), "v2": str(v2)}, base)
    want_old, want_new = token_ids(ref, "v1", "good great lovely"), token_ids(ref, "v2", "good great lovely")
    assert want_old != want_new

    engine = build_engine({"x": str(trained["folder"])}, base)
    started = threading.Event()
    done: queue.Queue = queue.Queue()
    long = engine.start_completion("x", "good great lovely", max_tokens=40, ignore_eos=True, temperature=1.0, seed=3,
                                   emit=lambda e: started.set() or ("finish_reason" in e and done.put(e)))
    while not long.out:  # decoding on v1
        started.wait(0.001)
    engine.add_adapter("x", v2, verify(v2), replace=True)
    assert token_ids(engine, "x", "good great lovely") == want_new
    done.get(timeout=60)
    assert long.out == want_old
    token_ids(engine, "x", "good", 2)  # the loop reaps at its next step
    assert sorted(engine._methods) == [engine.peft("x")] and engine.peft("x") != "x"
    engine.remove_adapter("x")
    with pytest.raises(UnknownAdapterError):
        engine.complete("x", "good", max_tokens=2)


def test_a_conversation_reuses_the_base_prefix_and_answers_as_a_full_recompute(trained_adapters):
    """aLoRA: turn 2 of a conversation starts with turn 1's tokens; it prefills only what is new before
    the invocation (base) and the invocation on (adapter). Greedy and sampled ids equal the same
    requests without a conversation (a full prefill); the base model's own requests reuse too."""
    from serve.deploy import build_engine

    trained = trained_adapters("alora")
    engine = build_engine({"al": str(trained["folder"])}, trained["spec"].model.model_dump(mode="json"))
    turns = ["say the word good great", "say the word good great lovely movie fun",
             "say the word good great lovely movie fun the cast was warm"]

    def ids(name, prompt, **kw):
        done: queue.Queue = queue.Queue()
        row = engine.start_completion(name, prompt, max_tokens=8, ignore_eos=True,
                                      emit=lambda e: "finish_reason" in e and done.put(e), **kw)
        done.get(timeout=60)
        lengths.append(len(row.ids))
        return list(row.out)

    lengths: list[int] = []
    for name in ("al", engine.base_id):
        for sampling in ({}, {"temperature": 1.0, "seed": 5}):
            want = [ids(name, t, **sampling) for t in turns]
            before = dict(engine.decoder.stats), dict(engine.prefixes.stats)
            lengths.clear()
            got = [ids(name, t, conversation=f"c-{name}-{len(sampling)}", **sampling) for t in turns]
            assert got == want, name
            computed = engine.decoder.stats["prefix_tokens_computed"] - before[0]["prefix_tokens_computed"]
            reused = engine.prefixes.stats["prefix_tokens_reused"] - before[1]["prefix_tokens_reused"]
            assert computed + reused == sum(lengths) and reused >= len(lengths) - 1, (computed, reused, lengths)
            assert reused > sum(lengths) / 3, (computed, reused, lengths)  # most of turns 2 and 3 came cached
