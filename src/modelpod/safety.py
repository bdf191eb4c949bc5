"""Defences against model files that run code when loaded (pickle and friends).

Pickle-based formats are refused unless the user opts in with ``--allow-pickle``; even then every
pickle is scanned for dangerous imports and refused if any is found. The manifest records the opt-in,
and loaders honour only what the manifest records.
"""

from __future__ import annotations

from pathlib import Path

from modelpod.errors import MissingExtraError, UnsafeModelError

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".bin", ".ckpt", ".dill")
OPT_IN = "pass --allow-pickle to accept it (the file is still scanned for dangerous imports)"


def refuse_pickle(path: Path, what: str) -> UnsafeModelError:
    return UnsafeModelError(
        f"{path.name}: {what} runs code when it is loaded, so modelpod refuses it by default; {OPT_IN}, "
        "or save the model in a safe format instead"
    )


def scan_pickle(path: Path) -> None:
    """Scan a pickle (or a zip/torch archive holding pickles) and refuse dangerous imports."""
    try:
        from picklescan.scanner import SafetyLevel, scan_file_path
    except ImportError:
        raise MissingExtraError("pickle", "picklescan", "scanning pickled models") from None
    result = scan_file_path(str(path))
    if result.scan_err:
        raise UnsafeModelError(f"{path.name}: the pickle could not be scanned, so it is refused")
    bad = sorted({f"{g.module}.{g.name}" for g in result.globals if g.safety == SafetyLevel.Dangerous})
    if result.issues_count or bad:
        raise UnsafeModelError(
            f"{path.name}: refused: the pickle imports {', '.join(bad) or 'dangerous globals'}, "
            "which can run arbitrary code"
        )


def check_load_allowed(path: Path, allow_pickle: bool, what: str) -> None:
    """At load time: a pickle is loaded only when the manifest records the opt-in."""
    if not allow_pickle:
        raise UnsafeModelError(
            f"{path.name}: {what} runs code when loaded and this pod did not opt in to pickle; "
            "re-pack it with --allow-pickle"
        )
    scan_pickle(path)
