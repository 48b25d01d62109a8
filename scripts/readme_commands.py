"""Print the commands README.md tells a new user to run, one per line, exactly as written.

README.md marks each such code block with an HTML comment on the line before its fence:

    <!-- readme-command: setup -->      install + first run
    <!-- readme-command: evaluate -->   evaluate the encoder
    <!-- readme-command: test -->       the test suite

`python scripts/readme_commands.py setup test` prints the lines of those blocks, in README order.
.ci/run and scripts/newcomer_check.sh run what this prints, so neither can drift from README.md.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
KINDS = ("setup", "evaluate", "test")
_TAG = re.compile(r"^<!-- readme-command: (\w+) -->\s*$")


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(kind, command) for every line of every tagged code block, in README order."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        tag = _TAG.match(lines[i])
        i += 1
        if not tag:
            continue
        kind = tag.group(1)
        if kind not in KINDS:
            raise ValueError(f"README.md: unknown readme-command kind {kind!r} (known: {', '.join(KINDS)})")
        if i >= len(lines) or not lines[i].startswith("```"):
            raise ValueError(f"README.md: the readme-command: {kind} tag must sit right above a ``` block")
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            if lines[i].strip():
                out.append((kind, lines[i].strip()))
            i += 1
        i += 1
    return out


def main(argv: list[str]) -> int:
    kinds = argv or list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        print(f"readme_commands: unknown kind {unknown[0]!r} (known: {', '.join(KINDS)})", file=sys.stderr)
        return 2
    try:
        commands = readme_commands(README.read_text(encoding="utf-8"))
    except ValueError as exc:
        print(f"readme_commands: {exc}", file=sys.stderr)
        return 2
    for kind in kinds:
        if not any(k == kind for k, _ in commands):
            print(f"readme_commands: README.md has no readme-command: {kind} block", file=sys.stderr)
            return 2
    for kind, command in commands:
        if kind in kinds:
            print(command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
