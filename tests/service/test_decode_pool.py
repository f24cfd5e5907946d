"""The gateway's image decoders (service/decode_pool.py): real decoder processes, each
decode under its CPU and memory limits, a dead decoder replaced, decodes per key bounded."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import pytest

from service import decode_pool, decoder
from service.decode_pool import DecodePool, Decoder, DecodeRequest
from service.errors import ProblemError
from service.settings import GatewaySettings
from tests import hostile_images
from tests.conftest import STOP_GUARD_S
from tests.gateway_app import UNUSED_REDIS_URL

PNG = hostile_images.encode(hostile_images.Image.new("RGB", (24, 16), (200, 30, 30)), "PNG")


def pool_settings(**overrides: Any) -> GatewaySettings:
    return GatewaySettings(redis_url=UNUSED_REDIS_URL, auth_disabled=True, **overrides)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_a_decode_returns_the_normalised_pixels_and_its_decoder_is_kept():
    async def main() -> tuple[np.ndarray, np.ndarray, int]:
        pool = DecodePool(pool_settings())
        try:
            first = await pool.decode("a", DecodeRequest(PNG, (12, 8), "stretch"))
            second = await pool.decode("a", DecodeRequest(PNG, None, "center_crop"))
            return first, second, pool.started
        finally:
            await pool.close()

    first, second, started = run(main())
    assert first.shape == (8, 12, 3) and (first == (200, 30, 30)).all()
    assert second.shape == (16, 24, 3) and (second == (200, 30, 30)).all()
    assert started == 1  # one decoder served both


def test_a_decode_past_its_cpu_limit_is_refused_and_its_decoder_replaced():
    # 40,000 scans of 3000x3000: each a pass over 140,625 blocks; about 25 s of CPU on a
    # 2-core x86 of 2020, so far past the limit of 1 s on any machine.
    hostile = hostile_images.many_scans_jpeg(3000, 40_000)
    settings = pool_settings(decode_cpu_s=1, max_jpeg_scans=10**6, decode_workers=1)

    async def main() -> tuple[ProblemError, DecodePool, np.ndarray]:
        pool = DecodePool(settings)
        try:
            with pytest.raises(ProblemError) as refused:
                await pool.decode("a", DecodeRequest(hostile, (8, 8), "stretch"))
            after = await pool.decode("a", DecodeRequest(PNG, (8, 8), "stretch"))
            return refused.value, pool, after
        finally:
            await pool.close()

    problem, pool, after = run(main())
    assert (problem.status, problem.code.value, problem.field) == (422, "invalid_input", "image")
    # Killed by SIGXCPU: "used over 1 s of CPU" when its exit status is known (asyncio
    # reports 255 for a child something else in this process reaped first).
    assert sum(pool.stopped.values()) == 1 and pool.stopped["cpu"] + pool.stopped["crashed"] == 1
    assert pool.started == 2  # the killed decoder was replaced
    assert after.shape == (8, 8, 3)


def test_a_decode_past_its_memory_limit_ends_its_decoder():
    """The decoder's own address-space limit, reached by a decode that its header check
    lets through (the gateway sends the same number for both: here the check's is raised)."""
    settings = pool_settings(decode_memory_bytes=64 * 2**20)
    palette = hostile_images.palette_png(4000, 4000)  # 208 MB on its way to RGB
    header = {
        "size": [8, 8],
        "resize_mode": "stretch",
        "max_pixels": 10**9,
        "allowed_formats": ["PNG"],
        "max_decode_bytes": 10**12,
        "max_jpeg_scans": 100,
        "max_frames": 100,
    }

    async def main() -> tuple[dict[str, Any], int]:
        worker = await Decoder.start(settings)
        try:
            reply, _ = await worker.run(header, palette)
            return reply, await asyncio.wait_for(worker.process.wait(), STOP_GUARD_S)
        finally:
            await worker.stop()

    reply, exit_code = run(main())
    assert reply["ok"] is False and reply["code"] == decoder.MEMORY_EXCEEDED
    assert exit_code == 0  # it exits by itself after answering: the pool starts another


def test_the_pool_answers_a_decode_over_its_memory_limit_with_422():
    settings = pool_settings(decode_memory_bytes=64 * 2**20)
    palette = hostile_images.palette_png(4000, 4000)

    async def main() -> ProblemError:
        pool = DecodePool(settings)
        try:
            with pytest.raises(ProblemError) as refused:
                await pool.decode("a", DecodeRequest(palette, (8, 8), "stretch"))
            return refused.value
        finally:
            await pool.close()

    problem = run(main())
    # Refused from its header: 16 Mpx x 13 bytes a pixel is over the 64 MiB.
    assert (problem.status, problem.code.value, problem.field) == (413, "image_too_large", "image")


def test_one_key_holds_at_most_its_decodes():
    pool_of = DecodePool(pool_settings(decode_workers=4, max_decodes_per_key=1))

    async def main() -> None:
        async with pool_of.slot("a"):
            with pytest.raises(ProblemError) as refused:
                async with pool_of.slot("a"):
                    pass
            problem = refused.value
            assert (problem.status, problem.code.value) == (429, "rate_limited")
            assert problem.headers["Retry-After"]
            # The anonymous owner (auth disabled) is not limited per key.
            async with pool_of.slot("b"), pool_of.slot(""), pool_of.slot(""):
                assert pool_of.in_progress == 4
        async with pool_of.slot("a"):  # given back
            pass

    run(main())


def test_decodes_beyond_the_decoders_wait_for_one():
    pool_of = DecodePool(pool_settings(decode_workers=1, max_decodes_per_key=1))
    entered: list[str] = []

    async def second() -> None:
        async with pool_of.slot("b"):
            entered.append("b")

    async def main() -> None:
        async with pool_of.slot("a"):
            waiting = asyncio.create_task(second())
            for _ in range(10):
                await asyncio.sleep(0)
            assert entered == []  # "b" waits, without a 429: it is its key's only decode
        await waiting
        assert entered == ["b"]

    run(main())


def test_closing_the_pool_stops_its_decoders():
    async def main() -> Decoder:
        pool = DecodePool(pool_settings())
        await pool.decode("a", DecodeRequest(PNG, (8, 8), "stretch"))
        (worker,) = pool._idle
        await pool.close()
        return worker

    worker = run(main())
    assert worker.process.returncode is not None


def test_a_decoder_inherits_none_of_the_gateways_settings(monkeypatch):
    monkeypatch.setenv("INVERSION_REDIS_URL", "redis://:secret@redis:6379/0")
    monkeypatch.setenv("PATH", "/usr/bin")
    env = decode_pool.decoder_env()
    assert not [name for name in env if name.startswith("INVERSION_")]
    assert env["PATH"] == "/usr/bin"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == decode_pool.SOURCE_ROOT
