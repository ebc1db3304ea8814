"""Where the browser SDK builds come from: the npm packages, never a CDN.

Both UMD builds (``dist/umd/index.js``) set ``window.AnalyticsNext`` and take
the same ``AnalyticsBrowser.load({writeKey, cdnURL}, options)`` (wire-protocol.md §6.4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parents[1] / "compat" / "node"


@dataclass(frozen=True)
class Bundle:
    package: str  # the npm name, as in tests/compat/node/package.json

    @property
    def package_dir(self) -> Path:
        return NODE_DIR / "node_modules" / self.package

    @property
    def umd_dir(self) -> Path:
        return self.package_dir / "dist" / "umd"

    def missing_reason(self) -> str | None:
        """Why the bundle cannot be served, or None when it can."""
        if not (self.umd_dir / "index.js").is_file():
            return (f"{self.package} is not installed in {NODE_DIR}: "
                    "run `npm install` there (scripts/test.sh does)")
        return None

    def version(self) -> str:
        return json.loads((self.package_dir / "package.json").read_text())["version"]

    def umd_file(self, name: str) -> Path | None:
        """A file of dist/umd by its bare name (index.js, a chunk), or None."""
        if "/" in name or name.startswith("."):
            return None
        path = self.umd_dir / name
        return path if path.is_file() else None


ANALYTICS_NEXT = Bundle("@segment/analytics-next")
CIO_BROWSER = Bundle("@customerio/cdp-analytics-browser")

