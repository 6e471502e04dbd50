"""Warm workers: training processes that outlive a run, on the local head `adapterflow up` starts.

A Ray Train run starts its processes afresh (a controller, a worker group and their helpers), and
each worker imports torch, transformers, PEFT and DeepSpeed and loads the base model: on 2 cores that
is most of a short run. On the `up` head the same training loop (`workers.train_loop.run_training`)
runs instead in named, detached actors that have imported all that once, built one DeepSpeed engine
and keep the tokenized data of the last runs (`workers.data`; the base model reloads from the page
cache in a few hundredths of a second, faster than a kept copy could be copied): a run leases
`train.num_workers` of them, reserves the CPUs it trains on (a placement group of the spec's
`resources_per_worker`, as Ray Train would), has them meet in a torch.distributed group (gloo) and
writes its checkpoints where Ray Train would (`<workspace>/ray_results/<run>/checkpoint_<step>`, every
rank into the same folder, complete once every rank has written).

What Ray Train does that this keeps: `train.max_failures` (a worker process that dies is replaced and
the run resumes from its last complete checkpoint), the reporting and checkpoints the loop writes, the
MLflow step metrics of rank 0. The driver falls back to Ray Train when there is no `up` head, when the
spec asks for GPUs, a non-gloo backend or more workers than the head keeps, or when the warm workers
are busy with another run. A warm worker whose code (the `workers` package files it imported) or
environment differs from the driver's is replaced before it is leased, so it never runs stale code.
This module is the driver's side; what runs in a warm process is `workers.warm_worker`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from pathlib import Path

from workers.errors import AdapterflowError, ResourceError, TrainingError
from workers.warm_worker import WarmWorker, fingerprint, latest_complete, worker_env

log = logging.getLogger(__name__)

NAMESPACE = "adapterflow"
NAME = "adapterflow-warm-{}"
_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(num_cpus=0, max_concurrency=4)(WarmWorker)
    return _ACTOR


# ---------------------------------------------------------------- the driver side
def pool_size() -> int:
    """How many warm workers the connected head keeps (0: not connected to an `up` head)."""
    import ray

    from workers import cluster

    if not ray.is_initialized():
        return 0
    state = cluster.running()
    if state is None or ray.get_runtime_context().gcs_address != state["address"]:
        return 0
    return int(state.get("warm_workers", 0))


def fits(spec) -> bool:
    t = spec.train
    return (1 <= t.num_workers <= pool_size() and not t.use_gpu and t.resolved_backend() == "gloo"
            and t.offload == "none")


def _handle(i: int, create: bool = True):
    import ray

    try:
        return ray.get_actor(NAME.format(i), namespace=NAMESPACE)
    except ValueError:
        if not create:
            return None
    return _actor_class().options(name=NAME.format(i), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                  runtime_env={"env_vars": worker_env()}).remote()


def _replace(i: int, handle=None):
    """Kill warm worker `i` (if alive) and start a new one under its name (freed once the actor is dead)."""
    import ray

    handle = handle or _handle(i, create=False)
    if handle is not None:
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 30
    while _handle(i, create=False) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    return _handle(i)


def _acquire(i: int, token: str, fp: str):
    """(handle, answer) for warm worker `i`: a dead worker or one running other code is replaced first."""
    import ray
    from ray.exceptions import RayActorError

    h = _handle(i)
    try:
        answer = ray.get(h.acquire.remote(token, fp))
    except RayActorError:
        answer = "dead"
    if answer in ("stale", "dead"):
        log.info("warm worker %d is %s: starting a new one", i, "gone" if answer == "dead" else
                 "on other code or environment than this driver")
        h = _replace(i, h)
        answer = ray.get(h.acquire.remote(token, fp))
    return h, answer


def start(size: int) -> list[dict]:
    """Start (or refresh) `size` warm workers and wait until each has done its imports."""
    import ray
    from ray.exceptions import RayActorError

    fp = fingerprint()
    handles = [_handle(i) for i in range(size)]
    for i, h in enumerate(handles):
        try:
            info = ray.get(h.info.remote())
        except RayActorError:
            handles[i] = _replace(i, h)
            continue
        if info["fingerprint"] != fp and not info["busy"] and not info["leased"]:
            handles[i] = _replace(i, h)
    return ray.get([h.info.remote() for h in handles])


@contextlib.contextmanager
def lease(n: int):
    """`n` idle warm workers leased to this driver as (token, handles), or None when not that many are free."""
    fp, token, got = fingerprint(), uuid.uuid4().hex, []
    try:
        for i in range(pool_size()):
            if len(got) == n:
                break
            h, answer = _acquire(i, token, fp)
            if answer == "ok":
                got.append(h)
        yield (token, got) if len(got) == n else None
    finally:
        for h in got:
            with contextlib.suppress(Exception):
                h.release.remote(token)


def _unwrap(exc: Exception) -> Exception:
    """The error a remote call raised, as the driver should see it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, AdapterflowError):
        return cause
    if cause is not None:
        return TrainingError(f"{type(cause).__name__}: {cause}")
    return exc


