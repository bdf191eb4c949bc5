"""Image bytes -> RGB uint8 arrays (Pillow), and the Ultralytics letterbox in numpy (its resize:
``vision/resize.py``, OpenCV's INTER_LINEAR bit for bit)."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelpod.errors import InvalidRequestError
from modelpod.vision.resize import resize_bilinear

FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000  # about 8000 x 5000: far above any detector's input, far below a bomb
PAD = 114  # Ultralytics' grey

Array = np.ndarray[Any, Any]


def unwrap(data: bytes) -> bytes:
    """Raw image bytes from a BYTES element: raw already (the binary extension), or base64 text
    (OIP JSON carries strings), optionally as a ``data:image/...;base64,`` URL."""
    if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data
    text = data.strip()
    if text[:5] == b"data:":
        text = text.partition(b",")[2]
    try:
        return base64.b64decode(text, validate=True) if text else data
    except (binascii.Error, ValueError):
        return data


def sample_png(width: int = 32, height: int = 24) -> bytes:
    """A small grey RGB PNG, written without Pillow: the sample a vision pod's load check predicts."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = (b"\0" + bytes([PAD]) * (3 * width)) * height  # filter byte 0, then the row's pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> Array:
    """An encoded JPEG, PNG or WebP file as an ``[H, W, 3]`` RGB uint8 array, EXIF orientation applied.

    The size is read from the header and checked against ``max_pixels`` before any pixel is decoded.
    Anything that is not a whole image of a known format raises InvalidRequestError (400).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InvalidRequestError(f"{what}: empty, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = im.size
            if width * height == 0:
                raise InvalidRequestError(f"{what}: {width}x{height} has no pixels")
            if width * height > max_pixels:
                raise InvalidRequestError(
                    f"{what}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}")
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: turn it upright (else no copy)
                return _rgb(ImageOps.exif_transpose(im))
            return _rgb(im)
    except InvalidRequestError:
        raise
    except UnidentifiedImageError:
        raise InvalidRequestError(f"{what}: {_unreadable(data)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(f"{what}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidRequestError(f"{what}: cannot decode it: {exc}") from None


def _unreadable(data: bytes) -> str:
    """Why Pillow could not open ``data``: no pixels, a damaged header of a known format, or no image."""
    kind = "JPEG" if data[:3] == b"\xff\xd8\xff" else "PNG" if data[:8] == b"\x89PNG\r\n\x1a\n" else (
        "WebP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "")
    if kind == "PNG" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if width * height == 0:
            return f"{width}x{height} has no pixels"
    if kind:
        return f"cannot decode it: the {kind} header is damaged"
    return "not a JPEG, PNG or WebP image"


def _rgb(im: Any) -> Array:
    """Any Pillow mode as RGB uint8: 16-bit greys scaled (not clipped), CMYK and palettes converted,
    alpha dropped (as OpenCV's imread does)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode == "F":
        grey = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode != "RGB":
        im = im.convert("RGB")
    out: Array = np.asarray(im, dtype=np.uint8)
    return out


@dataclass(frozen=True)
class Letterbox:
    """Where an image went in the model's input: scale ``ratio``, then ``left``/``top`` padding."""

    ratio: float
    left: int
    top: int
    width: int  # the original image's size
    height: int


def letterbox(img: Array, size: tuple[int, int], stride: int = 32, auto: bool = False,
              scaleup: bool = True) -> tuple[Array, Letterbox]:
    """Ultralytics' LetterBox: scale to fit ``size`` (h, w) keeping the aspect ratio, pad with grey
    114 centred. ``auto``: pad only to a multiple of ``stride`` (a model with free height/width)."""
    h, w = img.shape[:2]
    r = min(size[0] / h, size[1] / w)
    if not scaleup:
        r = min(r, 1.0)
    new_w, new_h = int(round(w * r)), int(round(h * r))
    dw, dh = float(size[1] - new_w), float(size[0] - new_h)
    if auto:
        dw, dh = float(np.mod(dw, stride)), float(np.mod(dh, stride))
    dw, dh = dw / 2, dh / 2
    resized = resize_bilinear(img, new_w, new_h)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    out = np.full((new_h + top + bottom, new_w + left + right, 3), PAD, dtype=np.uint8)
    out[top:top + new_h, left:left + new_w] = resized
    return out, Letterbox(r, left, top, w, h)


def center_crop(img: Array, size: int) -> Array:
    """Classification preprocessing: shortest side to ``size`` (bilinear), then the centre square."""
    h, w = img.shape[:2]
    r = size / min(h, w)
    new_w, new_h = max(size, int(round(w * r))), max(size, int(round(h * r)))
    resized = resize_bilinear(img, new_w, new_h)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def to_tensor(images: list[Array]) -> Array:
    """HWC uint8 RGB images of one size -> an NCHW float32 batch in [0, 1]."""
    h, w = images[0].shape[:2]
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = img.transpose(2, 0, 1)  # the cast to float happens in this one copy
    out /= np.float32(255.0)
    return out
