"""OpenCV's ``resize(..., INTER_LINEAR)`` of uint8 images, bit for bit, in numpy integers.

Ultralytics letterboxes with OpenCV, so matching it exactly keeps boxes where ``model.predict``
puts them. OpenCV's fixed-point path: taps at half-pixel centres, weights rounded to 11 bits
(``1 - f`` and ``f`` times 2048); a horizontal pass keeps exact int32 sums; the vertical pass
works as its SIMD code does: ``((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16)``, then ``+ 2 >> 2``.
Columns past an edge take the edge pixel with weight 1; rows past an edge are clamped but keep
their weights (as OpenCV does: the rounding differs by at most one level from a float resize).
Exactly half the size in both directions is OpenCV's fast area path: ``(a + b + c + d + 2) >> 2``.
The passes run over blocks of output rows, so the int32 intermediates stay in cache.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
COEF_SCALE = 1 << COEF_BITS
BLOCK = 32  # output rows per pass


def resize_bilinear(img: Array, width: int, height: int) -> Array:
    """``img`` (``[H, W, C]`` uint8) resized to ``width`` x ``height`` as OpenCV's INTER_LINEAR."""
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    c = img.shape[2]
    if (w, h) == (2 * width, 2 * height) and c == 3:
        return _half(img)
    flat = np.ascontiguousarray(img).reshape(h, w * c)
    rows, r0, r1, b0, b1 = _rows(h, height)
    i0, i1, a0, a1 = _columns(w, width, c)
    out = np.empty((height, width * c), np.uint8)
    for start in range(0, height, BLOCK):  # a block's int32 rows stay in cache between the passes
        end = min(height, start + BLOCK)
        first, last = int(r0[start]), int(r1[end - 1]) + 1
        src = flat[rows[first:last]]  # the source rows this block reads, each once
        hz = np.multiply(np.take(src, i0, axis=1), a0, dtype=np.int32)
        hz += np.multiply(np.take(src, i1, axis=1), a1, dtype=np.int32)
        hz >>= 4
        top = np.multiply(np.take(hz, r0[start:end] - first, axis=0), b0[start:end])
        top >>= 16
        low = np.multiply(np.take(hz, r1[start:end] - first, axis=0), b1[start:end])
        low >>= 16
        top += low
        top += 2
        top >>= 2
        out[start:end] = top
    return out.reshape(height, width, c)


def _half(img: Array) -> Array:
    """2x2 means rounded half up, as Pillow's ``reduce(2)`` computes them (in C, and bit-exact)."""
    from PIL import Image

    out: Array = np.asarray(Image.fromarray(np.ascontiguousarray(img)).reduce(2))
    return out


def _taps(size: int, new: int) -> tuple[Array, Array]:
    """Each output position's first source index and its fraction, in OpenCV's float32 steps."""
    scale = 1.0 / (new / size)  # OpenCV: scale_x = 1 / inv_scale_x, inv_scale_x = dst / src
    pos = ((np.arange(new, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.intp)
    return first, pos - first.astype(np.float32)


def _weights(frac: Array) -> tuple[Array, Array]:
    scale = np.float32(COEF_SCALE)
    w0 = np.rint((np.float32(1.0) - frac) * scale).astype(np.int32)  # cvRound: half to even, as rint
    return w0, np.rint(frac * scale).astype(np.int32)


def _frozen(*arrays: Array) -> None:
    for a in arrays:
        a.setflags(write=False)


@lru_cache(maxsize=64)
def _rows(size: int, new: int) -> tuple[Array, Array, Array, Array, Array]:
    """The source rows read (sorted), each output row's two of them (as indices into those), and the
    weights as ``[new, 1]`` columns."""
    first, frac = _taps(size, new)
    b0, b1 = _weights(frac)
    lo, hi = np.clip(first, 0, size - 1), np.clip(first + 1, 0, size - 1)
    rows, where = np.unique(np.concatenate([lo, hi]), return_inverse=True)
    r0, r1 = where[:new], where[new:]
    out = (rows, r0, r1, b0[:, None], b1[:, None])
    _frozen(*out)
    return out


@lru_cache(maxsize=64)
def _columns(size: int, new: int, c: int) -> tuple[Array, Array, Array, Array]:
    """Flat (pixel * c + channel) indices of each output column's two taps, and their weights."""
    first, frac = _taps(size, new)
    edge = (first < 0) | (first >= size - 1)
    frac[edge] = 0.0  # past an edge: the edge pixel alone
    first = np.clip(first, 0, size - 1)
    a0, a1 = _weights(frac)
    chan = np.arange(c)
    i0 = (first[:, None] * c + chan).reshape(-1)
    i1 = (np.minimum(first + 1, size - 1)[:, None] * c + chan).reshape(-1)
    out = (i0, i1, np.repeat(a0, c), np.repeat(a1, c))
    _frozen(*out)
    return out
