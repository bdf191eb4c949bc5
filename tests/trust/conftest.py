"""Keys, certificates and a signed-pod store for the trust tests, all made here."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from modelpod.store import PodRecord, Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trustkit import Keys


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture(scope="module")
def template_home(tmp_path_factory: pytest.TempPathFactory, sklearn_model: tuple[Path, np.ndarray, object]
                  ) -> tuple[Path, PodRecord]:
    """A store holding the LogisticRegression as ``lr`` (packed once per module; copy it to change it)."""
    from modelpod.packing import pack

    path, sample, _ = sklearn_model
    home = tmp_path_factory.mktemp("trusthome")
    rec = pack(path, "lr", Store(home), sample=sample)
    return home, rec


@pytest.fixture
def home(tmp_path: Path, template_home: tuple[Path, PodRecord]) -> Path:
    """A private copy of the template store."""
    dest = tmp_path / "home"
    shutil.copytree(template_home[0], dest, symlinks=True)
    return dest
