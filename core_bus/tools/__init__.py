"""The ``ag1-bus`` tools: command line (``cli``), tail, dead-letter commands (``dlq``)."""
