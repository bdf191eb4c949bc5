"""Detections drawn on the image they came from: a PNG, for ``annotate: true``."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

# Distinct, bright colours; class i takes PALETTE[i % len].
PALETTE = ((255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 178, 29), (207, 210, 49), (146, 204, 23),
           (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (52, 69, 147), (100, 115, 255),
           (132, 56, 255), (203, 56, 255), (255, 149, 200), (255, 55, 199))


def color(class_id: int) -> tuple[int, int, int]:
    return PALETTE[class_id % len(PALETTE)]


def annotate(img: np.ndarray[Any, Any], boxes: np.ndarray[Any, Any], ids: np.ndarray[Any, Any],
             scores: np.ndarray[Any, Any], names: Sequence[str]) -> bytes:
    """``img`` (RGB uint8) with each box outlined in its class's colour and labelled; PNG bytes."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    width = max(1, round(min(im.size) / 200))
    for box, cid, score in zip(boxes.tolist(), ids.tolist(), scores.tolist(), strict=True):
        x1, y1, x2, y2 = box
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=color(cid), width=width)
        label = f"{names[cid] if 0 <= cid < len(names) else cid} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), label)
        y = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle((x1, y, x1 + right - left + 2, y + bottom - top + 2), fill=color(cid))
        draw.text((x1 + 1, y), label, fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
