"""Pod, Manifest, Signature: the model container artifact, its typed manifest, read/write/verify.

A pod is a directory holding ``modelpod.yaml`` and the files it lists. Its digest is the sha256 of
the canonical JSON form of the manifest; the manifest lists every file's sha256 and size, so the
digest covers the whole pod. The version number is not in the manifest: the store gives it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import yaml

from modelpod.errors import IntegrityError, PodError, SignatureError

MANIFEST_NAME = "modelpod.yaml"
# Beside the manifest in an image: the pod's store version and aliases when the image was built
# (an image has no store to ask). Honoured only for the manifest digest it names.
RECORD_NAME = "modelpod.record.json"
# Beside the manifest too: the pod's signature bundles (modelpod.trust), not listed as pod files.
SIGNATURES_NAME = "modelpod.signatures.json"
SCHEMA = "modelpod/v1"

# OIP v2 datatypes and their numpy equivalents. BYTES tensors are numpy object arrays of bytes.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_KIND_TO_DATATYPE = {np.dtype(v).str: k for k, v in DATATYPES.items() if k != "BYTES"}
# The common case in one lookup: native-order dtypes (and object) as numpy hands them out.
_BY_DTYPE: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DATATYPES.items()}

FILE_ROLES = ("weights", "code", "config", "data")


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """The OIP datatype of a numpy array (strings and bytes map to BYTES)."""
    found = _BY_DTYPE.get(array.dtype)
    if found is not None:
        return found
    if array.dtype.kind in {"O", "U", "S"}:
        return "BYTES"
    key = array.dtype.newbyteorder("=").str if array.dtype.byteorder not in "=|" else array.dtype.str
    try:
        return _KIND_TO_DATATYPE[key]
    except KeyError:
        raise SignatureError(f"numpy dtype {array.dtype} has no OIP datatype") from None


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise SignatureError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: OIP datatype and shape, -1 for a free dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        numpy_dtype(self.datatype)
        if any((not isinstance(d, int)) or d < -1 for d in self.shape):
            raise SignatureError(f"tensor {self.name!r}: shape {list(self.shape)} must hold ints >= -1")

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(want == -1 or want == got for want, got in zip(self.shape, shape, strict=True))

    def check(self, datatype: str, shape: Sequence[int]) -> None:
        """Raise SignatureError if a tensor of this datatype and shape does not fit."""
        if datatype != self.datatype:
            raise SignatureError(
                f"input {self.name!r}: datatype {datatype} does not match the signature's {self.datatype}"
            )
        if not self.accepts_shape(shape):
            raise SignatureError(
                f"input {self.name!r}: shape {list(shape)} does not match the signature's {list(self.shape)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        try:
            return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PodError(f"bad tensor spec {dict(data)!r}: {exc}") from None

    @classmethod
    def of(cls, name: str, array: np.ndarray[Any, Any], batch_dim: bool = True) -> TensorSpec:
        """Spec of a sample array; the first dimension becomes free when ``batch_dim``."""
        shape = tuple(int(d) for d in array.shape)
        if batch_dim and shape:
            shape = (-1, *shape[1:])
        return cls(name, datatype_of(array), shape)


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs, plus model-level ``parameters`` (shown in the OIP model metadata).

    ``parameters`` holds what a tensor list cannot say: ``content_type: "pd"`` and the pandas
    ``dtypes`` (and ``categories``) of a table signature, whose inputs are its columns in order
    (see ``modelpod.table``), and ``class_labels``, the classes a classifier's outputs refer to.
    """

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def empty(self) -> bool:
        return not self.inputs and not self.outputs

    @property
    def is_table(self) -> bool:
        return self.parameters.get("content_type") == "pd"

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
        if self.parameters:  # only when set, so the digests of pods without them do not change
            data["parameters"] = dict(self.parameters)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Signature:
        data = data or {}
        params = data.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise PodError(f"signature parameters must be a mapping, not {type(params).__name__}")
        return cls(
            tuple(TensorSpec.from_dict(t) for t in data.get("inputs") or ()),
            tuple(TensorSpec.from_dict(t) for t in data.get("outputs") or ()),
            dict(params),
        )

    @classmethod
    def infer(
        cls,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ) -> Signature:
        return cls(
            tuple(TensorSpec.of(n, a) for n, a in inputs.items()),
            tuple(TensorSpec.of(n, a) for n, a in (outputs or {}).items()),
        )


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX, relative to the pod directory
    sha256: str  # hex
    size: int
    role: str = "weights"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileEntry:
        try:
            entry = cls(
                str(data["path"]), str(data["sha256"]), int(data["size"]), str(data.get("role", "weights"))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PodError(f"bad file entry {dict(data)!r}: {exc}") from None
        check_relative_path(entry.path)
        if entry.role not in FILE_ROLES:
            raise PodError(f"file {entry.path!r}: unknown role {entry.role!r}")
        return entry


_OPTIONAL_SERVING = frozenset({"isolation", "replicas", "max_memory"})


@dataclass(frozen=True)
class Serving:
    """How a model is batched, queued and timed out: a pod's defaults, and the server's policy.

    The server merges overrides onto a pod's defaults (``serving.config``) into another of these.
    """

    max_batch_rows: int = 1
    max_batch_wait_ms: float = 0.0
    max_queue: int = 256
    max_concurrency: int = 1
    timeout_s: float = 30.0
    # Replicas (``serving/scaling.py`` checks them): left out of the manifest when unset, so the
    # digests of pods that do not set them stay as they were.
    isolation: str | None = None
    replicas: Any = field(default=None, hash=False)
    max_memory: Any = None

    def __post_init__(self) -> None:
        checks = (
            (self.max_batch_rows >= 1, "max_batch_rows must be >= 1"),
            (self.max_batch_wait_ms >= 0, "max_batch_wait_ms must be >= 0"),
            (self.max_queue >= 1, "max_queue must be >= 1"),
            (self.max_concurrency >= 1, "max_concurrency must be >= 1"),
            (self.timeout_s > 0, "timeout_s must be > 0"),
            (self.isolation in (None, "thread", "process"), "isolation must be thread or process"),
        )
        for ok, message in checks:
            if not ok:
                raise PodError(f"serving: {message}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _OPTIONAL_SERVING}

    @property
    def max_batch_wait_s(self) -> float:
        return self.max_batch_wait_ms / 1000.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Serving:
        data = dict(data or {})
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class Manifest:
    """The typed content of ``modelpod.yaml``."""

    name: str
    framework: str
    files: tuple[FileEntry, ...]
    signature: Signature = field(default_factory=Signature)
    python: str = ""
    requirements: tuple[str, ...] = ()
    entrypoint: str | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    serving: Serving = field(default_factory=Serving)
    labels: Mapping[str, str] = field(default_factory=dict)
    lineage: Mapping[str, Any] = field(default_factory=dict)
    allow_pickle: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)  # framework-specific, e.g. task
    # Types the user trusts (``--trust``) beyond skops' and modelpod's own lists; loaders trust
    # exactly these, as recorded.
    trust: tuple[str, ...] = ()
    modelpod_version: str = ""
    # Encrypted weights (modelpod.trust.encryption): scheme, wrapped data key, per-file nonce and
    # plaintext sha256/size. The files' own entries hold the ciphertext's hashes.
    encryption: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "framework": self.framework,
            "files": [f.to_dict() for f in sorted(self.files, key=lambda f: f.path)],
            "signature": self.signature.to_dict(),
            "python": self.python,
            "requirements": sorted(self.requirements, key=str.lower),
            "entrypoint": self.entrypoint,
            "resources": dict(self.resources),
            "serving": self.serving.to_dict(),
            "labels": dict(sorted(self.labels.items())),
            "lineage": dict(self.lineage),
            "security": {"allow_pickle": self.allow_pickle,
                         **({"trust": sorted(set(self.trust))} if self.trust else {})},
            "options": dict(self.options),
            "modelpod": self.modelpod_version,
            # Only when set, so the digests of plain pods do not change.
            **({"encryption": dict(self.encryption)} if self.encryption else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping):
            raise PodError(f"{MANIFEST_NAME} must hold a mapping")
        if data.get("schema") != SCHEMA:
            raise PodError(f"{MANIFEST_NAME}: unsupported schema {data.get('schema')!r} (want {SCHEMA})")
        try:
            return cls(
                name=str(data["name"]),
                framework=str(data["framework"]),
                files=tuple(FileEntry.from_dict(f) for f in data.get("files") or ()),
                signature=Signature.from_dict(data.get("signature")),
                python=str(data.get("python") or ""),
                requirements=tuple(str(r) for r in data.get("requirements") or ()),
                entrypoint=data.get("entrypoint"),
                resources=dict(data.get("resources") or {}),
                serving=Serving.from_dict(data.get("serving")),
                labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
                lineage=dict(data.get("lineage") or {}),
                allow_pickle=bool((data.get("security") or {}).get("allow_pickle", False)),
                options=dict(data.get("options") or {}),
                trust=tuple(str(t) for t in (data.get("security") or {}).get("trust") or ()),
                modelpod_version=str(data.get("modelpod") or ""),
                encryption=dict(data.get("encryption") or {}),
            )
        except KeyError as exc:
            raise PodError(f"{MANIFEST_NAME}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise PodError(f"{MANIFEST_NAME}: {exc}") from None

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_bytes()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str) -> Manifest:
        try:
            data = yaml.load(text, Loader=SAFE_LOADER)  # a safe loader: no Python objects built
        except yaml.YAMLError as exc:
            raise PodError(f"{MANIFEST_NAME} is not valid YAML: {exc}") from None
        return cls.from_dict(data)

    def weights_bytes(self) -> int:
        return sum(f.size for f in self.files if f.role == "weights")


# libyaml's parser under PyYAML's safe constructors and resolver, where PyYAML was built with it (its
# wheels are): the same documents, parsed some ten times faster (a server parses each manifest
# it serves two or three times at start).
SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def canonical_json(data: Any) -> bytes:
    """The one canonical JSON encoding (manifest digests, OCI manifests and configs): sorted keys,
    no spaces, UTF-8, so the same data always gives the same bytes and digest."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def read_record(directory: Path, manifest: Manifest) -> tuple[int | None, tuple[str, ...]]:
    """(version, aliases) from the directory's RECORD_NAME when it is for this manifest's digest."""
    try:
        data = json.loads((directory / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, ()
    if not isinstance(data, dict) or data.get("digest") != manifest.digest:
        return None, ()
    version = data.get("version")
    aliases = data.get("aliases") or []
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return None, ()
    return version, tuple(str(a) for a in aliases if isinstance(a, str))


def check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,127}", name):
        raise PodError(
            f"bad pod name {name!r}: use lowercase letters, digits, '.', '_' and '-' (at most 128)"
        )


def check_relative_path(path: str) -> None:
    """Refuse absolute paths, '..', empty parts and backslashes in a pod-relative path."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise PodError(f"unsafe path in pod: {path!r}")
    if path == MANIFEST_NAME:
        raise PodError(f"{MANIFEST_NAME} cannot be listed as a pod file")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def scan_files(
    root: Path, roles: Mapping[str, str] | None = None, default_role: str = "weights"
) -> list[FileEntry]:
    """FileEntry for every regular file under ``root`` (links refused), manifest excluded."""
    entries: list[FileEntry] = []
    roles = roles or {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise PodError(f"links are not allowed in a pod: {rel}")
        if path.is_dir() or rel == MANIFEST_NAME or "__pycache__" in rel.split("/") or rel.endswith(".pyc"):
            continue
        if not path.is_file():
            raise PodError(f"not a regular file: {rel}")
        check_relative_path(rel)
        role = next(
            (r for prefix, r in roles.items() if rel == prefix or rel.startswith(prefix.rstrip("/") + "/")),
            default_role,
        )
        entries.append(FileEntry(rel, sha256_file(path), path.stat().st_size, role))
    return entries


@dataclass(frozen=True)
class Pod:
    """A pod on disk: its directory and its parsed manifest."""

    path: Path
    manifest: Manifest

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def name(self) -> str:
        return self.manifest.name

    @classmethod
    def open(cls, path: Path, verify: bool = True, expected_digest: str | None = None) -> Pod:
        """Read a pod directory; with ``verify`` every file is re-hashed against the manifest."""
        mpath = path / MANIFEST_NAME
        if not mpath.is_file():
            raise PodError(f"{path} is not a pod: {MANIFEST_NAME} is missing")
        manifest = Manifest.from_yaml(mpath.read_text(encoding="utf-8"))
        pod = cls(path, manifest)
        if expected_digest is not None and manifest.digest != expected_digest:
            raise IntegrityError(
                f"{mpath}: manifest digest {manifest.digest} does not match the recorded {expected_digest}",
                MANIFEST_NAME,
            )
        if verify:
            pod.verify()
        return pod

    def verify(self) -> None:
        """Re-hash every file; raise IntegrityError naming the first file that does not match."""
        for problem in self.problems():
            raise IntegrityError(problem[1], problem[0])

    def problems(self) -> Iterable[tuple[str, str]]:
        for entry in self.manifest.files:
            file = self.path / entry.path
            if file.is_symlink() or not file.is_file():
                yield entry.path, f"{entry.path}: missing from pod {self.name} ({self.path})"
                continue
            size = file.stat().st_size
            if size != entry.size:
                yield entry.path, f"{entry.path}: size {size} does not match the manifest's {entry.size} (tampered?)"
                continue
            got = sha256_file(file)
            if got != entry.sha256:
                yield entry.path, (
                    f"{entry.path}: sha256 {got[:12]}… does not match the manifest's {entry.sha256[:12]}… (tampered?)"
                )

    def file(self, rel: str) -> Path:
        return self.path / rel


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST_NAME
    path.write_text(manifest.to_yaml(), encoding="utf-8")
    return path
