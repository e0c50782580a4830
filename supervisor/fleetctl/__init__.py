"""Fleet-wide control across hosts: the command stream, its follower, the
host-by-host roll and the fleet view."""
