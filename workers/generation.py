"""Continuous batching for text generation: one decode loop over the model's KV cache, each row with
its own adapter and its own sampling state.

Rows live in *lanes*: adapters whose method declares `shares_forward` (and the rows of one tokenizer)
share a lane and one forward per step (PEFT `adapter_names`); any other adapter has a lane of its own,
and an adapter that draws at inference (`draws_at_inference`) a lane per request. Each step, every
running row gets one token: the rows already decoding advance by one forward per lane over the lane's
left-padded cache, then the requests that arrived since join (their prompts prefilled together, their
caches left-padded into the lane's). A finished row leaves its lane at once. A request's sampling uses
its own `torch.Generator`, so a `seed` gives the same tokens alone or batched.

Joining mid-decode needs a cache whose layers are plain per-token key/value tensors (`DynamicLayer`);
a model whose cache is anything else (sliding windows, linear attention) gets windowed batches: new
requests join a lane only when it is empty.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Row:
    """One generation request: its prompt ids and everything its decoding needs."""

    adapter: str
    lane: tuple
    ids: list[int]
    tokenizer: object
    max_tokens: int
    emit: Callable[[dict], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos: int | None = None  # None: decode to max_tokens (`ignore_eos`)
    alora: bool = False  # the adapter is an activated LoRA (offsets from its invocation)
    draws: bool = False  # the adapter samples at inference: seed its draws per step
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already emitted
    offset: int | None = None  # aLoRA: tokens from the invocation on, at prefill
    generator: object = None
    cancelled: bool = False
    conversation: tuple | None = None  # (tokenizer, conversation id): reuse the base's cache of its prefix

    def cancel(self) -> None:
        """The client went away: the row leaves at the next step boundary."""
        self.cancelled = True


class Lane:
    def __init__(self, key: tuple):
        self.key = key
        self.rows: list[Row] = []
        self.cache = None  # DynamicCache over the rows, left-padded to one length
        self.mask = None  # [rows, length] 1 where a real token is cached


class Decoder:
    """The decode loop of one engine (a thread of its own, started on the first request)."""

    def __init__(self, engine, max_rows: int = 32):
        self.engine = engine
        self.max_rows = max_rows
        self.pending: queue.Queue[Row] = queue.Queue()
        self.lanes: dict[tuple, Lane] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._ids = itertools.count()
        self.stats = {"decode_steps": 0, "decode_forwards": 0, "decode_rows": 0, "prefill_forwards": 0,
                      "joined_mid_decode": 0, "mixed_decode_forwards": 0, "prefix_tokens_computed": 0}
        self.joinable = True  # decided on the first cache the model makes

    def new_id(self) -> int:
        return next(self._ids)

    def submit(self, row: Row) -> Row:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="adapterflow-decode", daemon=True)
                    self._thread.start()
        self.pending.put(row)
        return row

    @property
    def running(self) -> int:
        return sum(len(lane.rows) for lane in self.lanes.values())

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        waiting: list[Row] = []
        while True:
            if not self.running and not waiting:
                waiting.append(self.pending.get())
            while True:
                try:
                    waiting.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            try:
                waiting = self._step(waiting)
            except Exception as exc:  # a fault fails the rows it touched, never the loop
                log.exception("decode step failed")
                held = {id(r): r for r in [r for lane in self.lanes.values() for r in lane.rows] + waiting}
                for row in held.values():
                    self._leave(row)
                    row.emit({"error": exc})
                self.lanes.clear()
                waiting = []

    def _step(self, waiting: list[Row]) -> list[Row]:
        import torch

        with self.engine._lock, torch.no_grad():
            for lane in list(self.lanes.values()):
                self._drop_cancelled(lane)
                if lane.rows:
                    self._decode(lane)
            room = self.max_rows - self.running
            joiners: dict[tuple, list[Row]] = {}
            keep: list[Row] = []
            for row in waiting:
                if row.cancelled:
                    self._leave(row)
                    continue
                lane = self.lanes.get(row.lane)
                busy = lane is not None and lane.rows and not self.joinable
                if room > 0 and not busy:
                    joiners.setdefault(row.lane, []).append(row)
                    room -= 1
                else:
                    keep.append(row)
            for key, rows in joiners.items():
                reusing = [r for r in rows if r.conversation is not None and self.joinable]
                for row in reusing:
                    self._prefill_reusing(key, row)
                rows = [r for r in rows if r not in reusing]
                if rows:
                    self._prefill(key, rows)
            self.stats["decode_steps"] += 1
            self.engine.reap()  # adapters unloaded or replaced while rows held them go now
        return keep

    # ---------------------------------------------------------------- forwards
    def _forward(self, rows: list[Row], prefill: bool, **inputs):
        """One forward of `rows` with their adapters (one lane: they share it or are one adapter)."""
        import contextlib

        import torch

        model = self.engine.model
        names = [r.adapter for r in rows]
        kwargs = {}
        context = contextlib.nullcontext()
        if len(set(names)) > 1:
            kwargs["adapter_names"] = names
        elif names[0] == BASE:
            context = model.disable_adapter()
        else:
            model.set_adapter(names[0])
        if any(r.alora for r in rows):
            # from the invocation on at prefill; then each new token is past it
            kwargs["alora_offsets"] = [r.offset if prefill or r.offset is None else 1 for r in rows]
        if rows[0].draws:  # a lane of one request: its draws follow its seed and the step
            torch.manual_seed(((rows[0].seed or 0) * 1_000_003 + len(rows[0].out)) % (2**63))
        device = self.engine.device  # ids, masks and positions are built on the CPU
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with context:
            out = model(**inputs, **kwargs, use_cache=True)
        if "adapter_names" in kwargs:
            self.stats["mixed_decode_forwards"] += 1
        if self.engine.on_forward is not None:
            self.engine.on_forward(len(rows), "adapter_names" in kwargs)
        return out

    def _prefill(self, key: tuple, rows: list[Row]) -> None:
        import torch

        length = max(len(r.ids) for r in rows)
        pad = rows[0].tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r.ids):] = torch.tensor(r.ids)
            mask[i, length - len(r.ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        if any(r.alora for r in rows):
            from peft.tuners.lora.variants import calculate_alora_offsets

            model = self.engine.model
            offsets = calculate_alora_offsets(model.peft_config, model.active_adapter, ids,
                                              adapter_names=[r.adapter for r in rows])
            for r, o in zip(rows, offsets):
                r.offset = o if r.alora else None
        out = self._forward(rows, True, input_ids=ids, attention_mask=mask, position_ids=positions)
        self._join(key, rows, out, mask)

    def _prefill_reusing(self, key: tuple, row: Row) -> None:
        """Prefill one request of a conversation from the conversation's cached base prefix: only the
        tokens after the longest prefix it shares are computed; the keys and values before the
        adapter's invocation (all but the last token for the base model) are kept for the next turn."""
        import torch
        from transformers import DynamicCache

        model = self.engine.model
        ids = row.ids
        if row.alora:
            from peft.tuners.lora.variants import calculate_alora_offsets

            row.offset = calculate_alora_offsets(model.peft_config, row.adapter, torch.tensor([ids]),
                                                 adapter_names=[row.adapter])[0]
        base_len = len(ids) - (row.offset or 0) if row.offset else len(ids)
        base_len = min(base_len, len(ids) - 1)  # at least one token to prefill with the adapter
        store = self.engine.prefixes
        reused, layers = store.longest(row.conversation, ids[:base_len])
        cache = DynamicCache(ddp_cache_data=layers) if reused else DynamicCache()
        # one forward of everything new: before the invocation the adapter is inactive (aLoRA), so
        # those keys and values are the base's own and are kept for the next turn
        new = ids[reused:]
        if row.offset is not None:
            row.offset = len(ids) - base_len  # the invocation on
        mask = torch.ones((1, len(ids)), dtype=torch.long)
        out = self._forward([row], True, input_ids=torch.tensor([new]), attention_mask=mask,
                            position_ids=torch.arange(reused, len(ids)).unsqueeze(0),
                            past_key_values=cache)
        self.stats["prefix_tokens_computed"] += len(new)
        if base_len:
            store.put(row.conversation, ids[:base_len], out.past_key_values, length=base_len)
        self._join(key, [row], out, mask)

    def _join(self, key: tuple, rows: list[Row], out, mask) -> None:
        """Rows just prefilled take their place in their lane (which may be decoding)."""
        lane = self.lanes.get(key) or Lane(key)
        self.stats["prefill_forwards"] += 1
        cache = out.past_key_values
        if lane.cache is None:
            self.joinable = self.joinable and _plain(cache)
            lane.cache, lane.mask, lane.rows = cache, mask, list(rows)
        else:
            self.stats["joined_mid_decode"] += len(rows)
            _merge(lane, cache, mask)
            lane.rows.extend(rows)
        self.lanes[key] = lane
        self._advance(lane, rows, out.logits[:, -1, :], first=len(lane.rows) - len(rows))

    def _decode(self, lane: Lane) -> None:
        import torch

        last = torch.tensor([[r.out[-1]] for r in lane.rows], dtype=torch.long)
        positions = lane.mask.sum(1, keepdim=True)
        lane.mask = torch.cat([lane.mask, torch.ones((len(lane.rows), 1), dtype=lane.mask.dtype)], 1)
        out = self._forward(lane.rows, False, input_ids=last, attention_mask=lane.mask, position_ids=positions,
                            past_key_values=lane.cache)
        lane.cache = out.past_key_values
        self.stats["decode_forwards"] += 1
        self.stats["decode_rows"] += len(lane.rows)
        self._advance(lane, list(lane.rows), out.logits[:, -1, :], first=0)

    # ---------------------------------------------------------------- tokens out
    def _advance(self, lane: Lane, rows: list[Row], logits, first: int) -> None:
        """Each row's next token; finished rows leave the lane. Sampling runs on the CPU, where each
        request's torch.Generator lives."""
        logits = logits.float().cpu()
        done = []
        for j, row in enumerate(rows):
            token = _sample(logits[j], row)
            finish = None
            if row.eos is not None and token == row.eos:
                finish = "stop"
            else:
                row.out.append(token)
                if len(row.out) >= row.max_tokens:
                    finish = "length"
            finish = _emit(row, finish)
            if finish:
                done.append(first + j)
                self._leave(row)
        if done:
            _select(lane, [i for i in range(len(lane.rows)) if i not in set(done)])
            if not lane.rows:
                del self.lanes[lane.key]

    def _leave(self, row: Row) -> None:
        if row.adapter != BASE:
            self.engine.release(row.adapter)

    def _drop_cancelled(self, lane: Lane) -> None:
        for row in lane.rows:
            if row.cancelled:
                self._leave(row)
        keep = [i for i, r in enumerate(lane.rows) if not r.cancelled]
        if len(keep) < len(lane.rows):
            _select(lane, keep)
            if not lane.rows:
                del self.lanes[lane.key]


