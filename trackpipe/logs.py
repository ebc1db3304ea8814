"""How trackpipe's processes log: one format, and other libraries' per-request lines off.

httpx logs every request it sends at INFO ("HTTP Request: POST ... 200 OK"): a line
per delivery request, hundreds a second under load, saying nothing a delivery's own
record (GET /api/v1/events/{messageId}/deliveries) does not. Anything it logs above INFO
still shows.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
QUIET = ("httpx", "httpcore")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