def _gather(refs: list, handles: list) -> list:
    """Every rank's result; on the first failure (or Ctrl-C) every rank of the run is killed, since the
    others would wait for it in a collective."""
    import ray

    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])
    except BaseException:
        for h in handles:
            with contextlib.suppress(Exception):
                ray.kill(h, no_restart=True)
        raise
    return ray.get(refs)


@contextlib.contextmanager
def _reserved(train, n: int, wait_s: float = 60.0):
    """The CPUs (the spec's resources_per_worker x n) the run trains on, held while it does."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([dict(train.worker_resources()) for _ in range(n)], strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=wait_s)
        if not ready:
            raise ResourceError(f"training needs {n} x {train.worker_resources()} and this Ray instance did not free "
                                f"them within {wait_s:.0f} s; stop what holds them or lower train.num_workers")
        yield pg
    finally:
        remove_placement_group(pg)


def train(spec, config: dict, run_dir: Path) -> dict | None:
    """Run the training loop on `train.num_workers` warm workers; rank 0's last report and checkpoint,
    or None when no warm workers can take the run (the caller uses Ray Train)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    t = spec.train
    n, failures = t.num_workers, 0
    config = {**config, "checkpoint_root": str(run_dir)}
    while True:
        with lease(n) as leased:
            if leased is None:
                if failures == 0:
                    return None
                raise TrainingError(f"no warm workers to resume on after {failures} failure(s)")
            token, handles = leased
            with _reserved(t, n):
                rendezvous = ray.get(handles[0].rendezvous.remote())
                refs = [h.train.remote(token, config, rank, n, rendezvous) for rank, h in enumerate(handles)]
                try:
                    return _gather(refs, handles)[0]
                except RayActorError as exc:
                    failures += 1
                    if failures > t.max_failures:
                        raise TrainingError(f"a warm worker died {failures} time(s) (train.max_failures "
                                            f"{t.max_failures}): {exc}") from None
                    last = latest_complete(run_dir)
                    log.warning("a warm worker died (%s); resuming from %s", exc, last or "the start")
                    if last is not None:
                        config["resume_from"] = str(last)
                except RayTaskError as exc:
                    raise _unwrap(exc) from None


_NOT_WARM = object()


def call(method: str, *args):
    """`method(*args)` on an idle warm worker, or `_NOT_WARM` when none is free."""
    import ray
    from ray.exceptions import RayTaskError

    with lease(1) as leased:
        if leased is None:
            return _NOT_WARM
        token, (h,) = leased
        try:
            return ray.get(getattr(h, method).remote(token, *args))
        except RayTaskError as exc:
            raise _unwrap(exc) from None


def not_warm(result) -> bool:
    return result is _NOT_WARM
