"""Where the analytics-next browser build comes from: the npm package, never a CDN."""

from __future__ import annotations

import json
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parents[1] / "compat" / "node"
PACKAGE_DIR = NODE_DIR / "node_modules" / "@segment" / "analytics-next"
UMD_DIR = PACKAGE_DIR / "dist" / "umd"


def missing_reason() -> str | None:
    """Why the bundle cannot be served, or None when it can."""
    if not (UMD_DIR / "index.js").is_file():
        return (f"@segment/analytics-next is not installed in {NODE_DIR}: "
                "run `npm install` there (scripts/test.sh does)")
    return None


def version() -> str:
    return json.loads((PACKAGE_DIR / "package.json").read_text())["version"]


def umd_file(name: str) -> Path | None:
    """A file of dist/umd by its bare name (index.js, <chunk>.bundle.<hash>.js), or None."""
    if "/" in name or name.startswith("."):
        return None
    path = UMD_DIR / name
    return path if path.is_file() else None
