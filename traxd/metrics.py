"""Prometheus metrics: the one module-level registry, names as in DESIGN.md."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    gc_collector,
    platform_collector,
    process_collector,
)

from traxd import __version__

REGISTRY = CollectorRegistry(auto_describe=True)
process_collector.ProcessCollector(registry=REGISTRY)
platform_collector.PlatformCollector(registry=REGISTRY)
gc_collector.GCCollector(registry=REGISTRY)

# 0.1 s … 4 h: media jobs range from a short clip to a long recording.
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)

BUILD_INFO = Info("traxd_build", "traxd version", registry=REGISTRY)
FILES_DISCOVERED = Counter(
    "traxd_files_discovered", "Files found in an inbox", ["inbox"], registry=REGISTRY)
JOBS_COMPLETED = Counter(
    "traxd_jobs_completed", "Jobs finished, by outcome (done, failed, duplicate)",
    ["inbox", "outcome"], registry=REGISTRY)
JOB_RETRIES = Counter(
    "traxd_job_retries", "Step attempts that will be retried", ["inbox", "step", "reason"],
    registry=REGISTRY)
JOB_DURATION = Histogram(
    "traxd_job_duration_seconds", "Wall time of a job, claim to done", ["inbox"],
    buckets=DURATION_BUCKETS, registry=REGISTRY)
STEP_DURATION = Histogram(
    "traxd_step_duration_seconds", "Wall time of one pipeline step", ["step"],
    buckets=DURATION_BUCKETS, registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "traxd_queue_depth", "Jobs queued (ready, waiting for a worker)", ["inbox"], registry=REGISTRY)
JOBS_IN_PROGRESS = Gauge(
    "traxd_jobs_in_progress", "Jobs running now", ["inbox"], registry=REGISTRY)
WORKERS_ALLOWED = Gauge(
    "traxd_workers_allowed", "Concurrent jobs the resource governor allows now", registry=REGISTRY)
THROTTLED = Gauge(
    "traxd_throttled", "1 while admission is held back for this reason", ["reason"],
    registry=REGISTRY)
MEDIA_SECONDS = Counter(
    "traxd_media_seconds", "Seconds of media processed", ["inbox"], registry=REGISTRY)
BYTES_PROCESSED = Counter(
    "traxd_bytes_processed", "Bytes of input files processed", ["inbox"], registry=REGISTRY)
API_REQUESTS = Counter(
    "traxd_api_requests", "Requests to remote APIs, by provider and HTTP status",
    ["provider", "status"], registry=REGISTRY)
BACKEND_PAUSED = Gauge(
    "traxd_backend_paused", "1 while a backend is paused by a fatal error", ["backend"],
    registry=REGISTRY)
LAST_SUCCESS = Gauge(
    "traxd_last_success_timestamp_seconds", "Unix time of the last job done", ["inbox"],
    registry=REGISTRY)
INBOX_PAUSED = Gauge(
    "traxd_inbox_paused", "1 while an inbox is paused or draining on purpose (traxd pause, "
    "traxd drain)", ["inbox"], registry=REGISTRY)
RECONCILE_FOUND = Counter(
    "traxd_reconcile_found", "Files found by a reconcile scan that no event announced",
    ["inbox"], registry=REGISTRY)

NOTIFICATIONS = Counter(
    "traxd_notifications", "Notification messages, by event and outcome (sent, failed, dropped)",
    ["event", "outcome"], registry=REGISTRY)

INTERNAL_ERRORS = Counter(
    "traxd_internal_errors", "Exceptions nothing classified (bugs), by step; each is retried",
    ["step"], registry=REGISTRY)
EVENT_LOOP_LAG = Histogram(
    "traxd_event_loop_lag_seconds", "How much later than asked the event loop woke up",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY)

# Scale-out ([cluster] broker): what the daemon last saw in Redis.
WORKERS_ALIVE = Gauge(
    "traxd_workers_alive", "traxd worker processes heartbeating within the lease",
    registry=REGISTRY)
WORKER_BUSY = Gauge(
    "traxd_worker_busy", "Steps a live worker process is running now", ["worker"],
    registry=REGISTRY)
CLUSTER_QUEUE_DEPTH = Gauge(
    "traxd_cluster_queue_depth", "Step messages waiting for a worker, by queue", ["queue"],
    registry=REGISTRY)


OUTCOMES = ("done", "failed", "duplicate")
THROTTLE_REASONS = ("memory", "cpu", "disk_full")


def publish_known(inboxes: Sequence[str], backends: Iterable[str],
                  last_success: Mapping[str, float]) -> None:
    """The series whose labels are known at start, from the start (at 0 until something
    happens; the last success of each inbox as the journal remembers it), and no
    `_created` series."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    BUILD_INFO.info({"version": __version__})
    for inbox in inboxes:
        for outcome in OUTCOMES:
            JOBS_COMPLETED.labels(inbox=inbox, outcome=outcome)
        for series in (FILES_DISCOVERED, QUEUE_DEPTH, JOBS_IN_PROGRESS, MEDIA_SECONDS,
                       BYTES_PROCESSED, RECONCILE_FOUND, INBOX_PAUSED, JOB_DURATION):
            series.labels(inbox=inbox)
        if inbox in last_success:
            LAST_SUCCESS.labels(inbox=inbox).set(last_success[inbox])
    for backend in backends:
        BACKEND_PAUSED.labels(backend=backend)
    for reason in THROTTLE_REASONS:
        THROTTLED.labels(reason=reason)
