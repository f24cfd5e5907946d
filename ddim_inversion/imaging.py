"""Decoding and normalising uploaded images: the one definition both sides use.

The gateway runs it on every upload (so that a bad image is refused before it is queued
and only a compact RGB array travels), the local CLI on files. Pillow and NumPy only.

1. Identify the format from the bytes (never the filename or Content-Type) and refuse
   what is not on the allowed list.
2. Read the declared size from the header and refuse it above the pixel limit before a
   single pixel is decoded: a decompression bomb never reaches memory.
3. Decode the first frame; a truncated or corrupt file is refused.
4. Apply the EXIF orientation, bring any mode to RGB (alpha composited onto white,
   16-bit scaled, CMYK and palettes converted).
5. Resize to the target resolution: `center_crop` (cover, then crop the middle) or
   `stretch`.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
"""Formats accepted by default, as Pillow names them; decided from the file's content."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest declared width x height accepted: well under Pillow's 89 M bomb threshold."""

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
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)  # animated images: the first frame, as documented
        image.load()
    except Exception as exc:
        raise ImageRejected("invalid_input", f"the image is truncated or corrupt: {exc}") from None
    return image


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
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit greys are scaled, not clipped: 65535 is white.
        array = np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    elif mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


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
    size: tuple[int, int],
    resize_mode: ResizeMode = "center_crop",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: tuple[str, ...] = ALLOWED_FORMATS,
) -> np.ndarray:
    """Steps 1-5: the (height, width, 3) uint8 array the engine inverts."""
    image = (
        data
        if isinstance(data, Image.Image)
        else open_image(data, max_pixels=max_pixels, allowed_formats=allowed_formats)
    )
    rgb = resize(to_rgb(image), size, resize_mode)
    return np.asarray(rgb, dtype=np.uint8).copy()
