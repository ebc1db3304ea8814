"""The `identities` table through a real server, in PostgreSQL and DuckDB.

Each identifier an event names (userId, anonymousId, an alias's previousId, a
configured trait identifier) maps to the profile identity holds IT in. Each used
to get the event's profile (its userId's), so an anonymousId identity refused to
join a second userId was recorded under that second person, and previousIds and
trait identifiers had no row at all.
"""

from __future__ import annotations

import pytest

from delivery.faulty_rig import api
from destinations import test_warehouse_duckdb as dk
from destinations import test_warehouse_postgres as pg
from destinations.test_warehouse_postgres import DSN, admin, schema  # noqa: F401 (fixtures)
from identity.test_privacy import deliveries
from support import wait_for, write_config


@pytest.fixture(params=["postgres", "duckdb"])
def warehouse(request, tmp_path):
    """(destination settings, read: () -> {(identifier_type, identifier): profile_id})"""
    if request.param == "postgres":
        conn, name = request.getfixturevalue("admin"), request.getfixturevalue("schema")
        return {"dsn": DSN, "schema": name}, lambda: _mapped(pg.table(
            conn, name, "identities", "identifier_type, identifier, profile_id", "identifier"))
    path = tmp_path / "w.duckdb"
    return {"path": str(path)}, lambda: _mapped(dk.query(
        path, "SELECT identifier_type, identifier, profile_id FROM identities"))


def _mapped(rows: list[dict]) -> dict[tuple[str, str], str]:
    return {(r["identifier_type"], r["identifier"]): r["profile_id"] for r in rows}


def send(server, calls: list[tuple[str, dict]], total: int) -> None:
    for path, body in calls:
        assert server.post(f"/v1/{path}", body).status_code == 200
    wait_for(lambda: api(server, "/api/v1/destinations/warehouse").json()["delivered"] == total,
             timeout=60, what=f"{total} events loaded into the warehouse")


def profile(server, ident: str) -> dict:
    return api(server, f"/api/v1/profiles/{ident}").json()


def serve_with_email_identity(fresh_server, tmp_path, settings: dict):
    """A server loading the warehouse `settings` are for, with email as a trait identifier."""
    kind = "postgres" if "dsn" in settings else "duckdb"
    config = write_config(tmp_path / "trackpipe.toml",
                          [{"name": "warehouse", "type": kind, "settings": settings}],
                          identity={"enabled": True, "trait_identifiers": ["email"]})
    return fresh_server(config=config).start()


def test_each_identifier_maps_to_the_profile_identity_holds_it_in(fresh_server, tmp_path,
                                                                  warehouse):
    settings, identities = warehouse
    server = serve_with_email_identity(fresh_server, tmp_path, settings)
    send(server, [
        ("identify", {"userId": "u3", "anonymousId": "a3"}),
        ("identify", {"userId": "u4", "anonymousId": "a3"}),  # refused: distinct_user_ids
        ("alias", {"userId": "u3", "previousId": "old3"}),
        ("identify", {"userId": "u5", "traits": {"email": " Ann@Example.COM"}})], total=4)
    p3, p4, p5 = (profile(server, u)["profile_id"] for u in ("u3", "u4", "u5"))
    assert len({p3, p4, p5}) == 3
    assert profile(server, "a3")["anonymous_ids"] == ["a3", "old3"]
    assert identities() == {
        ("user_id", "u3"): p3, ("anonymous_id", "a3"): p3, ("anonymous_id", "old3"): p3,
        ("user_id", "u4"): p4,
        ("user_id", "u5"): p5, ("email", "ann@example.com"): p5}

    # an alias joins the two userIds: the next event naming u4 moves its row (upsert)
    send(server, [("alias", {"userId": "u3", "previousId": "u4"})], total=5)
    assert profile(server, "u4")["profile_id"] == p3
    assert identities()[("user_id", "u4")] == p3


def test_a_privacy_delete_removes_the_persons_trait_rows_and_no_one_elses(fresh_server,
                                                                         tmp_path, warehouse):
    # The delete took the trait rows mapped to a profile id of the person's userId and
    # anonymousId rows. Those ids are what each row was loaded with: after a merge the
    # person's email row kept the id merged away (left behind), and after an unmerge the
    # other person's email row kept the person's id (deleted).
    settings, identities = warehouse
    server = serve_with_email_identity(fresh_server, tmp_path, settings)
    send(server, [
        ("identify", {"userId": "uA", "anonymousId": "a1"}),
        ("identify", {"anonymousId": "a2", "traits": {"email": "ann@x.io"}}),
        ("identify", {"userId": "uB", "anonymousId": "b1", "traits": {"email": "bob@x.io"}}),
        ("alias", {"userId": "uA", "previousId": "uB"}),  # merges Bob into Ann
        ("identify", {"userId": "uB", "anonymousId": "b1", "traits": {"email": "bob@x.io"}})],
        total=5)
    send(server, [("identify", {"userId": "uA", "anonymousId": "a2"})], total=6)  # a2's too
    ann = profile(server, "uA")["profile_id"]
    assert identities()[("email", "bob@x.io")] == ann
    assert identities()[("email", "ann@x.io")] != ann  # loaded before a2 joined Ann
    [alias] = [m for m in api(server, f"/api/v1/profiles/{ann}/merges").json()["merges"]
               if m["rule"] == "alias"]
    unmerged = api(server, f"/api/v1/profiles/{ann}/unmerge", "POST",
                   json={"merge_id": alias["id"]})
    assert unmerged.status_code == 200, unmerged.text
    assert profile(server, "bob@x.io")["profile_id"] != ann

    done = api(server, "/api/v1/privacy/delete", "POST", json={"id": "uA"})
    assert done.status_code == 200 and done.json()["state"] == "done", done.text
    wait_for(lambda: deliveries(server, "SELECT state FROM delete_notices") == [("delivered",)],
             timeout=60, what="the delete notice carried out in the warehouse")
    assert set(identities()) == {("user_id", "uB"), ("anonymous_id", "b1"),
                                 ("email", "bob@x.io")}
