"""Decoding and normalising uploaded images: the one definition both sides use.

The gateway runs it on every upload (so that a bad image is refused before it is queued
and only a compact RGB array travels), the local CLI on files. Pillow and NumPy only.

1. Identify the format from the bytes (never the filename or Content-Type) and refuse
   what is not on the allowed list.
2. Read the declared size from the header and refuse it, before a single pixel is
   decoded, above the pixel limit, above the memory budget at the bytes per pixel its mode
   needs on the way to RGB, with too many declared frames, or (JPEG) too many scans: a
   decompression bomb never reaches memory, and a progressive JPEG whose hundreds of
   scans each revisit every block never reaches the decoder.
3. Decode the first frame; a truncated or corrupt file is refused.
4. Apply the EXIF orientation, bring any mode to RGB (alpha composited onto white,
   16-bit scaled, CMYK and palettes converted).
5. Resize to the target resolution: `center_crop` (cover, then crop the middle) or
   `stretch`.
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
"""Formats accepted by default, as Pillow names them; decided from the file's content."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest declared width x height accepted: well under Pillow's 89 M bomb threshold."""

DEFAULT_MAX_JPEG_SCANS = 100
"""Most scans (SOS segments) a JPEG may hold. Encoders write 1 (baseline) or about 10
(progressive; mozjpeg's search up to about 20); each scan revisits every block of its
components, so the decode time grows with scans x pixels."""

DEFAULT_MAX_FRAMES = 1000
"""Most frames an image may declare in its header (APNG, animated WebP)."""

DEFAULT_MAX_DECODE_BYTES = 1024 * 1024 * 1024
"""Most bytes the decode of one image may need on its way to RGB (`decode_bytes`)."""

CONVERT_ROWS = 256
"""Rows converted at a time from 16-bit or float: the wide temporaries stay this small."""

ResizeMode = Literal["center_crop", "stretch"]

REDUCING_GAP = 64.0
"""Shrinking an axis over 128 times, Pillow first box-averages it to within 64-128 times.

Lanczos weighs 6 x factor source pixels per output pixel: stretching a 1 x 40,000,000
upload to 64 x 64 would build 1.9 GB of weights and take 13 s. Below 128 times (any
photograph to 64 px up to 8192 px long, to 512 px up to 65536) nothing changes.
"""


class ImageRejected(ValueError):
    """An upload that is not an acceptable image; `code` is the contract's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def open_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: tuple[str, ...] = ALLOWED_FORMATS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> Image.Image:
    """Steps 1-3: a decoded first frame, or ImageRejected."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(allowed_formats))
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        # Pillow raises the bomb errors from the header alone; either way it is not usable.
        fmt = _sniff_format(data)
        if fmt and fmt not in allowed_formats:
            raise ImageRejected(
                "unsupported_media_type",
                f"{fmt} images are not accepted; allowed: {', '.join(allowed_formats)}",
            ) from None
        if fmt:
            raise ImageRejected(
                "image_too_large", f"the image's header declares too many pixels for {fmt}"
            ) from None
        raise ImageRejected(
            "unsupported_media_type",
            f"not a recognised image; allowed formats: {', '.join(allowed_formats)}",
        ) from None
    except Exception as exc:  # a header so broken that Pillow fails while identifying it
        raise ImageRejected("invalid_input", f"the image header is corrupt: {exc}") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected("invalid_input", "the image has no pixels")
    if width * height > max_pixels:
        raise ImageRejected(
            "image_too_large",
            f"the image declares {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels}",
        )
    check_cost(image, data, max_decode_bytes, max_jpeg_scans, max_frames)
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)  # animated images: the first frame, as documented
        image.load()
    except Exception as exc:
        raise ImageRejected("invalid_input", f"the image is truncated or corrupt: {exc}") from None
    return image


def check_cost(
    image: Image.Image, data: bytes, max_bytes: int, max_jpeg_scans: int, max_frames: int
) -> None:
    """Refuse, from the header alone, an image whose decode would cost too much."""
    needed = image.width * image.height * decode_bytes_per_pixel(image)
    if needed > max_bytes:
        raise ImageRejected(
            "image_too_large",
            f"decoding the {image.width}x{image.height} {image.mode} image would take "
            f"{needed} bytes; the limit is {max_bytes}",
        )
    if image.format in COUNTED_FRAMES and getattr(image, "n_frames", 1) > max_frames:
        raise ImageRejected(
            "invalid_input",
            f"the image declares {image.n_frames} frames; the limit is {max_frames}",
        )
    if image.format == "JPEG" and jpeg_scans(data, max_jpeg_scans) > max_jpeg_scans:
        raise ImageRejected(
            "invalid_input", f"the JPEG has more than {max_jpeg_scans} scans (the limit)"
        )


COUNTED_FRAMES = ("PNG", "WEBP")
"""Formats whose header declares the frame count (acTL, the WebP demuxer). GIF and TIFF
would need a pass over every frame to count them; only their first is decoded."""

_SAMPLE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
"""Bytes Pillow keeps per pixel of these modes; "I" and "F" take 4, every multi-band mode 4."""


def decode_bytes_per_pixel(image: Image.Image) -> int:
    """Bytes per pixel the decode and `normalize` hold at their peak, by the decoded mode.

    The decoded frame, its RGB image (4 bytes a pixel in Pillow), that image's array and
    its copy, with two bytes of margin; a transposed copy of the frame (EXIF orientation);
    the 8-bit grey of a 16-bit or float image, and as much again as the frame for its row
    bands; the RGBA and white background of the alpha path. A 5 KB palette PNG of 40 Mpx
    needs 520 MB, not 40 MB. (Peaks measured with Pillow 13 at 16 Mpx: RGB 7, grey or
    palette 12, 16-bit 12, float 12, alpha 16.)
    """
    mode = image.mode
    stored = _SAMPLE_BYTES.get(mode, 4)
    needed = stored + 4 + 2 * 3 + 2
    try:
        rotated = image.getexif().get(ORIENTATION, 1) != 1
    except Exception:  # unreadable EXIF: assume the copy
        rotated = True
    if rotated:
        needed += stored
    if mode in ("I", "F") or mode.startswith("I;16"):
        needed += stored + 1
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        needed += 2 * 4
    return needed


ORIENTATION = 0x0112
"""The EXIF tag `ImageOps.exif_transpose` follows."""

ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """The scans (SOS segments) of a JPEG, counted up to `stop_after` + 1.

    Walks the marker segments by their lengths, and each scan's entropy-coded data to the
    next marker (0xFF not followed by a stuffed 0x00, a restart marker or fill bytes), so
    that a thumbnail inside an APP segment is not counted.
    """
    scans, position, end = 0, 2, len(data)
    while position + 4 <= end and scans <= stop_after:
        if data[position] != 0xFF:
            break  # not a marker: the decoder will refuse it
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1  # fill byte
            continue
        if marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            scans += 1
            position = _entropy_end(data, position)
    return scans


def _entropy_end(data: bytes, position: int) -> int:
    """Where the entropy-coded data starting at `position` ends: its next marker."""
    while (position := data.find(b"\xff", position)) != -1 and position + 1 < len(data):
        following = data[position + 1]
        if following != 0 and not 0xD0 <= following <= 0xD7 and following != 0xFF:
            return position
        position += 1 if following == 0xFF else 2
    return len(data)


def _sniff_format(data: bytes) -> str | None:
    """Name the format of bytes Pillow refused, for a precise error; None if unknown."""
    signatures = {
        b"\x89PNG": "PNG",
        b"\xff\xd8\xff": "JPEG",
        b"GIF8": "GIF",
        b"BM": "BMP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"%PDF": "PDF",
    }
    for magic, name in signatures.items():
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = Image.open(io.BytesIO(data))
            return probe.format
    except Exception:
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Step 4: EXIF orientation applied, any mode as 8-bit RGB, alpha onto white."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = Image.fromarray(_grey8(image), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _grey8(image: Image.Image) -> np.ndarray:
    """16-bit and 32-bit integer greys scaled (65535 is white: `rint(v / 257)`), float
    greys scaled by 255 when all are within [0, 1], then clipped to 8 bits; read and
    computed CONVERT_ROWS rows at a time, so no wide copy of the whole image is made."""
    width, height = image.size
    grey = np.empty((height, width), dtype=np.uint8)
    # v / 257 is never within 0.002 of a half for an integer v: multiplying by 1 / 257
    # rounds the same.
    scale = 1 / 257.0
    if image.mode == "F":
        scale = 255.0 if image.getextrema()[1] <= 1.0 else 1.0
    for top in range(0, height, CONVERT_ROWS):
        band = image.crop((0, top, width, min(height, top + CONVERT_ROWS)))
        rows = np.asarray(band).astype(np.float64)
        np.multiply(rows, scale, out=rows)
        np.rint(rows, out=rows)
        grey[top : top + CONVERT_ROWS] = np.clip(rows, 0, 255, out=rows)
    return grey


def resize(image: Image.Image, size: tuple[int, int], mode: ResizeMode) -> Image.Image:
    """Step 5: exactly `size` = (width, height)."""
    if image.size == size:
        return image
    width, height = size
    if mode == "stretch":
        return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    if mode != "center_crop":
        raise ValueError(f"resize_mode {mode!r} is not one of center_crop, stretch")
    # The centred source region of the target's aspect ratio, resampled straight to `size`:
    # scaling the whole image first would allocate e.g. 64 x 64,000,000 pixels (12 GB) for a
    # 1 x 1,000,000 upload before cropping.
    scale = max(width / image.width, height / image.height)
    box_width, box_height = width / scale, height / scale
    left, top = (image.width - box_width) / 2, (image.height - box_height) / 2
    box = (left, top, left + box_width, top + box_height)
    return image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def normalize(
    data: bytes | Image.Image,
    size: tuple[int, int] | None,
    resize_mode: ResizeMode = "center_crop",
    **limits: Any,
) -> np.ndarray:
    """Steps 1-5: the (height, width, 3) uint8 array the engine inverts (size None: the
    image's own); `limits` are `open_image`'s keyword arguments."""
    image = data if isinstance(data, Image.Image) else open_image(data, **limits)
    rgb = to_rgb(image)
    del image  # the decoded frame is no longer needed: its bytes count in the budget
    if size is not None:
        rgb = resize(rgb, size, resize_mode)
    return np.asarray(rgb, dtype=np.uint8).copy()
