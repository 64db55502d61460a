"""Keep requirements*.lock in step with what it was resolved from.

`make lock` writes each lock with a first line ``# inputs-sha256: <digest>``: the digest of what
the resolution read (the dependency tables of pyproject.toml, constraints.txt, excludes.txt).
`make install` and `make test` run ``check``: a lock whose digest differs was made from other
inputs, so a fresh install would not get what pyproject.toml asks for.

    python .ci/lockfile.py digest          print the digest of the current inputs
    python .ci/lockfile.py stamp LOCK...   write the digest line at the top of each lock
    python .ci/lockfile.py check LOCK...   exit 1, saying to run `make lock`, on a mismatch
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "# inputs-sha256: "


def digest() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    inputs = {
        "build-system": project.get("build-system", {}),
        "requires-python": project["project"].get("requires-python"),
        "dependencies": project["project"].get("dependencies", []),
        "optional-dependencies": project["project"].get("optional-dependencies", {}),
        "constraints.txt": (ROOT / "constraints.txt").read_text(),
        "excludes.txt": (ROOT / "excludes.txt").read_text(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def stamp(lock: Path) -> None:
    lines = [line for line in lock.read_text().splitlines() if not line.startswith(PREFIX)]
    lock.write_text("\n".join([PREFIX + digest(), *lines]) + "\n")


def check(lock: Path) -> str | None:
    if not lock.exists():
        return f"{lock.name} is missing: run `make lock`"
    first = lock.read_text().split("\n", 1)[0]
    if first != PREFIX + digest():
        return (
            f"{lock.name} was not made from the current pyproject.toml, constraints.txt and "
            "excludes.txt: run `make lock` and commit the new lock"
        )
    return None


def main(argv: list[str]) -> int:
    if argv[:1] == ["digest"]:
        print(digest())
        return 0
    if len(argv) >= 2 and argv[0] in ("stamp", "check"):
        locks = [ROOT / name for name in argv[1:]]
        if argv[0] == "stamp":
            for lock in locks:
                stamp(lock)
            return 0
        problems = [p for p in map(check, locks) if p]
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
