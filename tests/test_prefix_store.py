"""The conversation prefix caches of an engine (workers/prefixes.py), bounded by conversations and by
tokens: past either bound the least recently used conversation goes, a conversation that sends a turn
becomes the most recent, and a turn of an evicted conversation still answers as a full recompute
(greedy token ids), through the engine's completion API with the trained aLoRA adapter."""

import queue

import pytest

TURNS = {"c1": ["say the word good great", "say the word good great lovely movie fun"],
         "c2": ["say the word bad awful", "say the word bad awful dull plot"],
         "c3": ["say the word warm cold", "say the word warm cold grim story"]}  # c3's turns as long as c2's


@pytest.fixture(scope="module")
def engine(trained_adapters):
    from serve.deploy import build_engine

    trained = trained_adapters("alora")
    return build_engine({"al": str(trained["folder"])}, trained["spec"].model.model_dump(mode="json"))


@pytest.fixture(scope="module")
def recomputed(engine):
    """Each turn's greedy ids without a conversation (a full prefill)."""
    return {(c, i): ids(engine, t) for c, turns in TURNS.items() for i, t in enumerate(turns)}


def ids(engine, prompt, conversation=None):
    done: queue.Queue = queue.Queue()
    row = engine.start_completion("al", prompt, max_tokens=6, ignore_eos=True, conversation=conversation,
                                  emit=lambda e: ("finish_reason" in e or "error" in e) and done.put(e))
    assert "error" not in done.get(timeout=60)
    return list(row.out)


class Turns:
    """Sends conversation turns to a fresh store of `engine`; checks each answer and the bounds."""

    def __init__(self, engine, recomputed, **bounds):
        from workers.prefixes import PrefixStore

        self.engine, self.recomputed = engine, recomputed
        self.store = engine.prefixes = PrefixStore(**bounds)

    def send(self, conversation, turn):
        reused = self.store.stats["prefix_tokens_reused"]
        got = ids(self.engine, TURNS[conversation][turn], conversation)
        assert got == self.recomputed[(conversation, turn)], (conversation, turn)
        assert len(self.store.entries) <= self.store.max_conversations
        assert self.tokens() <= self.store.max_tokens
        return self.store.stats["prefix_tokens_reused"] - reused

    def held(self):
        """The conversations held, least recently used first."""
        return [key[1] for key in self.store.entries]

    def tokens(self, conversation=None):
        return sum(len(held) for key, (held, _) in self.store.entries.items() if conversation in (None, key[1]))


def test_past_max_conversations_the_least_recently_used_goes(engine, recomputed):
    t = Turns(engine, recomputed, max_conversations=2)
    assert t.send("c1", 0) == 0 and t.send("c2", 0) == 0
    assert t.held() == ["c1", "c2"]
    assert t.send("c1", 1) > 0  # c1's turn 2 reuses turn 1 and makes c1 the most recent
    assert t.held() == ["c2", "c1"]
    assert t.send("c3", 0) == 0  # a third: c2, the least recently used, goes (not c1, the oldest)
    assert t.held() == ["c1", "c3"] and t.store.stats["prefix_evictions"] == 1
    assert t.send("c2", 1) == 0  # nothing left to reuse: computed in full, the same answer
    assert t.held() == ["c3", "c2"] and t.store.stats["prefix_evictions"] == 2
    assert t.send("c3", 1) > 0  # the survivors still reuse


def test_past_max_tokens_the_least_recently_used_goes(engine, recomputed):
    t = Turns(engine, recomputed, max_tokens=10**6)
    t.send("c1", 0)
    t.send("c2", 0)
    c1, c2 = t.tokens("c1"), t.tokens("c2")
    assert c1 > 0 and c2 > 0
    t.store.max_tokens = c1 + c2  # both fit, no third
    assert t.send("c1", 0) == c1  # the same turn again: all of it reused, c1 the most recent
    assert t.held() == ["c2", "c1"] and t.tokens() == c1 + c2
    t.send("c3", 0)  # as long as c2's: c2 goes and the rest fits
    assert t.tokens("c3") == c2
    assert t.held() == ["c1", "c3"] and t.store.stats["prefix_evictions"] == 1
    assert t.send("c2", 1) == 0  # evicted: computed in full, the same answer ...
    assert t.held() == ["c2"] and t.store.stats["prefix_evictions"] == 3  # ... and longer: it alone fits
    assert t.send("c1", 1) == 0 and t.held() == ["c1"]
