"""Vision: image decoding, letterboxing, box decoding and NMS for detector and classifier pods.

The ONNX adapter uses this room when a pod's task is ``detect`` or ``classify`` (see docs/vision.md):
``images`` (encoded JPEG/PNG/WebP bytes) in, boxes in original pixel coordinates out.
"""

from __future__ import annotations

TASKS = ("detect", "classify")
