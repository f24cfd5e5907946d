"""The gateway's image decoders: a bounded pool of processes (service/decoder.py).

An upload is decoded in one of at most `decode_workers` decoder processes, never in a
request thread: a decode that passes its CPU or memory limit ends its process, and the
request gets 422 (`invalid_input`, field `image`) while every other request goes on. The
event loop awaits the pipes; no thread waits on a decode. A decoder is started when one
is needed and none is idle, kept for the next decode, and replaced once it died.

One API key has at most `max_decodes_per_key` decodes waiting or running in this process
(429 `rate_limited` beyond), so one key cannot hold every decoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ddim_inversion.errors import ErrorCode
from service import decoder
from service.errors import RETRY_AFTER_S, ProblemError
from service.settings import GatewaySettings

_IMAGE_STATUS = {"unsupported_media_type": 415, "image_too_large": 413, "invalid_input": 422}

SOURCE_ROOT = str(Path(decoder.__file__).resolve().parents[1])
"""Where the decoder's `service` package is: the one this gateway runs."""

QUIET_THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""A decoder needs no numeric threads: each would reserve address space under its limit."""

PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")
"""The only variables a decoder inherits: never the gateway's settings (its Redis URL and
password, its key hashes), in case a hostile file takes a decoder over. Nor does it
inherit any open file: no Redis connection, no client socket."""


def decoder_env() -> dict[str, str]:
    """The decoder's environment: PASSED_ENV, this gateway's sources first on the path."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (SOURCE_ROOT, env.get("PYTHONPATH"))))
    return env | QUIET_THREADS


@dataclass(frozen=True)
class DecodeRequest:
    """One upload and how to normalise it: `size` (width, height), or None for its own."""

    data: bytes
    size: tuple[int, int] | None
    resize_mode: str


