"""trackpipe: a self-hosted customer data pipeline speaking the Segment tracking API.

An event travels: sources/ (HTTP tracking API) -> pipeline/ (decode, validate,
enrich, dedupe) -> log/ (the durable, ordered event log) -> consumers
(admin/ query API today; identity and destinations read the same log).
"""

__version__ = "0.1.0"
