"""Helpers for `bash launch.sh test --latest`, the dependency drift check.

    python requirements/drift.py names EXTRAS [--hold PKG ...]   sdtune's requirement names, no versions
    python requirements/drift.py report LOCK [--newest PKG ...]  what this environment has that LOCK does not

``names`` reads the requirements of the installed sdtune (install it with
``--no-deps`` first), follows self-references such as ``sdtune[hf,bnb]`` and
prints the bare names, so pip can install the newest release of each,
whatever the upper bounds in pyproject.toml say. ``report`` compares the
installed versions with a lock written by ``bash launch.sh lock``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?")
EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(extras: set[str], hold: set[str]) -> list[str]:
    """Names sdtune needs with ``extras``: the base requirements and each extra's, recursively."""
    wanted, seen, names = set(extras), set(), []
    requirements = metadata.requires("sdtune") or []
    while wanted - seen:
        seen |= wanted
        for line in requirements:
            requirement, _, marker = line.partition(";")
            extra = EXTRA.search(marker)
            if extra and extra.group(1) not in wanted:
                continue
            name, nested = NAME.match(requirement).groups()
            if normalise(name) == "sdtune":
                wanted |= {e.strip() for e in (nested or "").split(",") if e.strip()}
            elif normalise(name) not in hold and name not in names:
                names.append(name)
    return names


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    with open(path, encoding="utf-8") as lock:
        for line in lock:
            match = PIN.match(line)
            if match:
                pins[normalise(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    return {normalise(d.metadata["Name"]): d.version for d in metadata.distributions() if normalise(d.metadata["Name"]) != "sdtune"}


def newest_release(name: str) -> str | None:
    """The newest release pip can see for ``name`` (``pip index versions``), or None."""
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True)
    match = re.search(rf"^{re.escape(name)} \(([^)]+)\)", result.stdout, re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match else None


def report(lock_path: str, newest: list[str]) -> str:
    locked, now = read_lock(lock_path), installed()
    rows = [(name, locked.get(name, "-"), now.get(name, "-")) for name in sorted(locked.keys() | now.keys())]
    rows = [row for row in rows if row[1] != row[2] and row[0] not in ("pip",)]
    lines = [f"dependency drift: this environment against {lock_path}"]
    if rows:
        width = max(len(name) for name, _, _ in rows)
        lines += [f"  {'package':<{width}}  {'locked':>14}  {'newest':>14}"]
        lines += [f"  {name:<{width}}  {lock:>14}  {new:>14}" for name, lock, new in rows]
    else:
        lines.append("  no differences: the lock already has the newest releases")
    for name in newest:
        release = newest_release(name)
        lines.append(f"  {name} held at the lock's {locked.get(normalise(name), '?')} (newest release: {release or 'unknown'}); "
                     f"SDTUNE_LATEST_TORCH=1 tests the newest")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    names = commands.add_parser("names")
    names.add_argument("extras", help="comma-separated extras, e.g. dev")
    names.add_argument("--hold", nargs="*", default=[], help="names to leave out (installed at the lock's version)")
    diff = commands.add_parser("report")
    diff.add_argument("lock")
    diff.add_argument("--newest", nargs="*", default=[], help="held packages whose newest release to look up")
    args = parser.parse_args()
    if args.command == "names":
        print("\n".join(requirement_names({e for e in args.extras.split(",") if e}, {normalise(h) for h in args.hold})))
    else:
        print(report(args.lock, args.newest))


if __name__ == "__main__":
    main()