def _sample(logits, row: Row) -> int:
    """Greedy at temperature 0, else temperature and nucleus (top_p) sampling from the row's generator."""
    import torch

    if row.temperature <= 0:
        return int(torch.argmax(logits))
    if row.generator is None:
        row.generator = torch.Generator()
        if row.seed is not None:
            row.generator.manual_seed(row.seed)
        else:
            row.generator.seed()
    probs = torch.softmax(logits.float() / row.temperature, -1)
    if row.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < row.top_p  # the smallest set reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=row.generator))


def _emit(row: Row, finish: str | None) -> str | None:
    """Send the row's new text (holding back what might begin a stop string or a split character);
    returns the finish reason ('stop' when a stop string appeared)."""
    text = row.tokenizer.decode(row.out, skip_special_tokens=True)
    for s in row.stop:
        cut = text.find(s)
        if cut >= 0:
            text, finish = text[:cut], "stop"
    if finish is None:
        hold = max((len(s) - 1 for s in row.stop), default=0)
        end = len(text) - hold
        while end > row.sent and text[end - 1] == "\ufffd":
            end -= 1
    else:
        end = len(text)
    event: dict = {"text": text[row.sent:end] if end > row.sent else ""}
    row.sent = max(row.sent, end)
    if finish is not None:
        event.update(finish_reason=finish, prompt_tokens=len(row.ids), completion_tokens=len(row.out))
    if event["text"] or finish is not None:
        row.emit(event)
    return finish


