"""Privacy operations: suppress a person at ingest, erase them everywhere, audit both."""
