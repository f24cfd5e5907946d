"""The models the pool serves, as a gateway reads them, and the model a submission runs on.

Workers announce their model in MODELS_KEY (kept without expiry: a model stays known, and
its jobs queue, while all its workers are down) and publish their own records under
WORKERS_KEY. Each model's jobs wait in a queue of their own (keys.queue_name_for), which
only the workers serving that model drain: a batch never mixes models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError

from ddim_inversion.contract import ModelInfo, WorkerRecord
from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import MODELS_KEY, THROUGHPUT_KEY, WORKERS_KEY, queue_name_for
from service import rq_adapter, workers
from service.errors import ProblemError
from service.schemas import Capacity, ModelCapacity, Models, ModelView, WorkerCapacity
from service.settings import GatewaySettings

logger = logging.getLogger(__name__)


def model_queue(connection: redis.Redis, settings: GatewaySettings, model: str) -> rq_adapter.Queue:
    """The queue of one model's jobs."""
    return rq_adapter.open_queue(connection, queue_name_for(model, settings.queue_name))


def known_models(
    raw_models: Mapping[Any, Any], live: Iterable[WorkerRecord]
) -> dict[str, ModelInfo]:
    """Every model announced (a MODELS_KEY hash already read) or served by a live worker
    (one that predates the announcements), by name; a live worker's record wins."""
    known: dict[str, ModelInfo] = {}
    for name, raw in raw_models.items():
        try:
            known[workers.text(name)] = ModelInfo.model_validate_json(raw)
        except ValidationError:
            logger.warning("ignoring unreadable model record %r", name)
    for record in live:
        known[record.model.name] = record.model
    return dict(sorted(known.items()))


def read_pool(
    connection: redis.Redis, stale_s: float
) -> tuple[dict[str, ModelInfo], list[WorkerRecord]]:
    """The known models and the live workers, in one round trip."""
    pipe = connection.pipeline(transaction=False)
    pipe.hgetall(MODELS_KEY)
    pipe.hgetall(WORKERS_KEY)
    raw_models, raw_workers = pipe.execute()
    live = workers.fresh_workers(raw_workers, stale_s)
    return known_models(raw_models, live), live


def _refused(detail: str) -> ProblemError:
    return ProblemError(422, ErrorCode.VALIDATION_ERROR, detail, field="model")


def _served(known: Mapping[str, ModelInfo]) -> str:
    return ", ".join(known) if known else "none yet (no worker has announced a model)"


def choose(
    requested: str | None, known: Mapping[str, ModelInfo], default: str
) -> tuple[str, ModelInfo | None]:
    """The model a job runs on and its record: the one it names, else the gateway's
    default, else the pool's only model; 422 (`model`, listing the served ones) otherwise.

    The record is None only for the configured default before any worker announced it:
    its jobs queue and are checked against the gateway's own limits alone.
    """
    name = requested or default
    if name:
        if name in known:
            return name, known[name]
        if name == default:
            return name, None
        raise _refused(
            f"no worker has ever served model {name!r}; the models served: {_served(known)}"
        )
    if len(known) == 1:
        ((only, info),) = known.items()
        return only, info
    raise _refused(f"name the model the job runs on (`model`); the models served: {_served(known)}")


@dataclass(frozen=True)
class ModelLoad:
    """One model of the pool now: its record, live workers, queue and throughput."""

    name: str
    info: ModelInfo | None
    workers: list[WorkerRecord]
    rates: list[float | None]
    queued: int
    running: int

    @property
    def images_per_s(self) -> float | None:
        return workers.summed_rate(self.rates)


