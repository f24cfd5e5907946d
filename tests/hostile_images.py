"""Small files that are expensive to decode, built in memory (tests and bench/abuse.py).

Each is a few KB to a few hundred KB and takes well under a second to build.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SOS = 0xDA


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment after SOI; a scan's end includes its
    entropy-coded data. Only for the well-formed files Pillow writes."""
    segments, position = [], 2
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:  # EOI
            segments.append((marker, position, position + 2))
            break
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == SOS:  # to the next 0xFF that is neither stuffed (0xFF00) nor a restart
            end = data.index(b"\xff", end)
            while data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end = data.index(b"\xff", end + 2)
        segments.append((marker, position, end))
        position = end
    return segments


def many_scans_jpeg(side: int, extra_scans: int) -> bytes:
    """A progressive grey JPEG of side x side whose first AC scan is repeated
    `extra_scans` times: each copy is a few bytes (one run of empty blocks) and costs the
    decoder a pass over every block. libjpeg warns of the repeated scans and decodes on."""
    data = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)
    segments = jpeg_segments(data)
    scans = [segment for segment in segments if segment[0] == SOS]
    _, start, end = scans[1]  # the first AC scan (the first is DC)
    eoi = segments[-1][1]
    return data[:eoi] + data[start:end] * extra_scans + data[eoi:]


def palette_png(width: int, height: int) -> bytes:
    """A one-colour palette PNG: a few KB for tens of megapixels, 13 bytes per pixel on
    its way to RGB."""
    return encode(Image.new("P", (width, height), 7), "PNG")


def sixteen_bit_png(width: int, height: int) -> tuple[bytes, np.ndarray]:
    """A 16-bit grey PNG holding a ramp over every 16-bit value, and its pixels."""
    values = np.arange(width * height, dtype=np.uint64) * 65535 // max(1, width * height - 1)
    pixels = values.astype(np.uint16).reshape(height, width)
    return encode(Image.fromarray(pixels), "PNG"), pixels


def float_tiff(width: int, height: int) -> tuple[bytes, np.ndarray]:
    """A 32-bit float grey TIFF with values in [0, 1], and its pixels."""
    pixels = np.linspace(0.0, 1.0, width * height, dtype=np.float32).reshape(height, width)
    return encode(Image.fromarray(pixels, mode="F"), "TIFF"), pixels
