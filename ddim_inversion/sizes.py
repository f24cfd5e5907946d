"""The pairs of whole numbers a parameter may be: a resolution (width, height) and SDXL's
size conditioning (height, width; a crop's top, left), parsed from the text or lists the
surfaces carry."""

from __future__ import annotations

from typing import Any

from ddim_inversion.errors import InvalidParameter


def parse_resolution(value: str | int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """`512` -> (512, 512); `768x512` -> (768, 512) as (width, height); multiples of 64 only."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InvalidParameter("resolution", "must be two sizes, width and height")
        width, height = value
    elif isinstance(value, int) and not isinstance(value, bool):
        width = height = value
    elif isinstance(value, str):
        parts = value.lower().strip().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise InvalidParameter("resolution", f"{value!r} is not N or WxH, e.g. 512 or 768x512")
        width = int(parts[0])
        height = int(parts[-1])
    else:
        raise InvalidParameter("resolution", "must be N or WxH, e.g. 512 or 768x512")
    for size in (width, height):
        if isinstance(size, bool) or not isinstance(size, int) or size < 64 or size % 64:
            raise InvalidParameter(
                "resolution", f"{size} is not a multiple of 64 of at least 64 (e.g. 512 or 768x512)"
            )
    return int(width), int(height)


SDXL_PARAMETERS = (
    "prompt_2",
    "negative_prompt_2",
    "original_size",
    "crops_coords_top_left",
    "target_size",
)
"""The parameters of SDXL's second text encoder and size conditioning: refused for other
models, which have neither."""

MAX_SIZE_CONDITIONING = 16384
"""The largest value of an SDXL size conditioning pair (a size in pixels)."""


def parse_pair(value: Any, name: str, *, allow_zero: bool = False) -> tuple[int, int]:
    """`1024,768` or [1024, 768] -> (1024, 768): two whole numbers, in the SDXL pipeline's
    order ((height, width) for sizes, (top, left) for a crop)."""
    if isinstance(value, str):
        parts = value.replace("x", ",").split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InvalidParameter(name, f"{value!r} is not two whole numbers, e.g. 1024,1024")
        value = [int(p) for p in parts]
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidParameter(name, "must be two whole numbers, e.g. 1024,1024")
    low = 0 if allow_zero else 1
    for item in value:
        if (
            isinstance(item, bool)
            or not isinstance(item, int)
            or not low <= item <= MAX_SIZE_CONDITIONING
        ):
            raise InvalidParameter(
                name, f"{item!r} is not a whole number from {low} to {MAX_SIZE_CONDITIONING}"
            )
    return int(value[0]), int(value[1])
