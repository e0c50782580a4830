"""A handler module that fails at import time (config test fixture)."""

raise RuntimeError("boom at import")
