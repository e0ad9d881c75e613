#!/usr/bin/env python3
"""Copy the CRDs from crds/ (the source of truth) into charts/tandem/crds/ and tandem/operator/crds/.

    python scripts/sync_crds.py            # copy (what `make sync-crds` runs)
    python scripts/sync_crds.py --check    # exit 1 and list the files that differ (CI, tests)

Helm installs files in a chart's crds/ before its templates and never templates them, so they must be
plain copies; a test fails when they drift. The operator validates specs against the package's copy (the
image holds only the package).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (ROOT / "charts" / "tandem" / "crds", ROOT / "tandem" / "operator" / "crds")


def drift(source: Path, target: Path) -> list[str]:
    """Names of CRD files missing, different or extra in ``target`` compared to ``source``."""
    wanted = {p.name: p.read_bytes() for p in sorted(source.glob("*.yaml"))}
    present = {p.name: p.read_bytes() for p in sorted(target.glob("*.yaml"))} if target.is_dir() else {}
    return sorted(name for name in wanted.keys() | present.keys() if wanted.get(name) != present.get(name))


def sync(source: Path, target: Path) -> list[str]:
    """Make ``target`` an exact copy of ``source``'s CRD files; returns what changed."""
    changed = drift(source, target)
    target.mkdir(parents=True, exist_ok=True)
    for name in changed:
        src, dst = source / name, target / name
        if src.exists():
            shutil.copyfile(src, dst)
        else:
            dst.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "crds")
    parser.add_argument("--target", type=Path, action="append", default=None,
                        help="a directory to keep in sync (repeatable; default: the chart's and the package's)")
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if any")
    args = parser.parse_args(argv)
    if not any(args.source.glob("*.yaml")):
        print(f"no CRDs in {args.source}", file=sys.stderr)
        return 2
    targets = args.target or list(TARGETS)
    if args.check:
        differing = [(target, name) for target in targets for name in drift(args.source, target)]
        for target, name in differing:
            print(f"drift: {target / name} differs from {args.source / name}; run `make sync-crds`",
                  file=sys.stderr)
        return 1 if differing else 0
    for target in targets:
        for name in sync(args.source, target):
            print(f"synced {name} into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
