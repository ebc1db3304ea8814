"""A PostgreSQL password never shows: not in a config error, not in a delivery's error text.

libpq quotes the token it cannot parse, and in a connection string with a stray
`%` that token is the password (trackpipe/dsn.py).
"""

from __future__ import annotations

import subprocess
import sys

import msgspec
import psycopg
import pytest
from support import write_config

from trackpipe.destinations.warehouse.postgres import PostgresWarehouse
from trackpipe.dsn import MASK, scrub

BAD_DSNS = ["postgresql://app:Sup3r%Secret@db.internal/analytics",
            "postgresql://u:LEAKPW@[::1:5432/db",
            "host=db password='LEAKPW unterminated"]


@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_a_dsn_libpq_cannot_parse_is_refused_without_echoing_it(dsn):
    with pytest.raises(msgspec.ValidationError) as exc:
        msgspec.convert({"dsn": dsn}, PostgresWarehouse.Settings)
    assert "not a valid libpq connection string" in str(exc.value)
    assert "Secret" not in str(exc.value) and "LEAKPW" not in str(exc.value)


@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_libpq_error_text_is_scrubbed_of_the_password(dsn):
    with pytest.raises(psycopg.Error) as exc:
        psycopg.conninfo.conninfo_to_dict(dsn)
    shown = scrub(str(exc.value), dsn)
    assert "Secret" not in shown and "LEAKPW" not in shown, shown


def test_a_valid_dsn_password_is_scrubbed_as_written_and_as_decoded():
    dsn = "postgresql://app:p%40ssw0rd@db/analytics"
    text = f"failed for {dsn}: password p@ssw0rd and p%40ssw0rd"
    assert scrub(text, dsn) == f"failed for {MASK}: password {MASK} and {MASK}"
    assert scrub("rejected password=hunter22 for app", "host=db user=app password=hunter22"
                 ) == f"rejected password={MASK} for app"


def test_classified_errors_of_the_destination_carry_no_password():
    dest = PostgresWarehouse("pg", PostgresWarehouse.Settings(dsn="host=db password=hunter22"))
    outcome = dest._classify(psycopg.OperationalError('bad "hunter22" here'))
    assert "hunter22" not in outcome.detail and MASK in outcome.detail


def test_trackpipe_check_refuses_the_config_and_keeps_the_password_out(tmp_path):
    cfg = write_config(tmp_path / "t.toml", [{"name": "pg", "type": "postgres", "settings": {
        "dsn": "postgresql://app:Sup3r%Secret@db.internal/analytics"}}])
    r = subprocess.run([sys.executable, "-m", "trackpipe", "check", "--config", str(cfg),
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not a valid libpq connection string" in r.stderr
    assert "Secret" not in r.stdout + r.stderr
