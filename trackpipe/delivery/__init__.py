"""Delivery: from the log to each destination."""
