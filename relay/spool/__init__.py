"""The spool: Postfix-style state directories under one root, the record format and queue
ids, the group commit that shares flushes, and the operator's queue operations."""
