"""Write constraints.txt from a venv's `pip freeze` (scripts/refresh_constraints.sh calls it after a green CI run).

    python -m scripts.write_constraints FREEZE_FILE [-o constraints.txt]
    python -m scripts.write_constraints --build WHEEL_DIR -o build-constraints.txt

Drops the project itself (the editable install) and the local-version label of the CPU torch wheel (`2.13.0+cpu`
→ `2.13.0`, which pip matches against either build)."""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

HEADER = """\
# The exact package set that the project's CI last passed with: scripts/setup.sh installs with `-c constraints.txt`
# (and build-constraints.txt for the op library's build backend), so both README commands and CI get these versions.
# Written by `bash scripts/refresh_constraints.sh` ({date}): it installs the newest versions pyproject.toml allows in a
# fresh clone, runs CI there (`CI=true bash .ci/run`), and rewrites this file only if that run passed.
"""
BUILD_HEADER = """\
# The op library's build backend (pyproject.toml [build-system]), pinned like constraints.txt; scripts/setup.sh passes
# it as --build-constraint. CMake and Ninja come from the system. Written by `bash scripts/refresh_constraints.sh` ({date}).
"""


def constraints(freeze: str) -> list[str]:
    lines = []
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("-e ") or " @ " in line:
            continue
        name, _, version = line.partition("==")
        if not version:
            raise SystemExit(f"write_constraints: not a pinned requirement: {line!r}")
        if name.lower() == "qcompiler":
            continue
        lines.append(f"{name}=={re.sub(r'[+].*$', '', version)}")
    return sorted(lines, key=str.lower)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.write_constraints", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="output of `pip freeze --all` in the tested venv (or, with --build, a "
                   "folder of the build backend's wheels as `pip download` left them)")
    p.add_argument("--build", action="store_true", help="SOURCE is a folder of wheels")
    p.add_argument("-o", "--output", type=Path, default=Path("constraints.txt"))
    args = p.parse_args(argv)
    if args.build:
        freeze = "\n".join("==".join(w.name.split("-")[:2]) for w in sorted(args.source.glob("*.whl")))
    else:
        freeze = args.source.read_text()
    body = constraints(freeze)
    header = BUILD_HEADER if args.build else HEADER
    args.output.write_text(header.format(date=datetime.date.today().isoformat()) + "\n".join(body) + "\n")
    print(f"wrote {args.output} ({len(body)} packages)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
