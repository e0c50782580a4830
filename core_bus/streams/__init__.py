"""Redis Streams primitives shared by every reader and writer of the bus.

Pending-list reads (``pending``), reply parsing (``replies``), groups and their
XINFO (``groups``), dead-letter fields and writes (``deadletter``), the one
transient-error definition (``errors``), the blocking-read rule
(``blocking``), glob patterns (``patterns``), backoff and the once-per-change
connection log (``backoff``, ``connwatch``).
"""
