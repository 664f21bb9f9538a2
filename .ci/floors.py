"""Print pip constraints that pin every runtime dependency to its declared floor.

``make test-floors`` installs the project with these constraints (``name>=X`` in
pyproject.toml's ``[project] dependencies`` becomes ``name==X``), so the floors that
pyproject.toml declares are the versions the floor subset of the tests runs on.
"""

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FLOOR = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*(?P<version>[0-9][^,;\s]*)")


def constraints() -> list[str]:
    with PYPROJECT.open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = []
    for dependency in dependencies:
        m = FLOOR.fullmatch(dependency)
        if m is None:
            sys.exit(f"pyproject.toml: dependency {dependency!r} needs a plain 'name>=X' floor")
        pins.append(f"{m['name']}=={m['version']}")
    return pins


if __name__ == "__main__":
    print("\n".join(constraints()))
