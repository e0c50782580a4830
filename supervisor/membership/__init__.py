"""Fleet membership across hosts: leases, the member directory, cross-host reclaim."""
