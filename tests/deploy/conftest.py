"""Deploy test fixtures: validators for core kinds (kubernetes-validate) and for the CRDs (their schemas)."""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from deployutil import CRD_KINDS, ROOT, find_crds


def _close(schema: Any) -> Any:
    """The API server's strictness for a structural schema: unknown fields are errors, not pruned."""
    if isinstance(schema, dict):
        out = {k: _close(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_close(v) for v in schema]
    return schema


@pytest.fixture(scope="session")
def crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a jsonschema validator of that version's openAPIV3Schema."""
    import jsonschema

    shared = find_crds()
    copies = ROOT / "tests" / "specs" / "kubernetes"
    out: dict[tuple[str, str], Any] = {}
    for kind, name in CRD_KINDS.items():
        if shared is not None:
            text = (shared / name).read_text()
        elif (copies / f"{name}.gz").is_file():
            text = gzip.decompress((copies / f"{name}.gz").read_bytes()).decode()
        else:
            pytest.fail(f"the CRD schema {name} is in neither shared/specs/kubernetes beside the checkout nor "
                        f"{copies}: copy shared/ beside the repository")
        crd = yaml.safe_load(text)
        group = crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            schema = _close(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


@pytest.fixture(scope="session")
def validate_object(crd_validators: dict[tuple[str, str], Any]) -> Callable[[dict[str, Any]], list[str]]:
    """Every problem of one object: core kinds with kubernetes-validate --strict on 1.30..latest, CRDs by schema."""
    import kubernetes_validate
    from kubernetes_validate import utils

    versions = sorted({v for v in utils.all_versions() if _at_least(v, (1, 30))}, key=_key)
    assert versions and versions[0] == "1.30.0"

    seen: dict[str, list[str]] = {}  # the same object in several shapes is validated once

    def check(obj: dict[str, Any]) -> list[str]:
        text = json.dumps(obj, sort_keys=True)
        if text not in seen:
            seen[text] = _check(obj)
        return seen[text]

    def _check(obj: dict[str, Any]) -> list[str]:
        key = (obj["apiVersion"], obj["kind"])
        if key[1] in CRD_KINDS:
            if key not in crd_validators:
                return [f"{key}: no such version in the CRD"]
            return [f"{key[1]}: {e.json_path}: {e.message}" for e in crd_validators[key].iter_errors(obj)]
        problems = []
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{key[1]} on {version}: {exc}")
        return problems

    return check


def _key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _at_least(v: str, floor: tuple[int, int]) -> bool:
    return _key(v)[:2] >= floor
