"""Encrypted weights: AES-256-GCM per file, a fresh data key per pod wrapped by the user's key.

The key file (``--encrypt KEYFILE``, ``--decrypt-key FILE``, ``MODELPOD_DECRYPT_KEY_FILE``) holds
one 32-byte AES key: the raw 32 bytes (``openssl rand -out pod.key 32``), or the same bytes as
base64 (44 characters) or hex (64 characters) text. Its id, shown in messages and recorded in the
manifest, is the first 16 hex digits of ``sha256("modelpod-key-id" || key)``; it says which key a
pod wants without revealing the key.

An encrypted pod's weights files hold ``ciphertext || 16-byte GCM tag``, each under its own random
96-bit nonce with the file's pod path as associated data (a file cannot be swapped for another).
The manifest's file entries list the ciphertext's sha256 and size, so the pod digest, ``verify``,
push, pull and signatures work without the key; its ``encryption`` section holds the rest::

    encryption: {scheme: aes-256-gcm/v1, key_id: 9f2c…, wrapped_key: b64(nonce || AESGCM(key, data key)),
                 files: {model.onnx: {nonce: b64, sha256: <plaintext hex>, size: <plaintext bytes>}}}

Loading decrypts into a private (0700) directory on a memory filesystem (``/dev/shm`` where
there is one with room, else the temporary directory), because the frameworks read weights from
paths; the plaintext is checked against its recorded sha256 and removed as soon as the model has
loaded.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from modelpod.errors import DecryptionError, IntegrityError, TrustKeyError, UsageError
from modelpod.pod import FileEntry, Manifest, Pod, write_manifest
from modelpod.trust.keys import crypto

SCHEME = "aes-256-gcm/v1"
_WRAP_AAD = b"modelpod data key v1"
_TAG = 16
_CHUNK = 1 << 20


def read_key(path: Path | str) -> bytes:
    """The 32-byte key in a key file (raw, base64 or hex); TrustKeyError naming the file otherwise."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise TrustKeyError(f"key file {p}: cannot read it: {exc.strerror or exc}") from None
    if len(data) == 32:
        return data
    text = data.strip()
    with contextlib.suppress(ValueError, binascii.Error):
        if len(text) == 64:
            return bytes.fromhex(text.decode("ascii"))
        decoded = base64.b64decode(text, validate=True)
        if len(decoded) == 32:
            return decoded
    if text.startswith(b"-----BEGIN"):
        raise TrustKeyError(f"key file {p}: a PEM key; encrypted weights use a 32-byte AES key "
                            "(openssl rand -out pod.key 32)")
    raise TrustKeyError(f"key file {p}: want a 32-byte AES-256 key (raw, base64 or hex), found {len(data)} bytes "
                        "(make one with: openssl rand -out pod.key 32)")


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"modelpod-key-id" + key).hexdigest()[:16]


def is_encrypted(manifest: Manifest) -> bool:
    return bool(manifest.encryption)


