"""The verification policy: sign, verify, and every loader refusing what the policy refuses."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import LiveServer
from trustkit import Keys

from modelpod.api import load
from modelpod.archive import export, import_archive
from modelpod.cli import main
from modelpod.errors import BadSignatureError, NotSignedError, TrustError, UntrustedSignerError
from modelpod.pod import SIGNATURES_NAME
from modelpod.serving.config import ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings
from modelpod.store import Store
from modelpod.trust.policy import TrustPolicy


def cli(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, Any, str]:
    capsys.readouterr()
    rc = main(["--home", str(home), *args, "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def strict(home: Path, *keys: Path) -> Settings:
    return Settings(home=home, trust_keys=",".join(str(k) for k in keys), require_signed=True)


def test_sign_then_verify_reports_who_signed_what(home: Path, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    alice = keys.pair("alice", "ed25519")
    rc, signed, err = cli(capsys, home, "sign", "lr:1", "--key", str(alice.private))
    assert rc == 0, err
    assert signed["algorithm"] == "ed25519" and signed["signatures"] == 1
    digest = Store(home).get("lr:1").digest
    rc, report, err = cli(capsys, home, "verify", "lr:1", "--signature", "--key", str(alice.public))
    assert rc == 0, err
    assert report["ok"] and report["digest"] == digest
    [sig] = report["signatures"]
    assert sig["trusted"] and sig["keyid"] == signed["keyid"] and sig["digest"] == digest and sig["name"] == "lr"
    # Another key: the signature is reported, but not trusted, and the exit code says so.
    bob = keys.pair("bob")
    rc, report, _ = cli(capsys, home, "verify", "lr:1", "--signature", "--key", str(bob.public))
    assert rc == 3 and not report["ok"] and report["reason"] == "no signature by a trusted key"
    assert "not a trusted key" in report["signatures"][0]["error"]
    # No keys anywhere: said so.
    rc, report, _ = cli(capsys, home, "verify", "lr:1", "--signature")
    assert rc == 3 and "no trusted keys" in report["reason"]


def test_verify_signature_of_an_unsigned_pod_fails(home: Path, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    alice = keys.pair("alice")
    rc, report, _ = cli(capsys, home, "verify", "lr:1", "--signature", "--key", str(alice.public))
    assert rc == 3 and report["reason"] == "not signed" and report["signatures"] == []


def test_load_refuses_unsigned_unknown_key_and_other_digest(home: Path, keys: Keys,
                                                            sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    alice, bob = keys.pair("alice"), keys.pair("bob")
    settings = strict(home, alice.public)
    with pytest.raises(NotSignedError, match=r"pod lr:1 \(sha256:[0-9a-f]{64}\) is not signed"):
        load("lr:1", settings=settings)
    assert main(["--home", str(home), "sign", "lr:1", "--key", str(bob.private)]) == 0
    with pytest.raises(UntrustedSignerError, match="pod lr:1: signed by key sha256:"):
        load("lr:1", settings=settings)
    # A good signature by alice, but over another pod (version 2 has another digest).
    from modelpod.packing import pack

    path, sample, est = sklearn_model
    other = pack(path, "lr", Store(home), sample=sample, labels={"v": "2"})
    assert main(["--home", str(home), "sign", other.ref, "--key", str(alice.private)]) == 0
    store = Store(home)
    (store.open("lr:1").path / SIGNATURES_NAME).write_bytes((store.open(other.ref).path / SIGNATURES_NAME).read_bytes())
    with pytest.raises(BadSignatureError, match=f"over {other.digest}, not over this digest"):
        load("lr:1", settings=settings)
    # Signed by alice: it loads and predicts.
    assert main(["--home", str(home), "sign", "lr:1", "--key", str(alice.private)]) == 0
    model = load("lr:1", settings=settings)
    out = model.predict(model.coerce({"input-0": sample}))
    assert np.array_equal(np.asarray(next(iter(out.values()))).reshape(-1), est.predict(sample))  # type: ignore[attr-defined]


def test_environment_keys_alone_require_signatures(home: Path, keys: Keys) -> None:
    alice = keys.pair("alice")
    settings = Settings.from_env({"MODELPOD_TRUST_KEYS": str(alice.public)}, home=home)
    assert TrustPolicy.from_settings(settings).required
    with pytest.raises(NotSignedError):
        load("lr:1", settings=settings)
    relaxed = Settings.from_env({"MODELPOD_TRUST_KEYS": str(alice.public), "MODELPOD_REQUIRE_SIGNED": "false"},
                                home=home)
    assert load("lr:1", settings=relaxed).loaded
    nokeys = Settings.from_env({"MODELPOD_REQUIRE_SIGNED": "1"}, home=home)
    with pytest.raises(TrustError, match="names no trusted keys"):
        load("lr:1", settings=nokeys)


def test_config_trust_section_with_relative_key_paths(tmp_path: Path, keys: Keys) -> None:
    alice = keys.pair("alice")
    config = keys.root / "serve.yaml"
    config.write_text("trust:\n  require_signed: true\n  keys: [alice.pub.pem]\n")
    policy = ServeConfig.load(Settings(home=tmp_path, config=config)).trust
    assert policy is not None and policy.required and policy.keys == (alice.public,)
    config.write_text("trust:\n  require: yes\n")
    with pytest.raises(Exception, match="unknown key 'require'"):
        ServeConfig.load(Settings(home=tmp_path, config=config))


def test_import_under_policy_keeps_signatures_and_refuses_unsigned_with_nothing_imported(
        home: Path, tmp_path: Path, keys: Keys) -> None:
    alice = keys.pair("alice")
    store = Store(home)
    unsigned = export(store.open("lr:1"), tmp_path / "unsigned.tar")
    assert main(["--home", str(home), "sign", "lr:1", "--key", str(alice.private)]) == 0
    signed = export(store.open("lr:1"), tmp_path / "signed.tar")
    with tarfile.open(signed) as tar:
        assert SIGNATURES_NAME in tar.getnames()

    fresh = tmp_path / "fresh"
    policy = TrustPolicy.from_settings(strict(fresh, alice.public))
    with pytest.raises(NotSignedError, match="pod lr in .*unsigned.tar"):
        import_archive(unsigned, Store(fresh), policy=policy)
    assert Store(fresh).list() == [] and not any((fresh / "blobs" / "sha256").iterdir())
    assert not any((fresh / "pods").iterdir())
    rec = import_archive(signed, Store(fresh), policy=policy)
    assert rec.digest == store.get("lr:1").digest
    assert load("lr:1", settings=strict(fresh, alice.public)).loaded  # the signature came along
    # Renaming changes the digest: the signature cannot cover it.
    with pytest.raises(NotSignedError, match="renamed with --name"):
        import_archive(signed, Store(fresh), name="other", policy=policy)
    assert [r.name for r in Store(fresh).list()] == ["lr"]


def test_import_cli_refuses_a_tampered_signature(home: Path, tmp_path: Path, keys: Keys,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    alice = keys.pair("alice")
    store = Store(home)
    assert main(["--home", str(home), "sign", "lr:1", "--key", str(alice.private)]) == 0
    sig_path = store.open("lr:1").path / SIGNATURES_NAME
    bundles = json.loads(sig_path.read_text())
    bundles[0]["dsseEnvelope"]["signatures"][0]["sig"] = "A" * 96
    sig_path.write_text(json.dumps(bundles))
    archive = export(store.open("lr:1"), tmp_path / "tampered.tar")
    fresh = tmp_path / "fresh"
    capsys.readouterr()
    monkeypatch.setenv("MODELPOD_TRUST_KEYS", str(alice.public))
    rc = main(["--home", str(fresh), "import", str(archive)])
    err = capsys.readouterr().err
    assert rc == 2 and "does not verify" in err and "pod lr in" in err
    assert Store(fresh).list() == []


def test_serve_refuses_at_registration_and_on_the_repository_load_api(home: Path, keys: Keys) -> None:
    alice = keys.pair("alice")
    settings = strict(home, alice.public)
    with pytest.raises(NotSignedError, match="pod lr:1"):
        InferenceEngine(settings).add("lr:1")
    with LiveServer(settings, lambda engine: None) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v2/repository/models/lr/load", json={})
        assert r.status_code == 403 and "is not signed" in r.json()["error"] and "lr:1" in r.json()["error"]
        assert main(["--home", str(home), "sign", "lr:1", "--key", str(alice.private)]) == 0
        assert c.post("/v2/repository/models/lr/load", json={}).status_code == 200
        body = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 20], "data": [0.5] * 20}]}
        assert c.post("/v2/models/lr/infer", json=body).status_code == 200
