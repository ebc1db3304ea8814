"""Conformance sink for the file destination: a directory of NDJSON files.

Breaking it moves the directory aside (a vanished mount: the destination retries)
or, for good, puts a plain file where the directory was ("not a directory": the
destination fails the events). Healing moves the directory back.
"""

from __future__ import annotations

import json
import shutil
import threading
import zlib
from pathlib import Path


class Sink:
    def __init__(self, tmp_path: Path):
        self.dir = Path(tmp_path) / "files"
        self.aside = Path(tmp_path) / "files.aside"
        self.dir.mkdir(parents=True)
        self.lock = threading.Lock()

    def config(self, name: str) -> dict:
        return {"name": name, "type": "file", "settings": {"directory": str(self.dir)}}

    def received(self) -> list[str]:
        with self.lock:
            where = self.dir if self.dir.is_dir() else self.aside
            return [m["messageId"] for path in sorted(where.glob("*.ndjson*"))
                    for m in read_messages(path)]

    def break_(self, terminal: bool = False) -> None:
        with self.lock:
            if self.dir.is_dir():
                self.dir.rename(self.aside)
            if terminal:
                self.dir.write_text("not a directory\n")

    def heal(self) -> None:
        with self.lock:
            if self.dir.is_file():
                self.dir.unlink()
            if self.aside.is_dir():
                self.aside.rename(self.dir)

    def close(self) -> None:
        shutil.rmtree(self.aside, ignore_errors=True)


def read_messages(path: Path) -> list[dict]:
    """The whole lines of an NDJSON file (plain or gzip members); a line still being
    written, or a gzip member cut short, is left for the next read."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gunzip_members(raw)
    lines = raw.split(b"\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def gunzip_members(raw: bytes) -> bytes:
    out = []
    while raw:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            data = d.decompress(raw)
        except zlib.error:
            break
        if not d.eof:
            break  # the last member is still being written (or was cut by a crash)
        out.append(data)
        raw = d.unused_data
    return b"".join(out)



