"""Warehouse destinations: the Segment warehouse layout in PostgreSQL or DuckDB.

How an event becomes rows (one module per step):
  layout.py   a message -> rows for `tracks`, `<event>`, `identifies`, `users`, `pages`, ...,
              with context, properties and traits flattened to columns
  schema.py   names and the type evolution policy (what a value may do to a column)
  plan.py     a batch -> one Plan: schema changes, typed rows, rejected values, identities
  sql.py      the statements both databases share, and where their dialects differ
  postgres.py, duckdb.py   run a Plan in one transaction and classify what went wrong

Loads are idempotent on messageId (`INSERT ... ON CONFLICT (id) DO NOTHING`), so a
retry or a replay never doubles a row.
"""
