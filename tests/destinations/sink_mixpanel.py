"""Conformance sink for the mixpanel destination: a local Mixpanel Import/Engage API."""

from __future__ import annotations

from pathlib import Path

from destinations.vendor_mocks import MixpanelMock


class Sink:
    def __init__(self, tmp_path: Path):
        self.mock = MixpanelMock(token="sink-token")

    def config(self, name: str) -> dict:
        return {"name": name, "type": "mixpanel",
                "settings": {"project_token": "sink-token", "api_url": self.mock.url,
                             "allow_private_targets": True}}

    def received(self) -> list[str]:
        return self.mock.received()

    def break_(self, terminal: bool = False) -> None:
        self.mock.break_(terminal)  # 503, or 401 as for a revoked token

    def heal(self) -> None:
        self.mock.heal()

    def close(self) -> None:
        self.mock.close()
