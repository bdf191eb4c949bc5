"""Custom-code pods for tests (tests/ is on sys.path): model sources and a writer for code directories."""

from __future__ import annotations

import textwrap
from pathlib import Path

# Imports threadpoolctl at load only (never at module import): the lock must find it by running load.
LAZY_IMPORT = """
    import modelpod

    class Lazy(modelpod.Model):
        def load(self) -> None:
            import threadpoolctl  # imported at load only
            self.n = len(threadpoolctl.__name__)
            super().load()

        def predict(self, x: list[float]) -> list[float]:
            return [v + self.n for v in x]
"""


def code_dir(directory: Path, body: str) -> Path:
    """A code directory holding ``model.py`` (``body``, dedented)."""
    directory.mkdir(parents=True)
    (directory / "model.py").write_text(textwrap.dedent(body))
    return directory
