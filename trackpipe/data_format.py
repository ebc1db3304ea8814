"""The data dir's format number: which trackpipe versions can read what it holds.

A plain file, `<data dir>/format`, holding one integer. One place for the whole dir (its
SQLite files migrate each on its own when opened), readable with `cat`, and read before
any SQLite file is opened, so a refusal changes nothing. A `PRAGMA user_version` of
log.db would be read only by opening log.db, which a refused start must not touch, and
would say nothing of a dir whose log.db is not made yet.

Raise FORMAT whenever a version writes something an older one would misread. A dir
without the file was written before it existed: format 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from trackpipe.errors import StartFailed

FORMAT = 2
"""1: before the format file. 2: profiles' trait rows of a new shape, delivery rows an
older version misreads, delete notices naming trait identifiers (an older version
answered 500 to such profiles and left the notices' emails on disk)."""

MARKER = "format"


def refuse_newer(data: Path) -> None:
    found = read(data)
    if found > FORMAT:
        raise StartFailed(
            f"this data dir was written by a newer trackpipe (format {found}; this one reads"
            f" up to {FORMAT}): run that version, or restore a backup taken before the"
            f" upgrade.")


def read(data: Path) -> int:
    """The dir's format: 1 when it has no marker (written before it, or not made yet)."""
    path = data / MARKER
    try:
        text = path.read_text(encoding="ascii")
    except (FileNotFoundError, NotADirectoryError):  # no dir yet: making it says what is wrong
        return 1
    except (OSError, UnicodeDecodeError) as exc:
        raise StartFailed(f"{path} cannot be read ({exc}); it holds the data dir's format"
                          f" number (this trackpipe writes {FORMAT}).") from None
    if not text.strip().isdigit():
        raise StartFailed(f"{path} holds {text.strip()[:40]!r}, not the data dir's format"
                          f" number (this trackpipe writes {FORMAT}); put back the file from"
                          f" a backup, or write {FORMAT} in it if this version wrote the dir.")
    return int(text)


def mark(data: Path) -> None:
    """Write this version's number when the dir's is lower: from now on an older trackpipe
    that knows the marker refuses the dir. Written whole (a new file renamed over)."""
    if read(data) >= FORMAT:
        return
    # A name of its own: a CLI command may mark the dir while the server does.
    path, new = data / MARKER, data / f"{MARKER}.{os.getpid()}.new"
    with open(new, "w", encoding="ascii") as f:
        # Readable by the dir's owner whoever writes it (root running a CLI command on a
        # service user's dir, any umask): else that owner's trackpipe could not start.
        os.fchmod(f.fileno(), 0o644)
        owner = os.stat(data)
        if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
            os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
        f.write(f"{FORMAT}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(new, path)
    directory = os.open(data, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)
