"""Decoding (formats, EXIF, modes, limits, bad bytes) and the Ultralytics letterbox."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from imgutil import canvas, encode
from PIL import Image

from modelpod.errors import InvalidRequestError
from modelpod.vision.image import center_crop, decode, letterbox, to_tensor
from modelpod.vision.resize import resize_bilinear


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_formats_round_trip(fmt: str) -> None:
    img = np.random.default_rng(1).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode(encode(img, fmt, **kw))
    assert out.dtype == np.uint8 and out.shape == (13, 21, 3)
    assert np.array_equal(out, img)


def test_jpeg_decodes_close() -> None:
    img = canvas(40, 60, (10, 5, 30, 25), background=20, value=230)
    out = decode(encode(img, "JPEG", quality=95))
    assert out.shape == (40, 60, 3)
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 3


def test_exif_orientation_is_applied() -> None:
    img = canvas(20, 50, (0, 0, 10, 20), value=255)  # wide, bright strip on the left
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    data = encode(im, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode(data)
    assert out.shape == (50, 20, 3)  # turned upright: tall now
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the strip is now on top


def test_cmyk_palette_alpha_and_16_bit() -> None:
    rgb = canvas(8, 8, (0, 0, 4, 8), background=0, value=200)
    cmyk = decode(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=100))
    assert cmyk.shape == (8, 8, 3) and abs(int(cmyk[4, 1, 0]) - 200) < 8
    pal = decode(encode(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    assert pal.shape == (8, 8, 3) and np.array_equal(pal, rgb)
    rgba = decode(encode(Image.fromarray(np.dstack([rgb, np.full((8, 8), 7, np.uint8)])), "PNG"))
    assert np.array_equal(rgba, rgb)
    deep = np.full((6, 6), 65535, dtype=np.uint16)
    deep[:, :3] = 32896  # 128 * 257
    out = decode(encode(Image.fromarray(deep), "PNG"))
    assert out.shape == (6, 6, 3) and out[0, 0, 0] == 128 and out[0, 5, 2] == 255


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"hello, not an image at all", "not a JPEG, PNG or WebP"),
    (_png_header_only(100_000, 100_000), "decompression bomb"),
    (_png_header_only(9000, 9000), "81000000 pixels, over the limit"),
    (_png_header_only(0, 10), "0x10 has no pixels|cannot decode"),
    (_png_header_only(10, 0), "10x0 has no pixels|cannot decode"),
    (encode(canvas(64, 64, (5, 5, 40, 40)), "JPEG")[:300], "cannot decode"),
    (encode(canvas(64, 64), "PNG")[:-40], "cannot decode"),
])
def test_bad_images_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequestError, match=reason):
        decode(data)


def test_pixel_limit_is_configurable() -> None:
    data = encode(canvas(30, 30), "PNG")
    assert decode(data, max_pixels=900).shape == (30, 30, 3)
    with pytest.raises(InvalidRequestError, match="900 pixels, over the limit of 899"):
        decode(data, max_pixels=899)


def test_gif_is_not_accepted() -> None:
    buf = io.BytesIO()
    Image.fromarray(canvas(4, 4)).save(buf, format="GIF")
    with pytest.raises(InvalidRequestError, match="not a JPEG"):
        decode(buf.getvalue())


def test_resize_matches_half_pixel_bilinear() -> None:
    img = np.array([[[0] * 3, [100] * 3], [[200] * 3, [40] * 3]], dtype=np.uint8)
    out = resize_bilinear(img, 4, 4)
    # OpenCV INTER_LINEAR of this 2x2 to 4x4: corners copy, inner taps at 1/4 and 3/4.
    assert out[0, 0, 0] == 0 and out[0, 3, 0] == 100 and out[3, 0, 0] == 200 and out[3, 3, 0] == 40
    assert out[0, 1, 0] == 25 and out[1, 1, 0] == round(0.75 * 0.75 * 0 + 0.75 * 0.25 * 100 + 0.25 * 0.75 * 200
                                                          + 0.25 * 0.25 * 40)
    assert np.array_equal(resize_bilinear(np.full((7, 9, 3), 77, np.uint8), 3, 5), np.full((5, 3, 3), 77))


def _float_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """The reference: half-pixel bilinear in float64, taps clamped at the edges, rounded once."""
    def taps(size: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(new) + 0.5) * (size / new) - 0.5, 0, size - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, size - 1), pos - lo
    y0, y1, fy = taps(img.shape[0], height)
    x0, x1, fx = taps(img.shape[1], width)
    src = img.astype(np.float64)
    rows = src[y0] * (1 - fy)[:, None, None] + src[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _opencv_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's fixed-point INTER_LINEAR (resize.cpp: 11-bit weights, exact horizontal sums, the
    vertical pass as its SIMD code computes it), one output pixel at a time."""
    h, w, c = img.shape
    def tap(dst: int, size: int, new: int, clamp: bool) -> tuple[int, int, int, int]:
        f = np.float32((dst + 0.5) * (1.0 / (new / size)) - 0.5)
        s = int(np.floor(f))
        f = np.float32(f - np.float32(s))
        if clamp and (s < 0 or s >= size - 1):
            f, s = np.float32(0.0), min(max(s, 0), size - 1)
        w0 = int(np.rint((np.float32(1.0) - f) * np.float32(2048)))
        return min(max(s, 0), size - 1), min(max(s + 1, 0), size - 1), w0, int(np.rint(f * np.float32(2048)))
    out = np.empty((height, width, c), np.uint8)
    px = img.astype(np.int64)
    for dy in range(height):
        r0, r1, b0, b1 = tap(dy, h, height, False)
        for dx in range(width):
            c0, c1, a0, a1 = tap(dx, w, width, True)
            h0 = px[r0, c0] * a0 + px[r0, c1] * a1
            h1 = px[r1, c0] * a0 + px[r1, c1] * a1
            out[dy, dx] = ((((h0 >> 4) * b0) >> 16) + (((h1 >> 4) * b1) >> 16) + 2) >> 2
    return out


