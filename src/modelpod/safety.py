"""Defences against model files that run code when loaded (pickle and friends).

Pickle-based formats are refused unless the user opts in with ``--allow-pickle``; even then every
pickle is scanned for dangerous imports and refused if any is found. The manifest records the opt-in,
and loaders honour only what the manifest records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    bad = sorted({f"{g.module}.{g.name}" for g in result.globals if g.safety == SafetyLevel.Dangerous})
    if result.issues_count or bad:
        raise UnsafeModelError(
            f"{path.name}: refused: the pickle imports {', '.join(bad) or 'dangerous globals'}, "
            "which can run arbitrary code"
        )
    if result.scan_err:
        if path.suffix == ".joblib":
            # joblib writes raw array bytes inside the pickle stream; no opcode scanner reads past
            # them, so whatever follows the first array would go unchecked.
            raise UnsafeModelError(
                f"{path.name}: joblib stores arrays inside the pickle stream, where the scanner cannot "
                "check it, so it is refused; save the model with skops.io.dump (or pickle.dump) instead"
            )
        raise UnsafeModelError(f"{path.name}: the pickle could not be scanned, so it is refused")


def check_load_allowed(path: Path, allow_pickle: bool, what: str) -> None:
    """At load time: a pickle is loaded only when the manifest records the opt-in."""
    if not allow_pickle:
        raise UnsafeModelError(
            f"{path.name}: {what} runs code when loaded and this pod did not opt in to pickle; "
            "re-pack it with --allow-pickle"
        )
    scan_pickle(path)


def looks_like_pickle(path: Path) -> bool:
    """True for a bare pickle (protocol 2+) or a zip archive holding pickles (torch.save).

    TorchScript archives hold pickles too, but torch reads them with its own restricted unpickler,
    so they do not count.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head == b"PK\x03\x04":
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return False
        tails = {n.split("/", 1)[-1] for n in names}
        torchscript = "constants.pkl" in tails and any(t.startswith("code/") for t in tails)
        return not torchscript and any(n.endswith(".pkl") for n in names)
    return False


# Keras serialises a Lambda layer's function (and any bare Python lambda) as marshalled bytecode.
_KERAS_CODE_CLASSES = frozenset({"Lambda", "__lambda__", "TFOpLambda"})


def keras_code_objects(config: Any) -> list[str]:
    """Names of the objects in a Keras config that carry Python code (Lambda layers, lambdas)."""
    found: list[str] = []
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") in _KERAS_CODE_CLASSES:
                inner = node.get("config")
                label = inner.get("name") if isinstance(inner, dict) else None
                found.append(f"{node['class_name']} {label}" if label else str(node["class_name"]))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(set(found))
