"""``deploy kubernetes --tls-secret``: the Secret mounted, the server pointed at it, probes and scrapes over HTTPS."""

from __future__ import annotations

from typing import Any

import pytest
from deployutil import specs

from modelpod.deploy.kubernetes import TLS_DIR, render
from modelpod.errors import UsageError

Obj = dict[str, Any]


def servers(objects: list[Obj]) -> list[Obj]:
    out = []
    for o in objects:
        if o["kind"] == "Deployment":
            out.append(o["spec"]["template"]["spec"])
        elif o["kind"] == "InferenceService":
            out.append(o["spec"]["predictor"])
    return out


@pytest.mark.parametrize("shape", ["tls-token-monitor", "kserve-tls"])
def test_tls_secret_is_mounted_and_used(shape: str) -> None:
    objects = render(specs()[shape].check(apply=True))
    pods = servers(objects)
    assert pods
    for pod in pods:
        volume = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == "churn-tls"
        assert {i["key"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key"}
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MODELPOD_TLS_CERT"] == f"{TLS_DIR}/tls.crt" and env["MODELPOD_TLS_KEY"] == f"{TLS_DIR}/tls.key"
        assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in container["volumeMounts"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["scheme"] == "HTTPS"


def test_scrapes_go_over_https() -> None:
    objects = render(specs()["tls-token-monitor"])
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["serverName"] == "churn.ml.svc"
    assert endpoint["authorization"]["credentials"]["name"] == "churn-token"
    annotations = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"


def test_without_tls_nothing_changes() -> None:
    objects = render(specs()["default"])
    pod = servers(objects)[0]
    assert all(v["name"] != "tls" for v in pod["volumes"])
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    assert not any(e["name"].startswith("MODELPOD_TLS") for e in pod["containers"][0]["env"])
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert "prometheus.io/scheme" not in deployment["spec"]["template"]["metadata"]["annotations"]


def test_bad_secret_name_is_refused() -> None:
    from dataclasses import replace

    with pytest.raises(UsageError, match="--tls-secret"):
        replace(specs()["default"], tls_secret="Not_A_Name").check()
