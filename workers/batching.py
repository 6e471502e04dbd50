"""Which examples each rank runs at each step (`data.batching`), as a pure function of (seed, epoch,
step, rank): a resumed run lands on exactly the batch an uninterrupted run would have seen, with no
sampler state to save.

- `random`: every global batch a seeded random draw; each micro-batch padded to its own longest.
- `length_grouped`: the epoch's seeded order is cut into windows of `data.group_window` global
  batches; each window is sorted by length and cut into batches, and the epoch's batches are then run
  in a seeded random order. A micro-step's examples across ranks are neighbours in length, and every
  rank pads to the same width (`BatchPlan.width`), so all ranks run the same shapes.
- `packed`: examples are packed several to a row up to `data.max_length` once per run
  (`pack_rows`, best fit decreasing over a seeded order); the rows are then planned like `random`
  examples, with the same-shapes rule of `length_grouped`. `collate_packed` restarts the position ids
  at every example, which is what keeps examples of one row apart (`packing_refusal` checks the model).

`Batches` is a run's side of it (the units, their plan, each micro-batch's tensors) and `TokenCount`
the real and computed tokens the loop reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.errors import SpecError

BATCHINGS = ("random", "length_grouped", "packed")


@dataclass(frozen=True)
class BatchPlan:
    n_examples: int
    """Units planned: examples, or packed rows (`packed`)."""
    global_batch: int
    world_size: int
    grad_accum: int
    seed: int
    mode: str = "random"
    lengths: tuple[int, ...] = ()
    """Tokens of each unit (needed by `length_grouped` and `packed`)."""
    window: int = 64
    """Global batches per length-sorted window (`length_grouped`)."""
    _orders: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.mode not in BATCHINGS:
            raise ValueError(f"batching {self.mode!r} is not one of {', '.join(BATCHINGS)}")
        if self.mode != "random" and len(self.lengths) != self.n_examples:
            raise ValueError(f"batching {self.mode}: {len(self.lengths)} lengths for {self.n_examples} units")

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.global_batch

    def _epoch_batches(self, epoch: int):
        """The epoch's global batches in run order (a tensor [steps, global_batch] of unit indices)."""
        import torch

        if epoch in self._orders:
            return self._orders[epoch]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_examples, generator=gen)
        steps, g = self.steps_per_epoch, self.global_batch
        if self.mode == "length_grouped":
            used = order[: steps * g]
            lengths = torch.tensor(self.lengths, dtype=torch.long)[used]
            span = self.window * g
            parts = []
            for start in range(0, len(used), span):
                # longest first; ties keep the seeded order
                keys = lengths[start : start + span]
                parts.append(used[start : start + span][torch.sort(-keys, stable=True).indices])
            batches = torch.cat(parts).view(steps, g)
            batches = batches[torch.randperm(steps, generator=gen)]
        else:
            batches = order[: steps * g].view(steps, g)
        if len(self._orders) > 2:
            self._orders.clear()
        self._orders[epoch] = batches
        return batches

    def _layout(self, step: int):
        """[grad_accum, world, micro] unit indices of global `step`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        batch = self._epoch_batches(epoch)[pos]
        micro = self.global_batch // self.world_size // self.grad_accum
        if self.mode == "random":
            # rank r takes the r-th slice of the batch, cut into its micro-batches
            return batch.view(self.world_size, self.grad_accum, micro).transpose(0, 1)
        # a micro-step's micro-batches are neighbours in the batch (in length, once grouped)
        return batch.view(self.grad_accum, self.world_size, micro)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Unit indices of each micro-batch this rank runs at global optimizer `step`."""
        return [m.tolist() for m in self._layout(step)[:, rank]]

    def width(self, step: int, micro: int) -> int | None:
        """The width every rank pads micro-batch `micro` of `step` to (the longest unit of that
        micro-step on any rank); None under `random`, where each pads to its own longest."""
        if self.mode == "random":
            return None
        return max(self.lengths[i] for i in self._layout(step)[micro].flatten().tolist())


