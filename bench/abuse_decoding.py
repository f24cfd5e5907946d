"""The image-decoding attacks of `bench/abuse.py` (issue 21, point 2): small files that
take long or much memory to decode, sent by key A while key B submits.

Each returns (key A's answers, what came of it), like the attacks of bench/abuse_attacks.py;
the outcome includes key B's submit latency p50 during the attack, from B's own submits
(a 64 px PNG, one at a time, for as long as the attack lasts).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
from PIL import Image

from bench.abuse_stack import KEY_A, KEY_B, PARKED_DECODES, PNG, codes, delete
from tests import hostile_images

if TYPE_CHECKING:
    from bench.abuse_attacks import Ctx

HOSTILE_JPEG_SCANS = 300
"""Extra scans of the 6000x6000 JPEG (159 KB): 0.8 s of decoding each without bounds."""


def _post(base: str, key: str, image: bytes, **fields: str) -> httpx.Response:
    data = {"prompt": "a cat", "num_inference_steps": "3", "resolution": "64", **fields}
    return httpx.post(
        base + "/v1/inversions",
        data=data,
        files={"image": ("image", image)},
        headers={"X-API-Key": key},
        timeout=300,
    )


IDLE_SUBMITS = 10
"""Key B's submits before each attack: its reference latency."""


class BSubmits(threading.Thread):
    """Key B submits its small PNG, one at a time, until stopped or after `most` submits:
    the latencies."""

    def __init__(self, base: str, most: int) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.most = most
        self.latencies_ms: list[float] = []
        self.answers: list[int] = []
        self.jobs: list[str] = []
        self.running = True

    def run(self) -> None:
        while self.running and len(self.answers) < self.most:
            started = time.perf_counter()
            try:
                answer = _post(self.base, KEY_B, PNG)
            except httpx.HTTPError:
                self.answers.append(0)
                continue
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
            self.answers.append(answer.status_code)
            if answer.status_code == 202:
                self.jobs.append(answer.json()["id"])
            time.sleep(0.05)

    def finish(self) -> float | None:
        """B's submit latency p50 in ms; its jobs deleted."""
        self.running = False
        self.join(60)
        for job in self.jobs:
            delete(self.base, KEY_B, job)
        return statistics.median(self.latencies_ms) if self.latencies_ms else None


def _idle_p50(base: str, count: int) -> float | None:
    """B's submit latency p50 in ms with nothing else going on: the reference."""
    idle = BSubmits(base, count)
    idle.start()
    idle.join(120)
    return idle.finish()


def _attack(ctx: Ctx, base: str, send: Callable[[], list[httpx.Response]]) -> tuple[str, str]:
    """Run `send` while B submits to `base`; A's answers, the codes of A's refusals and
    B's submit latency p50 against idle."""
    assert ctx.b is not None
    ctx.b.start()
    idle_ms = _idle_p50(base, IDLE_SUBMITS)
    b_submits = BSubmits(base, most=10_000)
    b_submits.start()
    try:
        answers = send()
    finally:
        attack_ms = b_submits.finish()
    if attack_ms is None or idle_ms is None:
        b_outcome = f"B's submits {codes(b_submits.answers)}"
    else:
        b_outcome = f"B's submits {codes(b_submits.answers)}, p50 {attack_ms:.0f} ms "
        b_outcome += f"vs {idle_ms:.0f} ms idle ({attack_ms / idle_ms:.1f}x)"
    refusals = sorted({a.json().get("code", "?") for a in answers if a.status_code >= 400})
    for answer in answers:
        if answer.status_code == 202:
            delete(base, KEY_A, answer.json()["id"])
    why = f"A refused: {', '.join(refusals)}; " if refusals else ""
    return codes(a.status_code for a in answers), why + b_outcome


def _at_once(base: str, image: bytes, count: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: _post(base, KEY_A, image), range(count)))


def many_scan_jpegs(ctx: Ctx) -> tuple[str, str]:
    """40 progressive JPEGs of hundreds of scans at once (main gateway)."""
    hostile = hostile_images.many_scans_jpeg(6000, HOSTILE_JPEG_SCANS)
    return _attack(ctx, ctx.stack.main, lambda: _at_once(ctx.stack.main, hostile, 40))


def scans_past_the_cpu_limit(ctx: Ctx) -> tuple[str, str]:
    """JPEGs whose scans pass the decode's CPU limit, one after another (the parked
    gateway lets any number of scans through to its 1 s limit; B submits there too)."""
    hostile = hostile_images.many_scans_jpeg(3000, 40_000)
    parked = ctx.stack.parked
    limit = PARKED_DECODES["decode_cpu_s"]
    answers, outcome = _attack(
        ctx, parked, lambda: [_post(parked, KEY_A, hostile) for _ in range(3)]
    )
    return answers, f"{limit} s of CPU each; " + outcome


def palette_pngs(ctx: Ctx) -> tuple[str, str]:
    """10 palette PNGs of 40 Mpx (15 KB each) at once (main gateway)."""
    palette = hostile_images.palette_png(6324, 6324)
    return _attack(ctx, ctx.stack.main, lambda: _at_once(ctx.stack.main, palette, 10))


def deep_greys(ctx: Ctx) -> tuple[str, str]:
    """A 16-bit PNG and a float TIFF of 36 Mpx (230 KB each), 5 of each at once."""
    grey16 = hostile_images.encode(Image.new("I;16", (6000, 6000), 40000), "PNG")
    grey_f = hostile_images.encode(
        Image.new("F", (6000, 6000), 0.5), "TIFF", compression="tiff_adobe_deflate"
    )

    def send() -> list[httpx.Response]:
        return _at_once(ctx.stack.main, grey16, 5) + _at_once(ctx.stack.main, grey_f, 5)

    return _attack(ctx, ctx.stack.main, send)
