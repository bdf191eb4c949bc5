"""Routing a public model name to the version that serves it: the one place that choice is made.

Today: an explicit version (``2``) or alias (``production``) picks that version; no version picks
the highest version that can serve. This is where weights, canaries and shadows (TrafficSplit) go.
"""

from __future__ import annotations

from modelpod.errors import NotFoundError
from modelpod.serving.registry import ModelEntry, ModelRegistry


class VersionResolver:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def resolve(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry for ``name`` and an optional version: an integer, an alias, or empty."""
        versions = self.registry.versions(name)
        if not version:
            return self.default(name)
        if version.isascii() and version.isdigit():  # "²".isdigit() is true and int("١") is 1
            entry = versions.get(int(version))
            if entry is not None:
                return entry
        else:
            for entry in versions.values():
                if version in entry.aliases:
                    return entry
        raise NotFoundError(f"model {name!r} has no version {version!r}")

    def default(self, name: str) -> ModelEntry:
        versions = self.registry.versions(name)
        if len(versions) == 1:
            return next(iter(versions.values()))
        entries = sorted(versions.values(), key=lambda e: -1 if e.version is None else e.version)
        serving = [e for e in entries if e.available]
        return (serving or entries)[-1]
