"""Rendered objects as bytes: one YAML stream, or a directory with a ``kustomization.yaml``.

The same objects always give the same bytes (key order as rendered, no timestamps), so the
output diffs cleanly in GitOps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from modelpod.errors import UsageError

ADAPTER_RULE_FILE = "prometheus-adapter-rule.yaml"


class _Dumper(yaml.SafeDumper):
    """Block style; lists indented under their key, as kubectl prints them."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)


def to_yaml(obj: Mapping[str, Any]) -> str:
    return yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096,
                     allow_unicode=True)


def stream(objects: Sequence[Mapping[str, Any]]) -> str:
    return "".join(f"---\n{to_yaml(o)}" for o in objects)


def file_name(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def kustomization(objects: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [file_name(o) for o in objects]}


def write_directory(directory: Path, objects: Sequence[Mapping[str, Any]],
                    extra: Mapping[str, Mapping[str, Any]] | None = None) -> list[Path]:
    """One file per object plus ``kustomization.yaml``; ``extra`` files (not resources) beside them.

    Files this renderer wrote before and no longer renders are removed, so the directory is the
    deployment; any other file there is left alone.
    """
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"-o {directory}: not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"-o {directory}: {exc.strerror or exc}") from None
    files = {file_name(o): to_yaml(o) for o in objects}
    if len(files) != len(objects):
        raise UsageError("two rendered objects share a kind and name")
    files["kustomization.yaml"] = to_yaml(kustomization(objects))
    for name, data in (extra or {}).items():
        files[name] = to_yaml(data)
    old = directory / "kustomization.yaml"
    if old.is_file():
        try:
            previous = (yaml.safe_load(old.read_text()) or {}).get("resources") or []
        except yaml.YAMLError:
            previous = []
        for name in previous:
            stale = directory / str(name)
            if str(name) not in files and stale.parent == directory and stale.is_file():
                stale.unlink()
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
