"""``python -m modelpod.deploy.seed --alias A``: put the image's pod into a store, under an alias.

The in-server canary's init containers run this, one from each pod's image, into the store in the
replica's ``/tmp`` (an ``emptyDir``): the server then serves ``NAME@stable`` and ``NAME@canary``
and its route splits between them. Store versions there are local to the replica; the aliases
are what the route names.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from modelpod.errors import ModelpodError
from modelpod.pod import Pod
from modelpod.store import PodRecord, Store

POD_DIR = Path("/opt/modelpod/pod")


def seed(home: Path, alias: str, pod_dir: Path = POD_DIR) -> PodRecord:
    """Add the pod at ``pod_dir`` (verified) to the store at ``home`` and point ``alias`` at it."""
    pod = Pod.open(pod_dir)
    store = Store(home)
    rec = store.add(pod.path, pod.manifest)
    return store.tag(rec.name, rec.version, alias)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modelpod.deploy.seed", description=__doc__)
    p.add_argument("--home", type=Path, default=Path("/tmp/modelpod"))
    p.add_argument("--alias", required=True)
    p.add_argument("--pod", type=Path, default=POD_DIR)
    args = p.parse_args(argv)
    try:
        rec = seed(args.home, args.alias, args.pod)
    except ModelpodError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{rec.name}@{args.alias} -> {rec.name}:{rec.version}  {rec.digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