def _random_cases(n: int, top: int, seed: int) -> list[tuple[np.ndarray, int, int]]:
    """Random images and target sizes: shrinking, growing, mixed, exactly half, one pixel."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, top, 2))
        if i % 4 == 0:
            h, w = 2 * h, 2 * w
            nh, nw = h // 2, w // 2
        else:
            nh, nw = (int(v) for v in rng.integers(1, top + top // 2, 2))
        cases.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), nw, nh))
    return cases


def test_resize_within_one_level_of_a_float_bilinear() -> None:
    # Tolerance: 1 grey level. The fixed-point weights (11 bits) and OpenCV's truncating vertical
    # pass move a value by less than one level before rounding, so never by more than one after.
    for img, nw, nh in _random_cases(60, 120, seed=3):
        got, ref = resize_bilinear(img, nw, nh), _float_resize(img, nw, nh)
        assert got.shape == ref.shape == (nh, nw, 3)
        assert int(np.abs(got.astype(int) - ref).max()) <= 1, (img.shape, nw, nh)


def test_resize_is_opencv_fixed_point_bit_for_bit() -> None:
    for img, nw, nh in _random_cases(40, 14, seed=4):
        assert np.array_equal(resize_bilinear(img, nw, nh), _opencv_resize(img, nw, nh)), (img.shape, nw, nh)
    img = np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    half = img.astype(int).reshape(10, 2, 15, 2, 3).sum(axis=(1, 3))
    assert np.array_equal(resize_bilinear(img, 15, 10), (half + 2) >> 2)  # OpenCV's 2x area path


def test_resize_equals_opencv_where_it_is_installed() -> None:
    cv2 = pytest.importorskip("cv2")  # not a dependency; where it is, the answers are the same
    for img, nw, nh in _random_cases(80, 300, seed=6):
        assert np.array_equal(resize_bilinear(img, nw, nh), cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize(("h", "w"), [(50, 100), (100, 50), (333, 517), (640, 640), (17, 3)])
def test_letterbox_like_ultralytics(h: int, w: int) -> None:
    img = np.full((h, w, 3), 9, np.uint8)
    out, lb = letterbox(img, (64, 64))
    assert out.shape == (64, 64, 3)
    r = min(64 / h, 64 / w)
    nw, nh = round(w * r), round(h * r)
    assert lb.ratio == pytest.approx(r)
    assert lb.left == round((64 - nw) / 2 - 0.1) and lb.top == round((64 - nh) / 2 - 0.1)
    assert (out[lb.top:lb.top + nh, lb.left:lb.left + nw] == 9).all()
    assert (out == 114).sum() == 3 * (64 * 64 - nw * nh)


def test_letterbox_auto_pads_to_stride_only() -> None:
    out, lb = letterbox(np.zeros((50, 100, 3), np.uint8), (640, 640), stride=32, auto=True)
    assert out.shape == (320, 640, 3) and lb.top == 0 and lb.ratio == pytest.approx(6.4)


def test_center_crop_and_tensor() -> None:
    img = canvas(40, 80, (30, 0, 50, 40), value=255)
    crop = center_crop(img, 20)
    assert crop.shape == (20, 20, 3) and crop[:, 8:12].mean() == 255 and crop[:, :3].mean() == 0
    t = to_tensor([crop, crop])
    assert t.shape == (2, 3, 20, 20) and t.dtype == np.float32 and t.max() == 1.0
