"""Conformance sink for the amplitude destination: a local Amplitude HTTP V2 API."""

from __future__ import annotations

from pathlib import Path

from destinations.vendor_mocks import AmplitudeMock


class Sink:
    def __init__(self, tmp_path: Path):
        self.mock = AmplitudeMock(api_key="sink-api-key")

    def config(self, name: str) -> dict:
        return {"name": name, "type": "amplitude",
                "settings": {"api_key": "sink-api-key", "api_url": self.mock.url,
                             "allow_private_targets": True}}

    def received(self) -> list[str]:
        return self.mock.received()

    def break_(self, terminal: bool = False) -> None:
        self.mock.break_(terminal)  # 503, or 400 "Invalid API key"

    def heal(self) -> None:
        self.mock.heal()

    def close(self) -> None:
        self.mock.close()