def model_loads(connection: redis.Redis, settings: GatewaySettings) -> list[ModelLoad]:
    """Every known model (and the configured default), by name: two round trips, one for
    the records, one for the queues."""
    pipe = connection.pipeline(transaction=False)
    pipe.hgetall(MODELS_KEY)
    pipe.hgetall(WORKERS_KEY)
    pipe.hgetall(THROUGHPUT_KEY)
    raw_models, raw_workers, raw_rates = pipe.execute()
    live = workers.fresh_workers(raw_workers, settings.worker_stale_s)
    known: dict[str, ModelInfo | None] = dict(known_models(raw_models, live))
    if settings.default_model:
        known.setdefault(settings.default_model, None)
    rates = workers.rates_by_worker(raw_rates)
    queues = {name: model_queue(connection, settings, name) for name in sorted(known)}
    pipe = connection.pipeline(transaction=False)
    for queue in queues.values():
        pipe.llen(rq_adapter.queue_key(queue))
        pipe.zcard(rq_adapter.started_key(queue))
    counts = pipe.execute()
    loads = []
    for index, name in enumerate(queues):
        serving = [record for record in live if record.model.name == name]
        loads.append(
            ModelLoad(
                name=name,
                info=known[name],
                workers=serving,
                rates=[rates.get(record.name) for record in serving],
                queued=int(counts[2 * index]),
                running=int(counts[2 * index + 1]),
            )
        )
    return loads


FAMILY_BY_TEXT_WIDTH: Mapping[int, str] = {768: "sd1", 1024: "sd2"}
"""A model's family from its text encoder's width: CLIP ViT-L (SD 1.x), OpenCLIP ViT-H
(SD 2.x)."""


def family_of(info: ModelInfo | None) -> str:
    """sdxl as the worker announced it; sd1 or sd2 by the text encoder's width; else other."""
    if info is not None and info.family == "sdxl":
        return "sdxl"
    width = info.text_hidden_size if info is not None else None
    return FAMILY_BY_TEXT_WIDTH.get(width or 0, "other")


def model_capacity(load: ModelLoad) -> ModelCapacity:
    rate = load.images_per_s
    return ModelCapacity(
        name=load.name,
        ready=bool(load.workers),
        live_workers=len(load.workers),
        queued=load.queued,
        running=load.running,
        images_per_s=rate,
        estimated_wait_s=workers.estimate_wait_s(load.queued, rate),
    )


def models(connection: redis.Redis, settings: GatewaySettings) -> Models:
    """GET /v1/models: every known model, its record, workers, queue and throughput."""
    loads = model_loads(connection, settings)
    names = [load.name for load in loads]
    default = settings.default_model or (names[0] if len(names) == 1 else None)
    views = []
    for load in loads:
        info = load.info
        views.append(
            ModelView(
                **model_capacity(load).model_dump(),
                family=family_of(info),
                native_resolution=info.native_resolution if info else None,
                prediction_type=(
                    info.scheduler_config.get("prediction_type", "epsilon") if info else None
                ),
                scheduler_config=info.scheduler_config if info else None,
                tokenizer_max_length=info.tokenizer_max_length if info else None,
                default=load.name == default,
            )
        )
    return Models(models=views, default=default)


def capacity(connection: redis.Redis, settings: GatewaySettings) -> Capacity:
    """The live workers and their models, each model's readiness and queue, and what a
    job submitted now would wait."""
    loads = model_loads(connection, settings)
    rates = {
        record.name: rate
        for load in loads
        for record, rate in zip(load.workers, load.rates, strict=True)
    }
    moment = time.time()
    live = sorted(
        (record for load in loads for record in load.workers),
        key=lambda record: record.heartbeat_at,
        reverse=True,
    )
    pool = [
        WorkerCapacity(
            **workers.worker_view(record, moment).model_dump(), images_per_s=rates[record.name]
        )
        for record in live
    ]
    queued = sum(load.queued for load in loads)
    rate = workers.summed_rate(w.images_per_s for w in pool)
    return Capacity(
        workers=pool,
        models=sorted({w.model for w in pool}),
        by_model=[model_capacity(load) for load in loads],
        queued=queued,
        running=sum(load.running for load in loads),
        images_per_s=rate,
        estimated_wait_s=workers.estimate_wait_s(queued, rate),
    )