# ---------------------------------------------------------------- the cache
def _plain(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _pad_left(t, n: int):
    """`n` zero positions before the sequence axis: dim -2 of keys/values [B, H, L, D], dim -1 of a mask."""
    import torch.nn.functional as F

    return F.pad(t, (n, 0) if t.dim() == 2 else (0, 0, n, 0)) if n else t


def _merge(lane: Lane, cache, mask) -> None:
    """The joiners' cache left-padded into the lane's (both to the longer length)."""
    import torch

    a, b = lane.mask.shape[1], mask.shape[1]
    length = max(a, b)
    for mine, theirs in zip(lane.cache.layers, cache.layers):
        mine.keys = torch.cat([_pad_left(mine.keys, length - a), _pad_left(theirs.keys, length - b)], 0)
        mine.values = torch.cat([_pad_left(mine.values, length - a), _pad_left(theirs.values, length - b)], 0)
    lane.mask = torch.cat([_pad_left(lane.mask, length - a), _pad_left(mask, length - b)], 0)


def _select(lane: Lane, keep: list[int]) -> None:
    """Only the rows `keep` stay; leading columns no row uses are cut."""
    import torch

    lane.rows = [lane.rows[i] for i in keep]
    if not keep:
        lane.cache = lane.mask = None
        return
    index = torch.tensor(keep, dtype=torch.long)
    mask = lane.mask[index]
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    lane.mask = mask[:, start:]
    for layer in lane.cache.layers:
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
