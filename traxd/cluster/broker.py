"""The Dramatiq broker over Redis, as traxd uses it: no Dramatiq retries, no time limits
(the journal decides retries and back-off; the step's own limits stop it), dead workers
found after `[cluster] lease`."""

from __future__ import annotations

import redis
from dramatiq.brokers.redis import DEFAULT_MAINTENANCE_CHANCE, MAINTENANCE_SCALE, RedisBroker

from traxd.cluster.protocol import RESOURCES, queue_name
from traxd.config import ClusterSettings

SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 3.0


def connection_pool(url: str) -> redis.ConnectionPool:
    return redis.ConnectionPool.from_url(
        url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=30)


def make_broker(cluster: ClusterSettings, *, sweeper: bool = False,
                resources: tuple[str, ...] = RESOURCES) -> RedisBroker:
    """A broker with no middleware (so no Retries, TimeLimit or AgeLimit) and the given
    resources' queues declared. The daemon's broker is the `sweeper`: each of its (few)
    commands also moves the unacknowledged messages of workers silent for a lease back
    to their queues; the workers' brokers do that at Dramatiq's default rate."""
    assert cluster.broker is not None
    client = redis.Redis(connection_pool=connection_pool(cluster.broker))
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        client=client, middleware=[], heartbeat_timeout=int(cluster.lease * 1000),
        maintenance_chance=MAINTENANCE_SCALE if sweeper else DEFAULT_MAINTENANCE_CHANCE)
    for resource in resources:
        broker.declare_queue(queue_name(cluster.queue, resource))
    return broker
