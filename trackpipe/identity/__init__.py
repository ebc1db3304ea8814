"""Identity: anonymous visitors stitched to known people, and their profiles.

graph.py holds the merge rules, facts.py reads log entries, profiles.py folds a
profile from its identifiers' contributions, store.py is the interface,
sql_store.py (+ reads.py, repair.py) the shared SQL implementation behind
sqlite_store.py and postgres_store.py, consumer.py the loop that feeds the log in.
"""
