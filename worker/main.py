"""The worker process: load the model once, warm it up, register, then drain the queue."""

from __future__ import annotations

import gc
import logging
import time

import numpy as np
from redis import Redis

from ddim_inversion import logs
from ddim_inversion.params import InversionParams
from worker import rq_adapter
from worker.batching import InversionWorker
from worker.compile import compile_unet, warm_up_buckets
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest
from worker.models import LoadedModel, ModelLoadError, limit_cpu_threads, load_model
from worker.settings import WorkerSettings, get_settings

log = logging.getLogger("worker")

CPU_BATCH_SIZE = 8
"""Default batch on the CPU: larger batches gain little there."""

GPU_BYTES_PER_MEGAPIXEL = 2.5 * 2**30
"""Rough peak UNet activation memory per image per megapixel in fp16 (SD 1.5), with margin."""


def default_batch_size(model: LoadedModel) -> int:
    """How many images fit: from free GPU memory at start, or CPU_BATCH_SIZE."""
    import torch

    if model.device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _total = torch.cuda.mem_get_info(model.device)
    width, height = model.native_resolution
    per_image = GPU_BYTES_PER_MEGAPIXEL * (width * height / 2**20) * 2  # x2: guidance rows
    return int(max(1, min(64, (free * 0.8) // per_image)))


def warm_up(model: LoadedModel) -> float:
    """One short inversion, so that the first job does not pay for lazy initialisation."""
    started = time.perf_counter()
    width, height = model.native_resolution
    image = np.full((height, width, 3), 127, dtype=np.uint8)
    invert(model, [InversionRequest(image, InversionParams(prompt="", num_inference_steps=2))])
    return time.perf_counter() - started


def prepare(model: LoadedModel, settings: WorkerSettings) -> int:
    """Ready the loaded model to serve: warm it up (`warmup`), compile it (`compile`, its
    buckets warmed up whatever `warmup` says: that is when they compile); its batch size."""
    if settings.warmup:
        log.info("warm-up took %.2f s", warm_up(model))
    max_batch_size = settings.max_batch_size or default_batch_size(model)
    if settings.compile != "none":
        started = time.perf_counter()
        compile_unet(model, settings.compile, max_rows=2 * max_batch_size)
        warm_up_buckets(model)
        log.info(
            "compiled the UNet (%s) in %.1f s", settings.compile, time.perf_counter() - started
        )
    return max_batch_size


def build_worker(
    settings: WorkerSettings, model: LoadedModel, connection: Redis, max_batch_size: int
) -> InversionWorker:
    queue = rq_adapter.open_queue(connection, settings.served_queue_name)
    return InversionWorker(
        [queue],
        connection=connection,
        model=model,
        settings=settings,
        max_batch_size=max_batch_size,
    )


def run(burst: bool = False) -> int:
    # One JSON object per line: nothing a job carries can forge a log line.
    logs.configure("INFO")
    settings = get_settings()
    limit_cpu_threads(settings.threads)
    try:
        model = load_model(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            allow_download=settings.allow_download,
            cache_dir=settings.model_cache_dir,
        )
    except ModelLoadError as exc:
        log.error("cannot load the model: %s", exc)
        return 2
    log.info("model %s loaded on %s (%s)", model.name, model.device, model.dtype)
    max_batch_size = prepare(model, settings)
    connection = Redis.from_url(
        settings.redis_url, socket_connect_timeout=5, health_check_interval=10
    )
    worker = build_worker(settings, model, connection, max_batch_size)
    # What is loaded now lives until the exit: out of the collector's reach, it is not walked
    # by every full collection while serving, nor by the exit's last one (seconds, with
    # torch, diffusers and the model loaded: the shutdown bound, SHUTDOWN_S, counts on it).
    gc.freeze()
    log.info(
        "worker %s ready: serves %s from queue %s, max_batch_size %d",
        worker.name,
        settings.served_model_name,
        settings.served_queue_name,
        worker.max_batch_size,
    )
    worker.work(burst=burst, logging_level="INFO")
    return 0
