"""What decoding uploads in decoder processes costs a submission: the pool's round trip
(pipe out, decode, pixels back) against the same decode in the calling process.

    python bench/decoding.py [--repeats 50]

Prints the median of each per image and their ratio. The images: the shipped samples
(PNG photographs, normalised to 512x512 as with a live SD 1.5 worker) and a 4000x3000
JPEG photograph-sized upload (to 512x512).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ddim_inversion import imaging  # noqa: E402
from service.decode_pool import DecodePool, DecodeRequest  # noqa: E402
from service.settings import GatewaySettings  # noqa: E402
from tests.hostile_images import encode  # noqa: E402

SIZE = (512, 512)


def images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
    return {
        "chelsea.png (451x300)": (ROOT / "samples" / "chelsea.png").read_bytes(),
        "4000x3000 JPEG": encode(Image.fromarray(noise), "JPEG", quality=90),
    }


def in_process(data: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        imaging.normalize(data, SIZE)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def pooled(data: bytes, repeats: int) -> float:
    pool = DecodePool(GatewaySettings(auth_disabled=True))
    try:
        await pool.decode("", DecodeRequest(data, SIZE, "center_crop"))  # start a decoder
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            await pool.decode("", DecodeRequest(data, SIZE, "center_crop"))
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print("| image | in process ms | decoder process ms | ratio |")
    print("|---|---|---|---|")
    for name, data in images().items():
        local = in_process(data, args.repeats)
        remote = asyncio.run(pooled(data, args.repeats))
        print(f"| {name} | {local * 1000:.1f} | {remote * 1000:.1f} | {remote / local:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