def pack_rows(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Example indices of each packed row: best fit decreasing over a seeded order, every row holding
    at most `capacity` tokens. A pure function of its arguments."""
    import torch

    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    rows: list[list[int]] = []
    free: list[list[int]] = [[] for _ in range(capacity + 1)]  # free[s]: rows with s tokens left
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a packed row's {capacity}")
        row = next((s for s in range(n, capacity + 1) if free[s]), None)
        if row is None:
            rows.append([i])
            r = len(rows) - 1
            left = capacity - n
        else:
            r = free[row].pop()
            rows[r].append(i)
            left = row - n
        if left > 0:
            free[left].append(r)
    return rows


def collate_packed(rows: list[list], pad_id: int, width: int | None = None):
    """A batch of packed rows (each a list of workers.data.Example, causal LM): input ids one after
    another, position ids restarting at 0 for each example, and no attention mask, so the model's mask
    keeps every example to itself. Each example's first label is ignored (nothing before it in its
    own example predicts it); padding at a row's end is one more sequence, with ignored labels. No
    KV cache (`use_cache` off): transformers reads packed rows from the position ids only without one."""
    import torch

    from workers.data import IGNORE_INDEX

    width = width or max(sum(len(e.input_ids) for e in row) for row in rows)
    ids, pos, labels = [], [], []
    for row in rows:
        r_ids, r_pos, r_lab = [], [], []
        for e in row:
            r_ids += e.input_ids
            r_pos += range(len(e.input_ids))
            r_lab += [IGNORE_INDEX] + list(e.labels[1:])
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        pos.append(r_pos + list(range(pad)))
        labels.append(r_lab + [IGNORE_INDEX] * pad)
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "labels": torch.tensor(labels),
            "use_cache": False}


def packing_refusal(model) -> str | None:
    """Why `model` cannot train on packed rows (None: it can). Checked, not assumed: two short
    sequences packed in one row must give the logits each gives alone."""
    import torch

    impl = getattr(model.config, "_attn_implementation", None) or "default"
    name = type(model).__name__
    vocab = int(getattr(model.config, "vocab_size", 2))
    a = [(7 * k + 3) % vocab for k in range(5)]
    b = [(11 * k + 5) % vocab for k in range(4)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in (a, b)]
            packed = model(input_ids=torch.tensor([a + b]), use_cache=False,
                           position_ids=torch.tensor([list(range(len(a))) + list(range(len(b)))])).logits[0]
    except Exception as exc:  # noqa: BLE001 - any model that cannot run the probe cannot pack
        return f"{name} with attention {impl!r} cannot run packed rows ({exc})"
    finally:
        model.train(was_training)
    if not torch.allclose(packed, torch.cat(alone), atol=1e-4, rtol=1e-4):
        return (f"{name} with attention {impl!r} lets packed examples see each other (position ids "
                f"restarting per example do not isolate them)")
    return None


class Batches:
    """The run's training batches under `data.batching`: the units planned (examples, or packed rows of
    examples), their plan, and the padded tensors of each micro-batch."""

    def __init__(self, examples: list, spec, model, world: int):
        train, data = spec.train, spec.data
        self.mode = data.resolved_batching(spec.model.task)
        self.unit = "training examples"
        lengths = [len(e.input_ids) for e in examples]
        if self.mode == "packed":
            refusal = packing_refusal(model)
            if refusal:
                raise SpecError(f"data.batching packed: {refusal}; use length_grouped, or a model.attn_implementation "
                                "that keeps packed examples apart")
            rows = pack_rows(lengths, data.max_length, train.seed)
            self.units = [[examples[i] for i in row] for row in rows]
            lengths = [sum(lengths[i] for i in row) for row in rows]
            self.unit = f"packed rows ({len(examples)} examples)"
        else:
            self.units = examples
        self.lengths = lengths
        self.plan = BatchPlan(len(self.units), train.global_batch_size, world, train.grad_accum, train.seed,
                              mode=self.mode, lengths=tuple(lengths) if self.mode != "random" else (),
                              window=data.group_window)

    def micro_batches(self, step: int, rank: int, pad_id: int):
        from workers.data import collate

        for m, idx in enumerate(self.plan.micro_batches(step, rank)):
            width = self.plan.width(step, m)
            units = [self.units[i] for i in idx]
            batch = collate_packed(units, pad_id, width) if self.mode == "packed" else collate(units, pad_id,
                                                                                                width=width)
            batch["real_tokens"] = sum(self.lengths[i] for i in idx)
            yield batch


class TokenCount:
    """Tokens trained on (real) and computed (with padding), summed over ranks at each log."""

    def __init__(self, world: int):
        self.world = world
        self.real = self.computed = 0  # this rank, since the last log
        self.total_real = self.total_computed = 0  # every rank, whole loop

    def add(self, batch: dict) -> None:
        self.real += batch.pop("real_tokens")
        self.computed += batch["input_ids"].numel()

    def window(self, seconds: float) -> dict:
        import torch

        counts = torch.tensor([self.real, self.computed], dtype=torch.float64)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(counts)
        real, computed = (int(x) for x in counts.tolist())
        self.real = self.computed = 0
        self.total_real += real
        self.total_computed += computed
        return {"tokens_per_s": real / max(seconds, 1e-9), "real_token_share": real / max(computed, 1)}

    def totals(self, seconds: float) -> dict:
        return {"train_tokens": self.total_real, "computed_tokens": self.total_computed,
                "real_token_share": self.total_real / max(self.total_computed, 1),
                "tokens_per_s": self.total_real / max(seconds, 1e-9)}
