"""Encrypted weights: only ciphertext is stored; the right key loads; anything else is refused."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import LiveServer
from trustkit import Keys

from modelpod.api import load
from modelpod.cli import main
from modelpod.errors import DecryptionError, IntegrityError, TrustKeyError
from modelpod.settings import Settings
from modelpod.store import Store
from modelpod.trust.encryption import decrypted, key_id, read_key

Model = tuple[Path, np.ndarray, object]


def windows(data: bytes, size: int = 32) -> list[bytes]:
    """The binary pieces of ``data`` (weights, CRCs; not the JSON and spaces any file may hold):
    a leak of any of them shows up."""
    found = [data[i:i + size] for i in range(0, len(data) - size, 4)]
    pieces = [w for w in found if len(set(w)) >= 20 and sum(1 for b in w if b < 0x20 or b > 0x7E) >= 12]
    assert len(pieces) >= 8, "the model file has too little binary content to look for"
    return pieces


def leaks(root: Path, plaintext: bytes) -> list[str]:
    """Files under ``root`` holding a piece of ``plaintext``."""
    pieces = windows(plaintext)
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(p in data for p in pieces):
                found.append(str(path.relative_to(root)))
    return found


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "pod.key"
    path.write_bytes(os.urandom(32))
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, sklearn_model: Model, key: Path) -> tuple[Path, Any]:
    """``pack --encrypt`` through the CLI, once for the module (the tests only read the store)."""
    import contextlib
    import io

    path, sample, _ = sklearn_model
    root = tmp_path_factory.mktemp("enc")
    np.save(root / "sample.npy", sample)
    home = root / "home"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["--home", str(home), "pack", str(path), "--name", "lr", "--sample", str(root / "sample.npy"),
                   "--encrypt", str(key), "--json"])
    assert rc == 0
    return home, json.loads(out.getvalue())


def test_pack_encrypt_stores_only_ciphertext(packed: tuple[Path, Any], sklearn_model: Model, key: Path,
                                             template_home: tuple[Path, Any]) -> None:
    home, _ = packed
    plaintext = sklearn_model[0].read_bytes()
    assert leaks(template_home[0], plaintext)  # the search finds the weights in a plain store
    rec = Store(home).get("lr:1")
    enc = rec.manifest.encryption
    assert enc["scheme"] == "aes-256-gcm/v1" and enc["key_id"] == key_id(key.read_bytes())
    [weights] = [f for f in rec.manifest.files if f.role == "weights"]
    assert enc["files"][weights.path]["sha256"] != weights.sha256  # plaintext and ciphertext hashes both listed
    assert leaks(home, plaintext) == []  # not in a blob, a pod directory, staging or the index
    # Digest and file verification need no key.
    assert main(["--home", str(home), "verify", "lr:1"]) == 0


def test_load_needs_the_right_key(packed: tuple[Path, Any], sklearn_model: Model, key: Path, tmp_path: Path) -> None:
    home, _ = packed
    _, sample, est = sklearn_model
    with pytest.raises(DecryptionError, match="encrypted weights .*--decrypt-key FILE or MODELPOD_DECRYPT_KEY_FILE"):
        load("lr:1", settings=Settings(home=home))
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    with pytest.raises(DecryptionError, match="is not the key its weights were encrypted with"):
        load("lr:1", settings=Settings(home=home, decrypt_key_file=wrong))
    before = set(Path("/dev/shm").glob("modelpod-plain-*")) if Path("/dev/shm").is_dir() else set()
    model = load("lr:1", settings=Settings(home=home, decrypt_key_file=key))
    out = np.asarray(next(iter(model.predict(model.coerce({"input-0": sample})).values()))).reshape(-1)
    assert np.array_equal(out, est.predict(sample))  # type: ignore[attr-defined]
    after = set(Path("/dev/shm").glob("modelpod-plain-*")) if Path("/dev/shm").is_dir() else set()
    assert after <= before  # the plaintext directory is gone once loaded


def test_tampered_ciphertext_is_refused(packed: tuple[Path, Any], key: Path, tmp_path: Path) -> None:
    home, _ = packed
    store = Store(home)
    pod = store.open("lr:1")
    [weights] = [f for f in pod.manifest.files if f.role == "weights"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in pod.manifest.files:
        (copy / f.path).parent.mkdir(parents=True, exist_ok=True)
        (copy / f.path).write_bytes((pod.path / f.path).read_bytes())
    data = bytearray((copy / weights.path).read_bytes())
    data[10] ^= 0xFF
    (copy / weights.path).write_bytes(bytes(data))
    from modelpod.pod import Pod

    with pytest.raises(IntegrityError, match="fail authentication"), \
            decrypted(Pod(copy, pod.manifest), read_key(key)):
        pass


def test_encrypt_command_then_sign_and_verify(home: Path, key: Path, keys: Keys, sklearn_model: Model,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["--home", str(home), "encrypt", "lr:1", "--key", str(key), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == 2 and data["from"] == "lr:1" and data["encrypted"]
    rec = Store(home).get("lr:2")
    assert rec.manifest.lineage["parent"] == Store(home).get("lr:1").digest
    alice = keys.pair("alice")
    assert main(["--home", str(home), "sign", "lr:2", "--key", str(alice.private)]) == 0
    assert main(["--home", str(home), "verify", "lr:2", "--signature", "--key", str(alice.public)]) == 0
    settings = Settings(home=home, decrypt_key_file=key, trust_keys=str(alice.public))
    assert load("lr:2", settings=settings).loaded
    capsys.readouterr()
    assert main(["--home", str(home), "encrypt", "lr:2", "--key", str(key)]) == 2
    assert "encrypted already" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["raw", "base64", "hex"])
def test_key_file_forms(tmp_path: Path, form: str) -> None:
    raw = os.urandom(32)
    path = tmp_path / "k"
    path.write_bytes({"raw": raw, "base64": base64.b64encode(raw) + b"\n", "hex": raw.hex().encode()}[form])
    assert read_key(path) == raw


def test_bad_key_files_are_refused(tmp_path: Path, keys: Keys) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"x" * 16)
    with pytest.raises(TrustKeyError, match="want a 32-byte AES-256 key"):
        read_key(short)
    with pytest.raises(TrustKeyError, match="a PEM key"):
        read_key(keys.pair("alice").private)
    with pytest.raises(TrustKeyError, match="cannot read"):
        read_key(tmp_path / "missing")


def test_server_decrypts_with_the_key_and_refuses_without(packed: tuple[Path, Any], key: Path) -> None:
    home, _ = packed
    body = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 20], "data": [0.25] * 20}]}
    with LiveServer(Settings(home=home, decrypt_key_file=key), lambda e: e.add("lr:1")) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v2/models/lr/infer", json=body).status_code == 200
    with LiveServer(Settings(home=home), lambda e: e.add("lr:1")) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v2/models/lr/infer", json=body)
        assert r.status_code == 503 and "encrypted weights" in r.json()["error"]
        r = c.post("/v2/repository/models/lr/load", json={})
        assert r.status_code == 403 and "MODELPOD_DECRYPT_KEY_FILE" in r.json()["error"]
