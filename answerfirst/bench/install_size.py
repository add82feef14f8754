"""How much each install of answerfirst weighs: `python -m answerfirst.bench.install_size [EXTRA ...]`.

For `answerfirst[EXTRA]` it walks the dependency closure in this environment's package metadata (the
requirements of answerfirst with those extras, then of each requirement, with the extras each names)
and sums the sizes of the files each distribution installed (its RECORD). Run it in the venv `make
venv` builds, which holds every extra; an extra's packages that are not installed are reported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


@dataclass(frozen=True)
class InstallSize:
    extras: tuple[str, ...]
    distributions: tuple[str, ...]  # canonical names, sorted
    missing: tuple[str, ...]  # required but not installed here
    bytes: int


def closure(extras: tuple[str, ...], root: str = "answerfirst") -> tuple[set[str], set[str]]:
    """(installed distributions, missing ones) that `root[extras]` pulls in, root included."""
    found: set[str] = set()
    missing: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.add(key[0])
            continue
        found.add(key[0])
        for line in dist.requires or []:
            requirement = Requirement(line)
            environments = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return found, missing


def install_size(extras: tuple[str, ...]) -> InstallSize:
    found, missing = closure(extras)
    total = 0
    for name in found:
        dist = metadata.distribution(name)
        for file in dist.files or []:
            path = Path(dist.locate_file(file))
            if path.is_file():
                total += path.stat().st_size
    return InstallSize(extras, tuple(sorted(found)), tuple(sorted(missing)), total)


def main(argv: list[str] | None = None) -> int:
    for spec in (sys.argv[1:] if argv is None else argv) or [""]:
        size = install_size(tuple(e for e in spec.split(",") if e))
        label = f"answerfirst[{spec}]" if spec else "answerfirst"
        note = f"  (not installed here: {', '.join(size.missing)})" if size.missing else ""
        print(f"{label:28s} {size.bytes / 2**20:8.1f} MiB in {len(size.distributions)} distributions{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
