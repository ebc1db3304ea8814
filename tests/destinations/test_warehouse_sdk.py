"""The Postgres warehouse end to end: real SDKs -> trackpipe -> the real PostgreSQL.

segment-analytics-python, customerio-cdp-analytics and @segment/analytics-node
each make one identify, track, page, screen, group and alias call
(tests/compat). The rows and columns must be the Segment warehouse layout, the
`identities` table must map each identifier to its profile, and replaying the
same range twice must not add a single row.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from datetime import UTC, datetime

import pytest

from compat import python_clients
from compat.test_sdks import NODE_DIR, SEND_MJS
from delivery.faulty_rig import api
from destinations.test_warehouse_postgres import DSN, admin, schema  # noqa: F401 (fixtures)
from support import REQUIRE_SERVICES, wait_for, write_config

TABLES = ("identifies", "tracks", "order_completed", "pages", "screens", "groups", "aliases")


def segment_node(url: str, key: str, run: str) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@segment" / "analytics-node").is_dir():
        reason = "node or @segment/analytics-node is missing: run ./scripts/test.sh"
        pytest.fail(reason) if REQUIRE_SERVICES else pytest.skip(reason)
    proc = subprocess.run([node, str(SEND_MJS), "segment-node", url, key, run],
                          capture_output=True, text=True, timeout=60, cwd=NODE_DIR)
    assert proc.returncode == 0, proc.stderr[-2000:]


SENDERS = {
    "segment-python": lambda url, key, run: python_clients.send_segment_python(url, key, run),
    "cio-python": lambda url, key, run: python_clients.send_cio_python(url, key, run),
    "segment-node": segment_node,
}


def rows(admin, schema, table, where="true", columns="*"):  # noqa: F811
    cur = admin.execute(f'SELECT {columns} FROM "{schema}"."{table}" WHERE {where}')
    names = [d.name for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def count_all(admin, schema) -> dict[str, int]:  # noqa: F811
    return {t: admin.execute(f'SELECT count(*) FROM "{schema}"."{t}"').fetchone()[0]
            for t in TABLES}


def test_real_sdks_load_the_segment_layout_and_replays_add_no_rows(fresh_server, tmp_path,
                                                                   admin, schema):  # noqa: F811
    config = write_config(tmp_path / "trackpipe.toml", [
        {"name": "warehouse", "type": "postgres", "settings": {"dsn": DSN, "schema": schema}}],
        identity={"enabled": True})
    server = fresh_server(config=config).start()
    started = datetime.now(UTC).isoformat()
    runs = {name: uuid.uuid4().hex[:10] for name in SENDERS}
    for name, run in runs.items():
        result = SENDERS[name](server.url, server.write_key, run)
        assert not (result and result.errors), result
    stored = len(server.events())
    assert stored == 6 * len(SENDERS)
    wait_for(lambda: api(server, "/api/v1/destinations/warehouse").json()["delivered"] == stored,
             timeout=60, what="every event loaded into PostgreSQL")

    for name, run in runs.items():
        user, anon = f"u-{run}", f"anon-{run}"
        [identify] = rows(admin, schema, "identifies", f"user_id = '{user}'")
        assert identify["email"] == f"{run}@example.com" and identify["name"] == "Ada", name
        [track] = rows(admin, schema, "tracks", f"user_id = '{user}'")
        assert track["event"] == "order_completed" and track["event_text"] == "Order Completed"
        [order] = rows(admin, schema, "order_completed", f"user_id = '{user}'")
        assert float(order["revenue"]) == 9.99 and order["currency"] == "USD"
        assert order["order_id"] == f"o-{run}" and order["context_library_name"]
        [page] = rows(admin, schema, "pages", f"user_id = '{user}'")
        assert page["name"] == "Intro" and page["path"] == "/x"
        [screen] = rows(admin, schema, "screens", f"anonymous_id = '{anon}'")
        assert screen["name"] == "Home"
        [group] = rows(admin, schema, "groups", f"user_id = '{user}'")
        assert group["group_id"] == f"g-{run}" and group["name"] == "Acme"
        [alias] = rows(admin, schema, "aliases", f"user_id = '{user}'")
        assert alias["previous_id"] == anon
        [person] = rows(admin, schema, "users", f"id = '{user}'")
        assert person["email"] == f"{run}@example.com"
        ids = {r["identifier"]: r["profile_id"] for r in rows(
            admin, schema, "identities", f"identifier IN ('{user}', '{anon}')")}
        assert set(ids) == {user, anon} and len(set(ids.values())) == 1, ids  # alias joined them

    column_types = dict(admin.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'order_completed'", (schema,)).fetchall())
    assert column_types["revenue"] in ("double precision", "numeric")
    assert column_types["timestamp"].startswith("timestamp")

    before = count_all(admin, schema)
    assert before["tracks"] == len(SENDERS)
    for _ in range(2):
        r = api(server, "/api/v1/destinations/warehouse/replay", "POST", json={"since": started})
        assert r.status_code == 200 and r.json()["queued"] == stored, r.text
        wait_for(lambda: api(server, "/api/v1/destinations/warehouse").json()["pending"] == 0,
                 timeout=60, what="the replay loaded")
    assert count_all(admin, schema) == before
    dupes = admin.execute(f'SELECT id FROM "{schema}".tracks GROUP BY id HAVING count(*) > 1')
    assert dupes.fetchall() == []
