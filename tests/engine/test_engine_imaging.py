"""Image normalisation: orientation, modes, resizing, resolutions, animated files."""

from __future__ import annotations

import io
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddim_inversion import imaging
from ddim_inversion.errors import InvalidParameter
from ddim_inversion.params import InversionParams, parse_resolution
from tests import hostile_images
from tests.conftest import EVENT_GUARD_S
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest

REPO = Path(__file__).resolve().parents[2]


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    return Image.fromarray(array.astype(np.uint8), "RGB")


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = _encode(_gradient(48, 32), "JPEG", exif=exif, quality=95)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert stored.shape == (32, 48, 3)
    upright = np.rot90(stored, k=-1)  # clockwise
    assert upright.shape == (48, 32, 3)

    assert imaging.to_rgb(imaging.open_image(data)).size == (32, 48)
    assert np.array_equal(imaging.normalize(data, (32, 48)), upright)
    expected = imaging.normalize(Image.fromarray(np.ascontiguousarray(upright)), (64, 128))
    assert np.array_equal(imaging.normalize(data, (64, 128)), expected)


def test_grey_l():
    data = _encode(Image.new("L", (8, 8), 100), "PNG")
    assert (imaging.normalize(data, (8, 8)) == 100).all()


def test_rgba_alpha_onto_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    image.putpixel((0, 0), (10, 20, 30, 0))
    image.putpixel((1, 0), (0, 0, 0, 128))
    out = imaging.normalize(_encode(image, "PNG"), (4, 4))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [10, 20, 30]
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 1])


def test_palette_with_transparency():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 50, 10] + [0] * 762)
    image.putpixel((0, 0), 0)
    data = _encode(image, "PNG", transparency=0)
    out = imaging.normalize(data, (4, 4))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[2, 2].tolist() == [200, 50, 10]


def test_cmyk():
    image = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    image.putpixel((1, 1), (0, 255, 255, 0))
    out = imaging.normalize(_encode(image, "TIFF"), (4, 4))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [255, 0, 0]


def test_sixteen_bit_is_scaled():
    array = np.array([[65535, 0], [257 * 100, 257 * 200]], dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    out = imaging.normalize(_encode(image, "PNG"), (2, 2))
    assert out[..., 0].tolist() == [[255, 0], [100, 200]]
    assert (out[..., 0] == out[..., 2]).all()


def test_grey_with_alpha():
    image = Image.new("LA", (2, 1), (50, 255))
    image.putpixel((1, 0), (50, 0))
    out = imaging.normalize(_encode(image, "PNG"), (2, 1))
    assert out[0, 0].tolist() == [50, 50, 50]
    assert out[0, 1].tolist() == [255, 255, 255]


def _bands() -> Image.Image:
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, :100] = (255, 0, 0)
    array[:, 100:200] = (0, 255, 0)
    array[:, 200:] = (0, 0, 255)
    return Image.fromarray(array)


def test_center_crop_keeps_the_middle():
    out = imaging.normalize(_bands(), (64, 64), "center_crop")
    assert out.shape == (64, 64, 3)
    # The middle third of the width, scaled to 64 high, is all that remains: green.
    assert (out[:, 2:-2, 1] > 200).all() and (out[:, 2:-2, 0] < 50).all()


def test_stretch_keeps_everything():
    out = imaging.normalize(_bands(), (64, 64), "stretch")
    assert out.shape == (64, 64, 3)
    assert out[32, 2, 0] > 200 and out[32, 32, 1] > 200 and out[32, 61, 2] > 200
    wide = imaging.normalize(_bands(), (128, 64), "stretch")
    assert wide.shape == (64, 128, 3)


@pytest.mark.parametrize("value", [100, "100", "64x100", "0", "abc", "64x64x64", 32, (64,)])
def test_bad_resolutions(value):
    with pytest.raises(InvalidParameter) as info:
        parse_resolution(value)
    assert info.value.field == "resolution"


def test_good_resolutions():
    assert parse_resolution(512) == (512, 512)
    assert parse_resolution("128x64") == (128, 64)
    assert parse_resolution([64, 192]) == (64, 192)
    with pytest.raises(ValueError, match="resolution"):
        InversionParams(prompt="x", resolution=100)


def test_non_square_resolution(tiny, sample_arrays):
    params = InversionParams(prompt="a cat", num_inference_steps=4, resolution="128x64")
    (result,) = invert(tiny, [InversionRequest(sample_arrays["chelsea"], params)])
    assert result.latents.shape == (1, 4, 8, 16)
    assert (result.metadata.width, result.metadata.height) == (128, 64)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = imaging.normalize(data, (8, 8))
    assert (out[..., 0] > 240).all() and (out[..., 2] < 16).all()


def test_extreme_aspect_ratios_at_the_pixel_limit_resize_in_bounded_memory():
    """A 1 x 40,000,000 upload is within the default pixel limit. Scaling all of it to cover
    64x64 before cropping would take 500 GB; stretching it with plain Lanczos, 1.9 GB of
    weights and 13 s. Run under a 3 GB address-space cap, in a subprocess (the cap is per
    process): a regression fails with MemoryError instead of exhausting the machine."""
    code = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import numpy as np
