"""A chosen write key must work in every form README.md documents: Basic, Bearer, the
body, and the browser SDKs' settings URL (/v1/projects/<key>/settings)."""

from __future__ import annotations

import sqlite3

import pytest

from trackpipe.sources.catalog import Catalog


@pytest.fixture
def catalog(tmp_path):
    c = Catalog(tmp_path / "data")
    yield c
    c.close()


@pytest.mark.parametrize("key, rule", [
    (" sk_lead", "space at either end"),  # Bearer strips it: 400
    ("sk_trail ", "space at either end"),
    ("sk?x=1", "'?' or '#'"),  # the settings URL would end the path there: 404
    ("sk#frag", "'?' or '#'"),
    ("sk\tx", "not printable ASCII"),
    ("sk\x7fx", "not printable ASCII"),
    ("k" * 257, "257 characters long, over 256"),  # Basic is cut at the header cap: 431
])
def test_a_write_key_that_a_documented_form_cannot_carry_is_refused(catalog, key, rule):
    with pytest.raises(ValueError) as refused:
        catalog.add_source("web", key)
    assert rule in str(refused.value), str(refused.value)
    assert catalog.sources() == []


@pytest.mark.parametrize("key", ["team/web", "k%41x", "k x", "k" * 256, "sk_us_mykey"])
def test_keys_that_work_in_every_form_are_kept(catalog, key):
    assert catalog.add_source("web", key).write_key == key  # / and % work: test_settings.py
    assert [s.write_key for s in catalog.sources()] == [key]


def test_a_key_stored_before_the_rules_keeps_working(tmp_path):
    data = tmp_path / "data"
    Catalog(data).close()
    db = sqlite3.connect(data / "catalog.db")
    with db:
        db.execute("INSERT INTO sources VALUES ('src_old', 'old', ' old?key ', 1, 0, 0)")
    db.close()
    catalog = Catalog(data)
    try:
        assert [s.write_key for s in catalog.sources()] == [" old?key "]
        assert catalog.add_source("new", "fine").write_key == "fine"
    finally:
        catalog.close()
