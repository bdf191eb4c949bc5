"""``modelpod predict REF --image FILE [--annotate OUT.png]``: a vision pod on image files, in-process."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import UsageError
from modelpod.model import Model, with_parameters


def predict_images(model: Model, images: Sequence[str], annotate: str | None,
                   parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the pod on image files; the detections (or top-k classes) per image, as plain data.
    ``annotate``: write the drawn image there (``OUT-1.png``, ``OUT-2.png``, ... for several)."""
    from modelpod.serving.worker import ModelWorker

    task = model.signature.parameters.get("task")
    if task not in ("detect", "classify"):
        raise UsageError(f"model {model.name!r} is not a detector or classifier (packed without --task)")
    if annotate and task != "detect":
        raise UsageError("--annotate draws boxes: only for a detector")
    data = np.empty(len(images), dtype=object)
    for i, name in enumerate(images):
        try:
            data[i] = Path(name).read_bytes()
        except OSError as exc:
            raise UsageError(f"--image {name}: cannot read it: {exc.strerror or exc}") from None
    params = {**(parameters or {}), **({"annotate": True} if annotate else {})}
    out = ModelWorker(model, model.name).call(with_parameters(model.coerce({"images": data}), params))
    if task == "classify":
        return {"model": model.name, "images": [
            {"image": name, "classes": [{"class_id": int(c), "class_name": n.decode(), "probability": float(p)}
                                        for c, n, p in zip(out["class_ids"][i], out["class_names"][i],
                                                           out["probabilities"][i], strict=True)]}
            for i, name in enumerate(images)]}
    rows: list[dict[str, Any]] = []
    start = 0
    for i, (name, n) in enumerate(zip(images, out["detections"].tolist(), strict=True)):
        dets = [{"box": [round(float(v), 2) for v in out["boxes"][j]], "score": round(float(out["scores"][j]), 4),
                 "class_id": int(out["class_ids"][j]), "class_name": out["class_names"][j].decode()}
                for j in range(start, start + n)]
        start += n
        row: dict[str, Any] = {"image": name, "detections": dets}
        if annotate:
            target = Path(annotate)
            if len(images) > 1:
                target = target.with_name(f"{target.stem}-{i + 1}{target.suffix or '.png'}")
            target.write_bytes(base64.b64decode(out["annotated"][i]))
            row["annotated"] = str(target)
        rows.append(row)
    return {"model": model.name, "images": rows}
