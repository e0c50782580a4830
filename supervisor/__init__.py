"""AG1 Fleet supervisor: runs, watches and rebalances a fleet of bus agents."""

__version__ = "0.1.0"
