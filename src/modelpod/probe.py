"""The probe: load a pod and predict its sample in a fresh interpreter, and say what that took.

``pack`` runs it on a site directory of links to only the distributions of the lock so far
(any other installed distribution is absent, as in the image), adding the
distribution of each missing module until load and predict pass: the adapter's lazy imports,
pandas for a DataFrame, the custom code's libraries go into the lock, and optional imports that
merely happen to be installed here (pyarrow for pandas, say) stay out, as in the image.
``build`` runs it with only the image's Python packages on the path (``-I -S``: no site-packages,
no user site, no PYTHONPATH) and refuses an image whose first request would fail, naming the
missing module.

The sample is the pod's ``sample.json`` (an OIP v2 request written at pack time) or, where the
pod has none, one row made from the signature.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import ModelpodError
from modelpod.pod import FileEntry, Manifest, Pod, sha256_file

SAMPLE_NAME = "sample.json"
SAMPLE_ROWS = 16  # rows of the pack sample kept in the pod
_MISSING = re.compile(r"No module named '([^']+)'")
_CHILD = ("import json,sys; p=json.loads(sys.stdin.read()); sys.path[:]=p['path']+(sys.path if p['prepend'] else []); "
          "from modelpod.probe import child; child(p)")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    error: str = ""
    missing: str | None = None  # the module that could not be imported, if that was the failure
    synthetic: bool = False  # the input was made from the signature (the pod has no sample)


def write_sample(directory: Path, arrays: Mapping[str, np.ndarray[Any, Any]]) -> FileEntry | None:
    """Keep the first rows of the pack sample in the pod as an OIP v2 request; None if it cannot be JSON."""
    from modelpod.protocols.codec import decode_request, tensor_to_json

    kept = {n: (np.asarray(a)[:SAMPLE_ROWS] if np.ndim(a) else np.asarray(a)) for n, a in arrays.items()}
    try:
        # NaN (a missing value) stays the NaN token Python's json reads back: the codec takes numbers
        # only in FP data, and this file is read by modelpod alone
        text = json.dumps({"inputs": [tensor_to_json(n, a) for n, a in kept.items()]}, sort_keys=True)
        back = decode_request(json.loads(text)).inputs
    except (ModelpodError, TypeError, ValueError, UnicodeDecodeError):
        return None
    if not all(n in back and _same(kept[n], back[n]) for n in kept):
        return None  # not lossless as JSON (objects that are not text, odd dtypes): keep no sample
    path = directory / SAMPLE_NAME
    path.write_text(text, encoding="utf-8")
    return FileEntry(SAMPLE_NAME, sha256_file(path), path.stat().st_size, "config")


def _same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" and b.dtype == a.dtype:
        return bool(np.array_equal(a, b, equal_nan=True))
    if a.dtype.kind in "OUS":
        def norm(v: Any) -> Any:
            return v.encode() if isinstance(v, str) else v
        return [norm(v) for v in a.reshape(-1).tolist()] == [norm(v) for v in b.reshape(-1).tolist()]
    return a.dtype == b.dtype and bool(np.array_equal(a, b))


def run(pod_dir: Path, manifest: Manifest, *, path: Sequence[str] | None = None, python: str | None = None,
        allow: Collection[str] | None = None, timeout_s: float = 600) -> ProbeResult:
    """Probe in a child interpreter. ``path``: the only package directories it sees (isolated mode);
    None: this process's ``sys.path``, of whose distributions only ``allow`` (canonical names) can be
    imported when given."""
    if allow is not None and path is None:
        with tempfile.TemporaryDirectory(prefix="modelpod-probe-") as tree:
            return run(pod_dir, manifest, path=[site_of(allow, Path(tree))], python=python, timeout_s=timeout_s)
    isolated = path is not None
    cmd = [python or sys.executable, "-B", *(["-I", "-S"] if isolated else []), "-c", _CHILD]
    # isolated: the given directories before the standard library; else exactly this sys.path
    payload = {"pod": str(pod_dir), "manifest": manifest.to_dict(), "prepend": isolated,
               "path": list(path) if path is not None else [p for p in sys.path if p]}
    try:
        proc = subprocess.run(cmd, input=json.dumps(payload), capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"loading and predicting took over {timeout_s:.0f} s")
    except OSError as exc:
        return ProbeResult(False, f"cannot start {cmd[0]}: {exc}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"probe\"")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        found = _MISSING.search(proc.stderr)
        return ProbeResult(False, tail, found.group(1) if found else None)
    data = json.loads(lines[-1])["probe"]
    return ProbeResult(bool(data["ok"]), str(data.get("error") or ""), data.get("missing"),
                       bool(data.get("synthetic")))


def site_of(allow: Collection[str], tree: Path) -> str:
    """A site directory in ``tree`` holding only the allowed installed distributions (and modelpod
    with its own), as links to their top-level files: anything else is absent there, as in an image."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    import modelpod
    from modelpod.locking import walk

    allowed = {canonicalize_name(a) for a in allow} | set(walk(["modelpod"]))
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name not in allowed or name == "modelpod":
            continue
        root = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] != ".."}:
            src, link = root / top, tree / top
            if src.exists() and not link.exists() and not link.is_symlink():
                link.symlink_to(src)
    own = Path(modelpod.__file__).parent
    if not (tree / "modelpod").exists():
        (tree / "modelpod").symlink_to(own)
    return str(tree)


def child(payload: Mapping[str, Any]) -> None:
    """The child's side: load, predict, print one JSON line (``{"probe": ...}``) on stdout."""
    result: dict[str, Any] = {"ok": True}
    try:
        from modelpod.frameworks import module

        manifest = Manifest.from_dict(payload["manifest"])
        pod = Pod(Path(payload["pod"]), manifest)
        adapter = module(manifest.framework)
        inputs, result["synthetic"] = sample_inputs(pod)
        model = adapter.load(pod)
        model.load()
        model.predict(model.coerce(inputs))
    except BaseException as exc:  # anything the model raises is the answer, not a crash of the probe
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000], missing=missing_module(exc))
    sys.stdout.write("\n" + json.dumps({"probe": result}) + "\n")
    sys.stdout.flush()


def sample_inputs(pod: Pod) -> tuple[dict[str, np.ndarray[Any, Any]], bool]:
    """The pod's sample, or one row per input made from the signature (zeros, empty strings)."""
    if any(f.path == SAMPLE_NAME for f in pod.manifest.files):
        from modelpod.protocols.codec import decode_request

        return dict(decode_request(json.loads(pod.file(SAMPLE_NAME).read_text(encoding="utf-8"))).inputs), False
    out: dict[str, np.ndarray[Any, Any]] = {}
    for spec in pod.manifest.signature.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            arr = np.empty(shape, dtype=object)
            arr.fill(_vision_sample() if pod.manifest.signature.parameters.get("task") else b"")
        else:
            from modelpod.pod import numpy_dtype

            arr = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
        out[spec.name] = arr
    return out, True


def _vision_sample() -> bytes:
    """A detector's or classifier's sample: one small image (an empty string is not an image)."""
    from modelpod.vision.image import sample_png

    return sample_png()


def missing_module(exc: BaseException) -> str | None:
    """The module name of the first ModuleNotFoundError in the chain (or named in a message)."""
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None:
            break
        if isinstance(seen, ModuleNotFoundError) and seen.name:
            return seen.name
        found = _MISSING.search(str(seen))
        if found:
            return found.group(1)
        seen = seen.__cause__ or seen.__context__
    return None
