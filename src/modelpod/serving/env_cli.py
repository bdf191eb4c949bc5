"""``modelpod env ...``: the own environments kept under ``$MODELPOD_HOME/envs``.

    modelpod env list                       every built environment, and the pods it serves
    modelpod env show REF                   whether a server would give REF its own environment, and why
    modelpod env build REF... [--wheel-cache DIR]   build REF's environment now (before serving)
    modelpod env rm KEY|REF... | --all      delete environments (a server rebuilds on its next load)

Exit codes: 0 done, 2 bad input or an environment that cannot be built (the message names the
package and the fix).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpod.errors import NotFoundError, UsageError
from modelpod.pod import Manifest
from modelpod.serving.envs import choose, framework_imports, mismatches
from modelpod.settings import Settings
from modelpod.store import Store

if TYPE_CHECKING:  # envbuild needs packaging, which images lack, and `modelpod serve` there builds this parser
    from modelpod.serving.envbuild import EnvCache, Environment

ACTIONS = ("list", "show", "build", "rm")


def add_arguments(c: argparse.ArgumentParser) -> None:
    """The ``env`` subcommands (``c`` is the ``modelpod env`` parser)."""
    sub = c.add_subparsers(dest="env_action", required=True, metavar="{" + ",".join(ACTIONS) + "}")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help)
        a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
        return a

    action("list", "every built environment, its size and the stored pods it serves")
    a = action("show", "whether a server gives a pod its own environment, why, and whether it is built")
    a.add_argument("ref", metavar="REF")
    a = action("build", "build pods' environments now (offline with --wheel-cache)")
    a.add_argument("refs", nargs="+", metavar="REF")
    a.add_argument("--wheel-cache", metavar="DIR",
                   help="install offline from the wheels in DIR (default $MODELPOD_WHEEL_CACHE; else pip's index)")
    a = action("rm", "delete environments by key (or prefix) or by the pod they serve")
    a.add_argument("targets", nargs="*", metavar="KEY|REF")
    a.add_argument("--all", action="store_true", help="delete every environment")


def lock_key(pins: Any) -> str:
    from modelpod.serving.envbuild import lock_key as key

    return key(pins)


def env_command(args: argparse.Namespace, settings: Settings) -> int:
    from modelpod.serving.envbuild import EnvCache

    cache = EnvCache(settings.home)
    action = args.env_action
    if action == "list":
        return _list(args, settings, cache)
    if action == "show":
        return _show(args, settings, cache)
    if action == "build":
        return _build(args, settings, cache)
    return _rm(args, settings, cache)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if getattr(args, "json", False) else text)


def _manifest(settings: Settings, ref: str) -> tuple[str, Manifest]:
    """A stored pod's label and manifest, or a pod directory's."""
    path = Path(ref).expanduser()
    if (path / "modelpod.yaml").is_file():
        from modelpod.pod import Pod

        pod = Pod.open(path, verify=False)
        return str(path), pod.manifest
    rec = Store(settings.home).get(ref)
    return rec.ref, rec.manifest


def _users(settings: Settings) -> dict[str, list[str]]:
    """Environment key -> the stored pod versions whose lock it is."""
    out: dict[str, list[str]] = {}
    if not (settings.home / "index.db").is_file():
        return out
    for rec in Store(settings.home).list():
        out.setdefault(lock_key(rec.manifest.requirements), []).append(rec.ref)
    return out


def _list(args: argparse.Namespace, settings: Settings, cache: EnvCache) -> int:
    from modelpod.cli import _size

    users = _users(settings)
    envs = cache.list()
    rows = [{**e.to_dict(), "size_bytes": e.size_bytes(), "pods": users.get(e.key, [])} for e in envs]
    lines = [f"{'KEY':<14}{'SIZE':>10}  {'PYTHON':<9}{'BUILT':<18}{'PODS':<24}PINS"]
    for row in rows:
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(row.get("created") or 0)))
        main = _headline(row.get("pins") or [])
        lines.append(f"{row['key'][:12]:<14}{_size(row['size_bytes']):>10}  {row.get('python', ''):<9}{built:<18}"
                     f"{', '.join(row['pods']) or '-':<24}{main}")
    _emit(args, rows, "\n".join(lines) if rows else f"no environments under {cache.root}")
    return 0


def _headline(pins: list[str]) -> str:
    """The pins this server does not satisfy first (why the environment exists), then the rest."""
    differ = [m.pin for m in mismatches(pins)]
    ordered = [*differ, *(p for p in pins if p not in differ)]
    text = ", ".join(ordered[:3])
    return text + (f" +{len(ordered) - 3} more" if len(ordered) > 3 else "")


def _show(args: argparse.Namespace, settings: Settings, cache: EnvCache) -> int:
    label, manifest = _manifest(settings, args.ref)
    choice = choose(manifest.requirements, settings.pod_env or "auto")
    key = lock_key(manifest.requirements)
    built = cache.get(key)
    data = {"pod": label, "own": choice.own, "reason": choice.reason, "key": key,
            "built": built is not None, "path": str(built.path) if built else None}
    where = "its own environment" if choice.own else "the server's environment"
    state = f"built at {built.path}" if built else "not built (modelpod env build)"
    _emit(args, data, f"{label}: {where} ({choice.reason})\n  key {key[:12]}: {state}")
    return 0


def _build(args: argparse.Namespace, settings: Settings, cache: EnvCache) -> int:
    wheels = Path(args.wheel_cache).expanduser() if args.wheel_cache else settings.wheel_cache
    done: list[dict[str, Any]] = []
    for ref in args.refs:
        label, manifest = _manifest(settings, ref)
        env, built = cache.ensure(manifest.requirements, wheel_cache=wheels,
                                  imports=framework_imports(manifest.framework), what=label)
        done.append({"pod": label, "key": env.key, "path": str(env.path), "interpreter": str(env.python),
                     "built": built})
    _emit(args, done, "\n".join(f"{'built' if d['built'] else 'already built'} {d['pod']}: {d['key'][:12]}  "
                                f"{d['interpreter']}" for d in done))
    return 0


def _rm(args: argparse.Namespace, settings: Settings, cache: EnvCache) -> int:
    if args.all == bool(args.targets):
        raise UsageError("name environments (KEY, a key prefix, or a pod REF) or give --all, not both")
    envs = cache.list()
    chosen: list[Environment] = envs if args.all else [_pick(settings, envs, t) for t in args.targets]
    removed = [e.key for e in chosen if cache.remove(e.key)]
    _emit(args, {"removed": removed}, "\n".join(f"removed {k[:12]}" for k in removed) or "nothing to remove")
    return 0


def _pick(settings: Settings, envs: list[Environment], target: str) -> Environment:
    by_prefix = [e for e in envs if e.key.startswith(target.lower())] if len(target) >= 6 else []
    if len(by_prefix) > 1:
        raise UsageError(f"{target}: more than one environment has that key prefix; give more digits")
    if by_prefix:
        return by_prefix[0]
    try:
        label, manifest = _manifest(settings, target)
    except NotFoundError:
        raise NotFoundError(f"{target}: no environment has that key, and no pod has that name") from None
    key = lock_key(manifest.requirements)
    found = next((e for e in envs if e.key == key), None)
    if found is None:
        raise NotFoundError(f"{label}: its environment ({key[:12]}) is not built")
    return found