def _aesgcm(key: bytes) -> Any:
    crypto()
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def encrypt_dir(directory: Path, manifest: Manifest, key: bytes, roles: tuple[str, ...] = ("weights",)) -> Manifest:
    """Encrypt, in place, the files of ``roles`` in a pod directory; the manifest that lists them.

    The plaintext of each file is overwritten by its ciphertext (a new file renamed over it)."""
    if is_encrypted(manifest):
        raise UsageError(f"pod {manifest.name}: its weights are encrypted already")
    crypto()
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    data_key = os.urandom(32)
    wrap_nonce = os.urandom(12)
    wrapped = wrap_nonce + _aesgcm(key).encrypt(wrap_nonce, data_key, _WRAP_AAD)
    records: dict[str, Any] = {}
    files: list[FileEntry] = []
    for entry in manifest.files:
        if entry.role not in roles:
            files.append(entry)
            continue
        nonce = os.urandom(12)
        src = directory / entry.path
        enc = Cipher(algorithms.AES(data_key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(entry.path.encode())
        fd, tmp = tempfile.mkstemp(dir=src.parent, prefix=".enc-")
        h, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as fh:
                while block := fh.read(_CHUNK):
                    piece = enc.update(block)
                    out.write(piece)
                    h.update(piece)
                    size += len(piece)
                tail = enc.finalize() + enc.tag
                out.write(tail)
                h.update(tail)
                size += len(tail)
            os.replace(tmp, src)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        records[entry.path] = {"nonce": base64.b64encode(nonce).decode(), "sha256": entry.sha256, "size": entry.size}
        files.append(FileEntry(entry.path, h.hexdigest(), size, entry.role))
    if not records:
        raise UsageError(f"pod {manifest.name}: it has no {'/'.join(roles)} files to encrypt")
    encryption = {"scheme": SCHEME, "key_id": key_id(key), "wrapped_key": base64.b64encode(wrapped).decode(),
                  "files": records}
    return replace(manifest, files=tuple(files), encryption=encryption)


def unwrap(manifest: Manifest, key: bytes | None, what: str = "") -> bytes:
    """The pod's data key; DecryptionError without the key or with a wrong one."""
    label = what or f"pod {manifest.name}"
    enc = manifest.encryption
    want = enc.get("key_id", "?")
    if key is None:
        raise DecryptionError(f"{label} has encrypted weights (key id {want}): give its key with --decrypt-key FILE "
                              "or MODELPOD_DECRYPT_KEY_FILE")
    if enc.get("scheme") != SCHEME:
        raise DecryptionError(f"{label}: unknown encryption scheme {enc.get('scheme')!r} (this modelpod reads "
                              f"{SCHEME})")
    crypto()
    from cryptography.exceptions import InvalidTag

    try:
        wrapped = base64.b64decode(str(enc.get("wrapped_key", "")), validate=True)
        return bytes(_aesgcm(key).decrypt(wrapped[:12], wrapped[12:], _WRAP_AAD))
    except (InvalidTag, ValueError, binascii.Error):
        raise DecryptionError(f"{label}: the decryption key (id {key_id(key)}) is not the key its weights were "
                              f"encrypted with (id {want})") from None


def decrypt_file(src: Path, dest: Path, data_key: bytes, rel: str, record: Any) -> None:
    """Decrypt one file; IntegrityError when its tag or plaintext hash does not match."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    size = src.stat().st_size
    if size < _TAG:
        raise IntegrityError(f"{rel}: encrypted file is truncated", rel)
    with src.open("rb") as fh:
        fh.seek(size - _TAG)
        tag = fh.read(_TAG)
        fh.seek(0)
        try:
            nonce = base64.b64decode(str(record["nonce"]), validate=True)
            dec = Cipher(algorithms.AES(data_key), modes.GCM(nonce, tag)).decryptor()
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise IntegrityError(f"{rel}: bad encryption record in the manifest", rel) from None
        dec.authenticate_additional_data(rel.encode())
        h = hashlib.sha256()
        left = size - _TAG
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            while left > 0:
                block = fh.read(min(_CHUNK, left))
                left -= len(block)
                plain = dec.update(block)
                h.update(plain)
                out.write(plain)
            try:
                dec.finalize()
            except InvalidTag:
                raise IntegrityError(f"{rel}: encrypted weights fail authentication (tampered?)", rel) from None
    if h.hexdigest() != record.get("sha256"):
        raise IntegrityError(f"{rel}: decrypted weights do not match their recorded sha256", rel)


def _memory_dir(needed: int) -> str | None:
    """``/dev/shm`` when it is writable with room for ``needed`` bytes (a container's is often
    64 MB), else None: the system's temporary directory."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    try:
        stat = os.statvfs(shm)
    except OSError:
        return None
    return str(shm) if stat.f_bavail * stat.f_frsize > needed + (16 << 20) else None


@contextlib.contextmanager
def decrypted(pod: Pod, key: bytes | None) -> Iterator[Pod]:
    """The pod with its weights decrypted, in a private memory-backed directory that is removed on
    exit; the plain pod itself when it is not encrypted."""
    manifest = pod.manifest
    if not is_encrypted(manifest):
        yield pod
        return
    data_key = unwrap(manifest, key, f"pod {manifest.name} ({pod.digest[:19]}…)")
    records = manifest.encryption.get("files") or {}
    needed = sum(int(r.get("size", 0)) for r in records.values() if isinstance(r, dict))
    work = Path(tempfile.mkdtemp(prefix="modelpod-plain-", dir=_memory_dir(needed)))
    try:
        os.chmod(work, 0o700)
        files: list[FileEntry] = []
        for entry in manifest.files:
            target = work / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            record = records.get(entry.path)
            if record is None:
                try:
                    os.link(pod.path / entry.path, target)
                except OSError:
                    shutil.copyfile(pod.path / entry.path, target)
                files.append(entry)
                continue
            decrypt_file(pod.path / entry.path, target, data_key, entry.path, record)
            files.append(FileEntry(entry.path, str(record["sha256"]), int(record["size"]), entry.role))
        plain = replace(manifest, files=tuple(files), encryption={})
        write_manifest(work, plain)
        yield Pod(work, plain)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plaintext_hashes(manifest: Manifest) -> dict[str, str]:
    """path -> plaintext sha256 of every encrypted file."""
    return {p: str(r.get("sha256")) for p, r in (manifest.encryption.get("files") or {}).items()}