class Decoder:
    """One decoder process and its pipes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, settings: GatewaySettings) -> Decoder:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.decoder",
            str(settings.decode_memory_bytes),
            str(settings.decode_cpu_s),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=decoder_env(),
        )
        return cls(process)

    async def run(self, header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """One request and its reply; IncompleteReadError or a pipe error if it died."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(decoder.message_head(header, len(data)))
        stdin.write(data)
        await stdin.drain()
        length = decoder.header_length(await stdout.readexactly(4))
        reply = json.loads(await stdout.readexactly(length))
        return reply, await stdout.readexactly(int(reply["bytes"]))

    async def stop(self) -> int:
        """Kill it (if it still runs) and reap it: its return code."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        return await self.process.wait()


class DecodePool:
    """Decoder processes of one gateway process, and the decodes each key has in progress."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.decode_workers)
        self._idle: list[Decoder] = []
        self._all: set[Decoder] = set()
        self._per_key: Counter[str] = Counter()
        self.in_progress = 0
        self.started = 0
        """Decoder processes started so far."""
        self.stopped: Counter[str] = Counter()
        """Decoder processes ended by a decode, by reason: cpu, memory, timeout, crashed."""

    @contextlib.asynccontextmanager
    async def slot(self, owner: str) -> AsyncIterator[None]:
        """Hold one of the key's decodes, then one decoder's turn; 429 over the key's limit.

        The anonymous owner (auth disabled) has no per-key limit, like every other one."""
        limit = self.settings.max_decodes_per_key
        if owner and self._per_key[owner] >= limit:
            raise ProblemError(
                429,
                ErrorCode.RATE_LIMITED,
                f"this API key already has its limit of {limit} images being decoded; "
                "submit again once they are",
                field="image",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._per_key[owner] += 1
        try:
            async with self._slots:
                self.in_progress += 1
                try:
                    yield
                finally:
                    self.in_progress -= 1
        finally:
            self._per_key[owner] -= 1
            if not self._per_key[owner]:
                del self._per_key[owner]

    async def decode(self, owner: str, request: DecodeRequest) -> np.ndarray:
        """The (height, width, 3) uint8 array of the upload, normalised; a ProblemError
        (field `image`) for an image refused, or whose decode passed a limit."""
        async with self.slot(owner):
            reply, pixels = await self._run(self._header(request), request.data)
        if not reply.get("ok"):
            raise self._refusal(reply)
        width, height = int(reply["width"]), int(reply["height"])
        if request.size is not None and (width, height) != request.size:
            raise RuntimeError(f"the decoder answered {width}x{height}, not {request.size}")
        if len(pixels) != width * height * 3:
            raise RuntimeError(f"the decoder sent {len(pixels)} bytes for {width}x{height}")
        return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3)

    def _header(self, request: DecodeRequest) -> dict[str, Any]:
        settings = self.settings
        return {
            "size": request.size,
            "resize_mode": request.resize_mode,
            "max_pixels": settings.max_pixels,
            "allowed_formats": list(settings.allowed_formats),
            "max_decode_bytes": settings.decode_memory_bytes,
            "max_jpeg_scans": settings.max_jpeg_scans,
            "max_frames": settings.max_image_frames,
        }

    async def _run(self, header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """One decode on an idle decoder (or a new one); a decoder that does not answer
        within the wall-clock limit is killed, one that died is forgotten."""
        while self._idle and self._idle[-1].process.returncode is not None:
            await self._retire(self._idle.pop(), "crashed")  # died while idle
        worker = self._idle.pop() if self._idle else await self._start()
        try:
            reply, pixels = await asyncio.wait_for(
                worker.run(header, data), self.settings.decode_timeout_s
            )
        except TimeoutError:
            await self._retire(worker, "timeout")
            raise self._stopped(f"took over {self.settings.decode_timeout_s:g} s") from None
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError):
            _, what = self._why(await self._retire(worker, None))
            raise self._stopped(what) from None
        except BaseException:  # cancelled mid-message: the pipes are out of step
            await self._retire(worker, "cancelled")
            raise
        if reply.get("code") == decoder.MEMORY_EXCEEDED:
            await self._retire(worker, "memory")
        else:
            self._idle.append(worker)
        return reply, pixels

    async def _start(self) -> Decoder:
        worker = await Decoder.start(self.settings)
        self._all.add(worker)
        self.started += 1
        return worker

    async def _retire(self, worker: Decoder, reason: str | None) -> int:
        """Stop a decoder and forget it; the reason it is counted under (None: from its
        return code). Its return code."""
        self._all.discard(worker)
        code = await worker.stop()
        self.stopped[reason or self._why(code)[0]] += 1
        return code

    def _why(self, code: int) -> tuple[str, str]:
        """(reason, what happened) of a decoder that ended with `code` mid-decode."""
        if code == -signal.SIGXCPU:
            return "cpu", f"used over {self.settings.decode_cpu_s} s of CPU"
        return "crashed", f"stopped the decoder (exit status {code})"

    def _stopped(self, what: str) -> ProblemError:
        return ProblemError(
            422, ErrorCode.INVALID_INPUT, f"decoding the image {what}; refused", field="image"
        )

    @staticmethod
    def _refusal(reply: dict[str, Any]) -> ProblemError:
        code = str(reply.get("code"))
        message = str(reply.get("message", "the image cannot be decoded"))
        if code not in _IMAGE_STATUS:
            return ProblemError(422, ErrorCode.INVALID_INPUT, message, field="image")
        return ProblemError(_IMAGE_STATUS[code], ErrorCode(code), message, field="image")

    async def close(self) -> None:
        """Stop every decoder, idle or busy (at shutdown)."""
        workers, self._idle = list(self._all), []
        self._all.clear()
        await asyncio.gather(*(worker.stop() for worker in workers), return_exceptions=True)


class DecodeMetrics(Collector):
    """The pool's decodes in progress and its decoder processes started and stopped."""

    def __init__(self, pool: Callable[[], DecodePool | None]) -> None:
        self.pool = pool  # the app's, once its lifespan started

    def collect(self) -> Iterator[Any]:
        pool = self.pool()
        if pool is None:
            return
        yield GaugeMetricFamily(
            "inversion_image_decodes_in_progress",
            "Uploads being decoded in this gateway process's decoder processes.",
            value=pool.in_progress,
        )
        yield CounterMetricFamily(
            "inversion_image_decoders_started",
            "Decoder processes started by this gateway process.",
            value=pool.started,
        )
        stopped = CounterMetricFamily(
            "inversion_image_decoders_stopped",
            "Decoder processes killed mid-decode, by reason (cpu, memory, timeout, crashed, "
            "cancelled): each was replaced, and its request refused with 422.",
            labels=["reason"],
        )
        for reason in STOP_REASONS:
            stopped.add_metric([reason], pool.stopped[reason])
        yield stopped


STOP_REASONS = ("cpu", "memory", "timeout", "crashed", "cancelled")


@contextlib.asynccontextmanager
async def running(settings: GatewaySettings) -> AsyncIterator[DecodePool]:
    """A pool for the app's lifespan, closed at its end."""
    pool = DecodePool(settings)
    try:
        yield pool
    finally:
        await pool.close()
