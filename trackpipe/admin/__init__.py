"""The admin/query API: what is in the log, and what became of any messageId."""
