"""What the CLI commands that talk to a running server's admin API share: the client,
and what they print when the URL, the token, the server or its answer is not usable."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import httpx

NO_TOKEN = ("trackpipe: pass --admin-token or set TRACKPIPE_ADMIN_TOKEN to the server's admin"
            " token: the one printed once by the first `trackpipe serve` on its data dir, or"
            " the TRACKPIPE_ADMIN_TOKEN or `admin_token` (in the config file) that the server"
            " was started with.")


def add_server_args(p: argparse.ArgumentParser) -> None:
    """--url and --admin-token. The token's help names the variable, never its value:
    --help must not print a secret read from the environment."""
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="the running server's URL (default %(default)s)")
    p.add_argument("--admin-token", default=os.environ.get("TRACKPIPE_ADMIN_TOKEN"),
                   help="the server's admin token (default: $TRACKPIPE_ADMIN_TOKEN, which,"
                        " unlike this flag, does not show in `ps`)")


def run(url: str, token: str | None, timeout: float, work: Callable[[httpx.Client], int]) -> int:
    """`work(client)`'s exit status, or 1/2 with a message instead of a traceback."""
    if not token:
        print(NO_TOKEN, file=sys.stderr)
        return 2
    if not (token.isascii() and token.isprintable()):
        print("trackpipe: the admin token must be printable ASCII (it travels in an HTTP"
              " header)", file=sys.stderr)
        return 2
    try:
        client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                              headers={"authorization": f"Bearer {token}"})
    except httpx.InvalidURL as exc:  # not an HTTPError: nothing was sent
        print(f"trackpipe: --url {url!r} is not a valid URL: {exc}", file=sys.stderr)
        return 2
    try:
        return work(client)
    except httpx.HTTPError as exc:
        print(f"trackpipe: could not reach {url}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError) as exc:  # JSON that is not the admin API's
        print(f"trackpipe: {url} did not answer like trackpipe's admin API ({exc!r}); check"
              " --url", file=sys.stderr)
        return 1
    finally:
        client.close()
