"""Conformance sink for the segment (forwarding) destination: a local /v1/batch endpoint."""

from __future__ import annotations

from pathlib import Path

from destinations.vendor_mocks import SegmentMock


class Sink:
    def __init__(self, tmp_path: Path):
        self.mock = SegmentMock(write_key="sink-write-key")

    def config(self, name: str) -> dict:
        return {"name": name, "type": "segment",
                "settings": {"write_key": "sink-write-key", "api_url": self.mock.url,
                             "allow_private_targets": True}}

    def received(self) -> list[str]:
        return self.mock.received()

    def break_(self, terminal: bool = False) -> None:
        self.mock.break_(terminal)  # 503, or 400

    def heal(self) -> None:
        self.mock.heal()

    def close(self) -> None:
        self.mock.close()
