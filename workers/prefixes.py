"""Conversation prefix caches: per conversation id, the base model's KV cache of the tokens a
conversation has sent so far, bounded (conversations and tokens) and evicted LRU.

An activated LoRA (aLoRA) changes nothing before its invocation, so the keys and values of
everything before it are the base model's own: a later turn of the same conversation that starts
with the same tokens prefills only what follows them, and then only the invocation onward with the
adapter. The base model's own requests reuse the same way."""

from __future__ import annotations

from collections import OrderedDict


class PrefixStore:
    def __init__(self, max_conversations: int = 64, max_tokens: int = 65_536):
        self.max_conversations, self.max_tokens = max_conversations, max_tokens
        self.entries: OrderedDict[tuple, tuple[list[int], list]] = OrderedDict()
        self.stats = {"prefix_hits": 0, "prefix_tokens_reused": 0, "prefix_evictions": 0}

    def longest(self, key: tuple, ids: list[int]) -> tuple[int, list]:
        """How many leading tokens of `ids` the cache of conversation `key` holds, and its layers'
        (keys, values) cut to that length."""
        entry = self.entries.get(key)
        if entry is None:
            return 0, []
        held, layers = entry
        n = 0
        for a, b in zip(held, ids):
            if a != b:
                break
            n += 1
        self.entries.move_to_end(key)
        if n:
            self.stats["prefix_hits"] += 1
            self.stats["prefix_tokens_reused"] += n
        return n, [(k[..., :n, :], v[..., :n, :]) for k, v in layers]

    def put(self, key: tuple, ids: list[int], cache, length: int) -> None:
        """Keep the first `length` positions of the conversation's cache (views, not copies: a cache
        only ever grows by making new tensors)."""
        self.entries[key] = (list(ids[:length]), [(layer.keys[..., :length, :], layer.values[..., :length, :])
                                                  for layer in cache.layers])
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_conversations or (
                sum(len(ids) for ids, _ in self.entries.values()) > self.max_tokens and len(self.entries) > 1):
            self.entries.popitem(last=False)
            self.stats["prefix_evictions"] += 1