from PIL import Image
from ddim_inversion import imaging
bands = np.zeros((40_000_000, 1, 3), dtype=np.uint8)
bands[:16_000_000] = (255, 0, 0)
bands[16_000_000:24_000_000] = (0, 255, 0)
bands[24_000_000:] = (0, 0, 255)
image = Image.fromarray(bands)
del bands
crop = imaging.normalize(image, (64, 64), "center_crop")
assert (crop == (0, 255, 0)).all(), crop[0, 0]  # only the middle remains
stretched = imaging.normalize(image, (64, 64), "stretch")
# Rows 0-25.6 red, 25.6-38.4 green, the rest blue; away from the edges, pure colours.
assert (stretched[:22] == (255, 0, 0)).all(), stretched[:, 0]
assert (stretched[29:35] == (0, 255, 0)).all(), stretched[:, 0]
assert (stretched[42:] == (0, 0, 255)).all(), stretched[:, 0]
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=EVENT_GUARD_S,
    )
    assert done.returncode == 0, done.stderr


# -- what an image costs, judged from its header (issue 21: hostile uploads) ---------------


def test_a_jpeg_with_hundreds_of_scans_is_refused_before_decoding():
    data = hostile_images.many_scans_jpeg(512, 300)
    # Pillow's progressive grey JPEG has 6 scans; the first AC scan is repeated 300 times.
    assert imaging.jpeg_scans(data, 10_000) == 306
    assert imaging.jpeg_scans(data, 100) == 101  # counting stops past the limit
    with pytest.raises(imaging.ImageRejected) as refused:
        imaging.open_image(data, max_jpeg_scans=100)
    assert refused.value.code == "invalid_input"
    assert "100 scans" in refused.value.message
    # Under a limit it respects, the same file decodes (libjpeg only warns of the repeats).
    assert imaging.normalize(data, (8, 8), max_jpeg_scans=306).shape == (8, 8, 3)


def test_scans_inside_a_segment_are_not_counted():
    """A JPEG carried in a comment segment (as an EXIF thumbnail is in APP1) is skipped
    with its segment: only the outer file's one baseline scan counts."""
    inner = hostile_images.many_scans_jpeg(16, 20)
    outer = _encode(Image.new("RGB", (16, 16), (10, 200, 30)), "JPEG")
    comment = b"\xff\xfe" + (len(inner) + 2).to_bytes(2, "big") + inner
    data = outer[:2] + comment + outer[2:]
    assert imaging.jpeg_scans(data, 100) == 1
    assert imaging.normalize(data, (16, 16)).shape == (16, 16, 3)


def test_a_palette_png_of_huge_dimensions_is_refused_by_its_decode_bytes():
    data = hostile_images.palette_png(4000, 4000)
    assert len(data) < 16_000  # a few KB that would take 16 Mpx x 13 bytes = 208 MB
    image = Image.open(io.BytesIO(data))
    # 1 byte a pixel decoded, 4 of RGB, 3 + 3 of its array and copy, 2 of margin.
    assert imaging.decode_bytes_per_pixel(image) == 13
    with pytest.raises(imaging.ImageRejected) as refused:
        imaging.open_image(data, max_decode_bytes=100 * 2**20)
    assert refused.value.code == "image_too_large"
    assert "208000000 bytes" in refused.value.message


@pytest.mark.parametrize(
    ("mode", "extra"),
    [("RGB", 0), ("P", 0), ("I;16", 2 + 1), ("F", 4 + 1), ("RGBA", 8), ("LA", 8)],
)
def test_decode_bytes_grow_with_the_modes_path_to_rgb(mode, extra):
    """Each mode's stored bytes, plus its RGB image (4) and that image's array and copy
    (6) and 2 of margin; 16-bit and float add their array and 8-bit grey, alpha its RGBA
    and white background."""
    stored = {"RGB": 4, "P": 1, "I;16": 2, "F": 4, "RGBA": 4, "LA": 4}[mode]
    image = Image.new(mode, (4, 4))
    assert imaging.decode_bytes_per_pixel(image) == stored + 12 + extra


def test_an_animated_png_declaring_too_many_frames_is_refused():
    frames = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(5)]
    data = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert imaging.normalize(data, (4, 4), max_frames=5).shape == (4, 4, 3)
    with pytest.raises(imaging.ImageRejected) as refused:
        imaging.open_image(data, max_frames=4)
    assert refused.value.code == "invalid_input"


def _numpy_peak_bytes(run) -> int:
    """The peak of the bytes NumPy and Python allocated while `run` ran (tracemalloc sees
    NumPy's buffers; Pillow's own are outside it)."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_sixteen_bit_greys_convert_exactly_without_a_float64_copy():
    width, height = 512, 4096
    data, pixels = hostile_images.sixteen_bit_png(width, height)
    image = imaging.open_image(data)
    assert image.mode == "I;16"
    expected = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)  # the reference
    out = {}
    peak = _numpy_peak_bytes(lambda: out.setdefault("rgb", imaging.to_rgb(image)))
    assert np.array_equal(np.asarray(out["rgb"])[..., 0], expected)
    # A float64 copy of the image alone would be 8 bytes a pixel; the conversion holds
    # the 2-byte array, its bytes while read, the 1-byte grey and CONVERT_ROWS rows.
    assert peak < 8 * width * height


def test_float_greys_convert_exactly_without_a_float64_copy():
    width, height = 512, 4096
    data, pixels = hostile_images.float_tiff(width, height)
    image = imaging.open_image(data)
    assert image.mode == "F"
    expected = np.clip(np.rint(pixels.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    out = {}
    peak = _numpy_peak_bytes(lambda: out.setdefault("rgb", imaging.to_rgb(image)))
    assert np.array_equal(np.asarray(out["rgb"])[..., 0], expected)
    assert peak < 8 * width * height  # less than one float64 copy (see the 16-bit test)
