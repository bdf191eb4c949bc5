"""Batch fixtures: the LogisticRegression pod and small custom-code pods, in a session store."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpod.store import Store

NAMED = '''
from typing import Annotated

import numpy as np

from modelpod import Model
from modelpod.frameworks.python import Tensor

F32 = Annotated[np.ndarray, Tensor("FP32", (-1,))]


class Score(Model):
    """Named inputs, as table signatures give them: one column per input."""

    def predict(self, age: F32, city: list[str]) -> F32:
        return np.asarray([a * 2.0 + len(c) for a, c in zip(age.tolist(), city)], dtype=np.float32)
'''

PICKY = '''
from typing import Annotated

import numpy as np

from modelpod import Model
from modelpod.frameworks.python import Tensor

F32 = Annotated[np.ndarray, Tensor("FP32", (-1,))]


class Picky(Model):
    """Fails a whole batch when any value is negative (the batch job isolates the rows)."""

    def predict(self, x: F32) -> F32:
        if (x < 0).any():
            raise ValueError("negative values are not allowed")
        return (x + 1.0).astype(np.float32)
'''

SIZES = '''
from modelpod import Model


class Sizes(Model):
    """An image model's shape: raw file bytes in, one number per image out."""

    def predict(self, image: list[bytes]) -> list[int]:
        return [len(b) + b[:1][0] if b else 0 for b in image]
'''

LINEAR = '''
from typing import Annotated

import numpy as np

from modelpod import Model
from modelpod.frameworks.python import Tensor


class Linear(Model):
    """Workload A's shape (20 FP32 features) without a framework to import: quick to start."""

    def predict(self, x: Annotated[np.ndarray, Tensor("FP32", (-1, 20))]
                ) -> Annotated[np.ndarray, Tensor("FP64", (-1,))]:
        return x.astype(np.float64) @ np.arange(1, 21, dtype=np.float64) - 0.5
'''

MULTI = '''
from typing import Annotated, TypedDict

import numpy as np

from modelpod import Model
from modelpod.frameworks.python import Tensor


class Out(TypedDict):
    label: list[str]
    scores: Annotated[np.ndarray, Tensor("FP32", (-1, 2))]


class Multi(Model):
    """Two outputs: a text label and a [rows, 2] tensor, as a classifier's label and probabilities."""

    def predict(self, x: Annotated[np.ndarray, Tensor("FP32", (-1,))]) -> Out:
        arr = np.asarray(x, dtype=np.float32)
        return {"label": ["pos" if v > 0 else "neg" for v in arr.tolist()], "scores": np.stack([arr, -arr], axis=1)}
'''


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory, sklearn_model: tuple[Path, np.ndarray, Any]) -> Path:
    """A store with ``lr`` (20 FP32 features, alias production) and the custom pods above."""
    from modelpod.packing import pack

    path, sample, _ = sklearn_model
    root = tmp_path_factory.mktemp("batchhome")
    store = Store(root / "home")
    rec = pack(path, "lr", store, sample=sample)
    store.tag(rec.name, rec.version, "production")
    for name, code in (("named", NAMED), ("picky", PICKY), ("sizes", SIZES), ("linear", LINEAR), ("multi", MULTI)):
        d = root / name
        d.mkdir()
        (d / "model.py").write_text(textwrap.dedent(code))
        pack(d, name, store)
    return store.home


@pytest.fixture
def store(home: Path) -> Store:
    return Store(home)


@pytest.fixture(scope="session")
def estimator(sklearn_model: tuple[Path, np.ndarray, Any]) -> Any:
    return sklearn_model[2]
