"""The verification policy: which keys are trusted, and whether a pod must be signed to load.

Configured by ``trust: {require_signed: true, keys: [pub.pem, ...]}`` in the config file
(``--config`` / ``MODELPOD_CONFIG``; key paths relative to that file), or by
``MODELPOD_TRUST_KEYS`` (paths separated by ``,`` or ``:``) and ``MODELPOD_REQUIRE_SIGNED``. Trusted
keys alone switch the requirement on (``require_signed`` defaults to "keys are configured"); say
``require_signed: false`` to keep keys only for ``modelpod verify``. The environment wins over the
file, key by key.

Signatures travel beside the manifest, in ``modelpod.signatures.json`` (a JSON list of signature
bundles, see ``signing``) in a pod directory, a store's pod, an export archive and an image.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from modelpod.errors import BadSignatureError, NotSignedError, TrustError, UntrustedSignerError, UsageError
from modelpod.pod import SIGNATURES_NAME, canonical_json
from modelpod.settings import Settings


@dataclass(frozen=True)
class TrustPolicy:
    """Trusted key files and the load requirement; ``check`` is the one gate every loader calls."""

    keys: tuple[Path, ...] = ()
    require_signed: bool | None = None  # None: required exactly when keys are configured
    source: str = "defaults"

    @property
    def required(self) -> bool:
        return bool(self.keys) if self.require_signed is None else self.require_signed

    @cached_property
    def trusted(self) -> list[Any]:
        from modelpod.trust.keys import load_trusted

        return load_trusted(self.keys)

    def check(self, what: str, digest: str, bundles: Sequence[bytes]) -> Any:
        """The first trusted Signer of ``digest`` among ``bundles`` when the policy requires one
        (None when it does not); else the refusal, naming ``what`` and why."""
        if not self.required:
            return None
        if not self.keys:
            raise TrustError(f"{what}: the trust policy requires signed pods ({self.source}) but names no trusted "
                             "keys; set trust.keys in the config or MODELPOD_TRUST_KEYS")
        if not bundles:
            raise NotSignedError(f"{what} ({digest}) is not signed, and the trust policy ({self.source}) requires "
                                 "signed pods; sign it with: modelpod sign REF --key KEY.pem")
        from modelpod.trust.signing import verify

        refusals: list[TrustError] = []
        for bundle in bundles:
            try:
                return verify(bundle, digest, self.trusted, what=what)
            except (BadSignatureError, UntrustedSignerError) as exc:
                refusals.append(exc)
        # One signature: its reason. Several: the most telling (a bad one over an untrusted one).
        bad = [e for e in refusals if isinstance(e, BadSignatureError)]
        raise (bad or refusals)[0]

    def check_dir(self, what: str, digest: str, directory: Path) -> Any:
        return self.check(what, digest, read_signatures(directory))

    @classmethod
    def from_settings(cls, settings: Settings, config: Mapping[str, Any] | None = None,
                      base: Path | None = None) -> TrustPolicy:
        """The policy of ``config``'s ``trust`` section (else the file ``settings.config`` names),
        with ``settings`` (the environment) applied on top."""
        where = "config"
        if config is None and settings.config is not None:
            config, base, where = _read_config(Path(settings.config)), Path(settings.config).parent, \
                f"--config {settings.config}"
        section = (config or {}).get("trust") if isinstance(config, Mapping) else None
        keys, required, source = parse_section(section, base or Path.cwd(), where)
        if settings.trust_keys:
            keys = tuple(Path(p).expanduser() for p in settings.trust_keys.replace(os.pathsep, ",").split(",")
                         if p.strip())
            source = "MODELPOD_TRUST_KEYS"
        if settings.require_signed is not None:
            required = settings.require_signed
            source = "MODELPOD_REQUIRE_SIGNED" if not keys or source != "MODELPOD_TRUST_KEYS" else source
        return cls(keys, required, source)


def parse_section(section: Any, base: Path, where: str = "config") -> tuple[tuple[Path, ...], bool | None, str]:
    """(keys, require_signed, source) from a config's ``trust:`` mapping."""
    if section is None:
        return (), None, "defaults"
    if not isinstance(section, Mapping):
        raise UsageError(f"{where}: 'trust' must be a mapping like {{require_signed: true, keys: [pub.pem]}}")
    unknown = sorted(set(section) - {"require_signed", "keys"})
    if unknown:
        raise UsageError(f"{where}: trust: unknown key {unknown[0]!r}; known: require_signed, keys")
    raw_keys = section.get("keys") or []
    if isinstance(raw_keys, str):
        raw_keys = [raw_keys]
    if not isinstance(raw_keys, list) or not all(isinstance(k, str) for k in raw_keys):
        raise UsageError(f"{where}: trust.keys must be a list of key file paths")
    required = section.get("require_signed")
    if required is not None and not isinstance(required, bool):
        raise UsageError(f"{where}: trust.require_signed must be true or false, got {required!r}")
    keys = tuple((base / Path(k).expanduser()) if not Path(k).expanduser().is_absolute() else Path(k).expanduser()
                 for k in raw_keys)
    return keys, required, f"{where} trust section"


def _read_config(path: Path) -> Mapping[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML: {exc}") from None
    return data if isinstance(data, Mapping) else None


# -- signatures beside a manifest ----------------------------------------------------------------
def read_signatures(directory: Path) -> list[bytes]:
    """The signature bundles kept in ``directory`` (each as the bytes it was signed as)."""
    path = directory / SIGNATURES_NAME
    if not path.is_file():
        return []
    return parse_signatures(path.read_bytes(), str(path))


def parse_signatures(data: bytes, label: str) -> list[bytes]:
    try:
        items = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BadSignatureError(f"{label}: truncated or not JSON") from None
    if not isinstance(items, list):
        raise BadSignatureError(f"{label}: must hold a JSON list of signature bundles")
    return [canonical_json(item) for item in items]


def signatures_bytes(bundles: Sequence[bytes]) -> bytes:
    return canonical_json([json.loads(b) for b in bundles])


def write_signatures(directory: Path, bundles: Sequence[bytes]) -> Path:
    """Replace ``directory``'s signatures file in one rename (duplicates dropped, order kept)."""
    unique = list(dict.fromkeys(bundles))
    path = directory / SIGNATURES_NAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".sig-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(signatures_bytes(unique))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def add_signatures(directory: Path, bundles: Sequence[bytes]) -> Path:
    return write_signatures(directory, [*read_signatures(directory), *bundles])
