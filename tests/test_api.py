from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import modelpod
from modelpod.errors import InvalidRequestError


def test_public_api_is_pinned() -> None:
    # Changing the public API is a decision: update this list on purpose.
    assert sorted(modelpod.__all__) == sorted([
        "Manifest", "Model", "ModelpodError", "Pod", "PodRecord", "Settings", "Signature", "Store",
        "Tensor", "TensorSpec", "__version__", "load", "open_pod", "pack",
    ])
    for name in modelpod.__all__:
        assert hasattr(modelpod, name)


def test_pack_and_load_through_the_api(tmp_path: Path, sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    path, sample, est = sklearn_model
    settings = modelpod.Settings(home=tmp_path / "home")
    rec = modelpod.pack(path, "lr", settings=settings, sample=sample)
    model = modelpod.load(f"lr:{rec.version}", settings=settings)
    out = model(sample)  # a single array for a single-input model
    np.testing.assert_array_equal(out["output-0"], est.predict(sample))  # type: ignore[attr-defined]
    # A pod directory works as a reference too (images serve /opt/modelpod/pod this way).
    pod = modelpod.open_pod("lr", settings=settings)
    again = modelpod.load(pod.path)
    np.testing.assert_array_equal(again(sample)["output-0"], out["output-0"])
    # Datatypes match the signature exactly (or widen losslessly): float64 for FP32 is refused.
    with pytest.raises(InvalidRequestError, match=r"expected datatype FP32, received FP64.*astype\('float32'\)"):
        again(sample.astype(np.float64))
