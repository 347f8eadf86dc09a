"""The requirements setup.py declares, read without running it: `python scripts/requirements.py
[EXTRA ...]` prints install_requires and the named extras, one a line (scripts/install.sh installs
them; tests/test_requirements.py checks them against dualner's imports)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def declared(setup: Path = SETUP) -> tuple[list[str], dict[str, list[str]]]:
    """(install_requires, extras_require) of the setup() call in `setup`."""
    for node in ast.walk(ast.parse(setup.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords
                        if keyword.arg in ("install_requires", "extras_require")}
            return keywords.get("install_requires", []), keywords.get("extras_require", {})
    raise SystemExit(f"{setup}: no setup() call")


if __name__ == "__main__":
    runtime, extras = declared()
    unknown = [name for name in sys.argv[1:] if name not in extras]
    if unknown:
        raise SystemExit(f"unknown extra {unknown[0]!r}; setup.py declares {', '.join(extras)}")
    print("\n".join(dict.fromkeys([*runtime, *(r for name in sys.argv[1:] for r in extras[name])])))
