"""Scale-out: steps sent to `traxd worker`s over Redis with Dramatiq.

pathmap and protocol are pure; broker, remote (the daemon's executor) and worker import
dramatiq and redis, and are imported only when `[cluster] broker` is set.
"""
