"""Images made by the tests: encoded bytes from arrays, with EXIF, CMYK and 16-bit variants."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def canvas(height: int, width: int, box: tuple[int, int, int, int] | None = None,
           background: int = 0, value: int = 255) -> np.ndarray[Any, Any]:
    """A dark RGB image with one bright rectangle ``box`` (x1, y1, x2, y2, exclusive ends)."""
    img = np.full((height, width, 3), background, dtype=np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        img[y1:y2, x1:x2] = value
    return img


def encode(img: np.ndarray[Any, Any] | Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()
