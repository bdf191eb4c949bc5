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
from modelpod.vision.image import center_crop, decode, letterbox, resize_bilinear, to_tensor


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
